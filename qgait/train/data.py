"""Training batches for the trainer: a pure function of the step, prefetched by a thread.

Batch ``s`` depends only on ``(seed, rank, s)``: the identities come from
``TripletSampler.batch(s)``, the frames from ``np.random.default_rng([seed, 1, rank, s])`` and
their augmentation (if any) from ``np.random.default_rng([seed, 2, rank, s])``, so turning
augmentation on changes nothing else.
So a resumed run sees exactly the batches an uninterrupted run would, and the background
thread may run ahead freely (nothing it consumes has to be checkpointed beyond the step).
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from qgait.data import TripletSampler, make_train_batch


def make_ordered_batch(dataset, indices, frames: int, rng: np.random.Generator):
    """A clip of ``frames`` consecutive frames per sequence, from a random start.

    Temporal 3-D kernels need real neighbouring frames; a sequence shorter than the clip is
    read cyclically (gait is periodic, so the wrap-around is a plausible continuation).

    Returns ``(x float32 [N, 1, frames, H, W], labels int64 [N])``.
    """
    out = None
    for n, i in enumerate(indices):
        T = dataset.n_frames(i)
        start = int(rng.integers(0, T - frames + 1 if T >= frames else T))
        t = (start + np.arange(frames)) % T
        f = dataset.frames_at(i, t)
        if out is None:
            out = np.empty((len(indices), 1, frames) + f.shape[1:], dtype=np.float32)
        out[n, 0] = f
    labels = torch.as_tensor(np.asarray(dataset.labels)[list(indices)], dtype=torch.int64)
    return torch.from_numpy(out), labels


class TrainBatches:
    """Iterator of ``(step, x, labels)`` from ``start_step`` on, prepared ``prefetch`` ahead.

    Args:
        dataset: an OpenGaitDataset (or anything with ``n_frames``, ``frames_at``, ``labels``).
        P, K, frames, sampling: batch layout and clip sampling ("ordered" / "unordered").
        seed, rank, world_size: the stream (see the module docstring) and this rank's shard.
        start_step: first step to produce (a resumed run's step).
        prefetch: batches prepared ahead by a daemon thread; 0 builds each batch on demand.
        augment: a :class:`~qgait.data.augment.SilhouetteAugment` applied to every sequence
            (None: none).
    """

    def __init__(self, dataset, P: int, K: int, frames: int, sampling: str = "ordered",
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 prefetch: int = 4, augment=None):
        self.dataset, self.frames, self.sampling = dataset, frames, sampling
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed, self.rank = seed, rank
        self.sampler = TripletSampler(dataset.labels, P, K, seed=seed, rank=rank,
                                      world_size=world_size)
        self.sampler.step = start_step
        self.step = start_step
        self.prefetch = prefetch
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread = None

    def build(self, step: int):
        """Batch ``step``: ``(x [P*K, 1, frames, H, W], labels [P*K])`` (pure)."""
        idx = self.sampler.batch(step)
        rng = np.random.default_rng([self.seed, 1, self.rank, step])
        if self.sampling == "ordered":
            x, labels = make_ordered_batch(self.dataset, idx, self.frames, rng)
        else:
            x, labels = make_train_batch(self.dataset, idx, self.frames, rng)
        if self.augment is not None:
            arng = np.random.default_rng([self.seed, 2, self.rank, step])
            xs = x.numpy()
            for n in range(xs.shape[0]):
                xs[n, 0] = self.augment(xs[n, 0], arng)
        return x, labels

    def _worker(self, first: int):
        s = first
        while not self._stop.is_set():
            try:
                item = (s, *self.build(s))
            except BaseException as e:  # hand the error to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return
            s += 1

    def __iter__(self):
        return self

    def __next__(self):
        if self.prefetch <= 0:
            s = self.step
            self.step += 1
            self.sampler.step = self.step
            return (s, *self.build(s))
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, args=(self.step,), daemon=True,
                                            name="qgait-train-batches")
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        self.step = item[0] + 1
        self.sampler.step = self.step
        return item

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
