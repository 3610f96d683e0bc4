"""Training and test batches from an :class:`~qgait.data.OpenGaitDataset`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["iter_test_batches", "make_train_batch"]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)  # None: fresh entropy; an int: a seed


def make_train_batch(dataset, indices: Sequence[int], frames: int = 30,
                     rng: np.random.Generator | int | None = None):
    """A fixed-length, unordered training batch (OpenGait's ``fixed_unordered`` sampling).

    Each sequence contributes ``frames`` frames drawn at random (without replacement when it
    has at least ``frames``, else with replacement), in the order drawn.

    Args:
        dataset: an OpenGaitDataset (anything with ``frames_at(i, t)``, ``n_frames(i)``,
            ``labels``).
        indices: N dataset indices (e.g. one batch of a TripletSampler).
        frames: frames per sequence.
        rng: a numpy Generator (pass one and reuse it for a reproducible run), a seed, or None.

    Returns:
        ``(x, labels)``: x float32 ``[N, 1, frames, 64, 44]`` of {0, 1}; labels int64 ``[N]``.
    """
    if frames < 1:
        raise ValueError(f"make_train_batch: frames must be >= 1, got {frames}")
    rng = _as_rng(rng)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("make_train_batch: no indices")
    out = None
    for n, i in enumerate(indices):
        T = dataset.n_frames(i)
        t = rng.choice(T, frames, replace=T < frames)
        f = dataset.frames_at(i, t)
        if out is None:
            out = np.empty((len(indices), 1, frames) + f.shape[1:], dtype=np.float32)
        out[n, 0] = f
    labels = torch.as_tensor(np.asarray(dataset.labels)[indices], dtype=torch.int64)
    return torch.from_numpy(out), labels


def iter_test_batches(dataset, indices: Sequence[int] | None = None,
                      max_frames: int = 720) -> Iterator[tuple[torch.Tensor, list[int], list[int]]]:
    """Whole sequences, packed along T, for evaluation (OpenGait's ``seqL`` convention).

    Sequences are taken in the order of ``indices`` and packed greedily while the batch holds
    at most ``max_frames`` frames; a sequence longer than ``max_frames`` goes alone.

    Args:
        dataset: an OpenGaitDataset.
        indices: dataset indices to evaluate (default: all, in order).
        max_frames: frame budget of one batch.

    Yields:
        ``(x, seqL, idx)``: x float32 ``[1, 1, sum(seqL), 64, 44]`` of {0, 1}, the frames of
        sequence ``idx[j]`` being ``x[:, :, sum(seqL[:j]) : sum(seqL[:j+1])]``.
    """
    if max_frames < 1:
        raise ValueError(f"iter_test_batches: max_frames must be >= 1, got {max_frames}")
    if indices is None:
        indices = range(len(dataset))
    seqL: list[int] = []
    idx: list[int] = []

    def emit():
        x = np.concatenate([dataset.frames(i) for i in idx]).astype(np.float32)
        return torch.from_numpy(x)[None, None], list(seqL), list(idx)

    for i in indices:
        i = int(i)
        T = dataset.n_frames(i)
        if idx and sum(seqL) + T > max_frames:
            yield emit()
            seqL.clear()
            idx.clear()
        seqL.append(T)
        idx.append(i)
    if idx:
        yield emit()
