"""P x K identity sampling for triplet training, deterministic, resumable, sharded for DDP."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["TripletSampler"]


class TripletSampler:
    """Yields, forever, batches of ``P * K`` dataset indices: P identities x K sequences each.

    Batch ``b`` is drawn from ``np.random.default_rng([seed, b])`` alone, so the stream depends
    only on ``(labels, P, K, seed, world_size)``, resumes exactly from ``state_dict()`` and
    needs no communication between ranks. At each step all ranks draw the same
    ``world_size * P`` distinct identities and rank ``r`` takes identities ``r*P .. r*P+P-1``:
    every rank's batch is a full P x K batch (its triplets are local) and the shards of one
    step share no identity, hence no index. P and K are per rank.

    Within a batch the layout is identity-major: ``[id0 x K, id1 x K, ...]``. An identity with
    fewer than K sequences is sampled with replacement, otherwise without.

    Args:
        labels: int ``[N]``, the identity of each dataset index (e.g. ``dataset.labels``).
        P: identities per batch (per rank).
        K: sequences per identity.
        seed: the stream's seed.
        rank, world_size: this process's shard.

    Example:
        >>> sampler = TripletSampler(ds.labels, P=8, K=8, seed=0)
        >>> for step, idx in zip(range(1000), sampler):
        ...     x, y = make_train_batch(ds, idx, frames=30, rng=rng)
    """

    def __init__(self, labels, P: int, K: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
            raise ValueError("TripletSampler: labels must be a non-empty 1-D integer array, "
                             f"got {labels.dtype} shape {labels.shape}")
        for name, v in (("P", P), ("K", K), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TripletSampler: {name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TripletSampler: rank {rank} not in [0, {world_size})")
        ids, inverse = np.unique(labels, return_inverse=True)
        if world_size * P > len(ids):
            raise ValueError(f"TripletSampler: world_size * P = {world_size * P} distinct "
                             f"identities per step, but the labels hold only {len(ids)}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse))])
        self._members = [order[bounds[j]:bounds[j + 1]] for j in range(len(ids))]
        self.P, self.K, self.seed = int(P), int(K), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self._n_ids = len(ids)
        self.step = 0

    def batch(self, step: int) -> list[int]:
        """The indices this rank gets at ``step`` (pure: does not move the stream)."""
        rng = np.random.default_rng([self.seed, int(step)])
        chosen = rng.choice(self._n_ids, self.world_size * self.P, replace=False)
        out = []
        for j in chosen:
            m = self._members[j]
            # Draw for every identity of the step (all ranks' shards) so that each rank's
            # RNG stream is the same; keep only this rank's.
            out.append(rng.choice(m, self.K, replace=len(m) < self.K))
        mine = out[self.rank * self.P:(self.rank + 1) * self.P]
        return np.concatenate(mine).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            b = self.batch(self.step)
            self.step += 1
            yield b

    def state_dict(self) -> dict:
        """Where the stream is: the next batch to yield is ``batch(state["step"])``."""
        return {"step": self.step, "seed": self.seed, "P": self.P, "K": self.K,
                "world_size": self.world_size, "n_identities": self._n_ids}

    def load_state_dict(self, state: dict) -> None:
        """Continues the stream of ``state`` (same seed, P, K, world size and identities)."""
        for k in ("seed", "P", "K", "world_size", "n_identities"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                raise ValueError(f"TripletSampler.load_state_dict: {k} is {state[k]} in the "
                                 f"state but {mine} here")
        self.step = int(state["step"])
