"""OpenGait's silhouette pickle tree as an in-memory, bit-packed dataset.

Layout read (OpenGait's ``CASIA-B-pkl``; the shared copy gzips each pickle)::

    root/<subject>/<condition>/<view>/<anything>.pkl        (or .pkl.gz)

Each file is one sequence: uint8 ``[T, 64, 64]``, 0..255. The dataset binarises it (``> 127``),
crops 10 columns per side (OpenGait's models see ``[T, 64, 44]``) and keeps every frame as 352
bytes (``np.packbits`` of the 64 x 44 bits), so all 303k CASIA-B training frames take ~107 MB
instead of 850 MB of uint8.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qgait.data.pickle_io import SIL_SIZE, DataError, load_pickle

__all__ = ["CROP", "HEIGHT", "WIDTH", "OpenGaitDataset", "SeqInfo", "select_subjects"]

HEIGHT = 64
CROP = 10  # columns dropped on each side
WIDTH = SIL_SIZE - 2 * CROP  # 44
_BITS = HEIGHT * WIDTH  # 2816 bits = 352 bytes per frame
_THRESHOLD = 127
_CACHE = 256  # packed sequences kept when not preloading (~30 KB each)


class SeqInfo(NamedTuple):
    """Where one sequence came from."""
    subject: str
    condition: str   # lower case whatever the folder's case ("NM-01" -> "nm-01")
    view: str
    path: str


def _listdir(p: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith("."))


def _seq_files(d: Path) -> list[str]:
    names = [e.name for e in os.scandir(d) if e.is_file() and not e.name.startswith(".")
             and (e.name.endswith(".pkl") or e.name.endswith(".pkl.gz"))]
    plain = {n for n in names if n.endswith(".pkl")}
    # A half-gunzipped tree may hold both X.pkl and X.pkl.gz: read the plain one once.
    return sorted(n for n in names if not (n.endswith(".gz") and n[:-3] in plain))


def _in_range(s: str, lo: str, hi: str) -> bool:
    if s.isdigit() and lo.isdigit() and hi.isdigit():
        return int(lo) <= int(s) <= int(hi)
    return lo <= s <= hi


def select_subjects(available: Sequence[str], subjects=None, partition_json=None,
                    partition: str = "TRAIN_SET", id_range=None) -> list[str]:
    """The sorted subjects of ``available`` chosen by a list, a partition JSON or an id range.

    The three selectors intersect when several are given. Subjects asked for but absent are
    warned about (the shared CASIA-B copy holds the training subjects only), not an error.
    """
    chosen = set(available)
    asked: set[str] = set()
    if subjects is not None:
        if isinstance(subjects, str):
            raise TypeError("subjects must be a list of subject names, not a string")
        want = {str(s) for s in subjects}
        asked |= want
        chosen &= want
    if partition_json is not None:
        try:
            with open(partition_json) as f:
                part = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{partition_json}: cannot read partition JSON: {e}") from e
        if not isinstance(part, dict) or partition not in part:
            keys = list(part) if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{partition_json}: no {partition!r} in the partition (has {keys})")
        want = {str(s) for s in part[partition]}
        asked |= want
        chosen &= want
    if id_range is not None:
        lo, hi = (str(v) for v in id_range)
        chosen = {s for s in chosen if _in_range(s, lo, hi)}
    missing = asked - set(available)
    if missing and chosen:
        warnings.warn(f"{len(missing)} selected subject(s) are not in the tree, e.g. "
                      f"{sorted(missing)[:5]}", stacklevel=3)
    return sorted(chosen)


def _pack(arr: np.ndarray) -> np.ndarray:
    """uint8 [T, 64, 64] 0..255 -> packed bits [T, 352] of the binarised 64 x 44 crop."""
    sil = arr[:, :, CROP:SIL_SIZE - CROP] > _THRESHOLD
    return np.packbits(sil.reshape(sil.shape[0], _BITS), axis=1)


def _load_packed(path: str, max_frames: int | None) -> np.ndarray:
    """One file, read (bounded: :func:`load_pickle`) and packed; every failure a DataError."""
    arr = load_pickle(path, max_frames=max_frames)
    try:
        return _pack(arr)
    except MemoryError:  # the loader caps a sequence, but a low-memory machine may still fail
        raise DataError(f"{path}: out of memory while packing {arr.shape[0]} frames") from None


def _unpack(bits: np.ndarray) -> np.ndarray:
    return np.unpackbits(bits, axis=1, count=_BITS).reshape(-1, HEIGHT, WIDTH)


class OpenGaitDataset:
    """Silhouette sequences of an OpenGait pickle tree.

    Args:
        root: the tree ``root/<subject>/<condition>/<view>/*.pkl[.gz]``.
        subjects: subjects to keep (names as in the tree, e.g. ``"001"``); None keeps all.
        partition_json: an OpenGait partition file ``{"TRAIN_SET": [...], "TEST_SET": [...]}``.
        partition: which list of ``partition_json`` to keep.
        id_range: inclusive ``(first, last)`` subject ids, e.g. ``("001", "050")``; numeric ids
            compare as numbers.
        on_error: ``"raise"`` (a :class:`DataError` naming the file) or ``"skip"`` (warn once,
            drop the file, count it in ``n_skipped``). With ``preload=False`` files are read on
            access and errors there always raise.
        preload: read everything now (parallel gunzip, bit-packed in memory); else read a file
            each time its sequence is accessed.
        progress: show a tqdm bar while preloading.
        workers: threads for preloading (default: CPUs + 2, at most 8; gunzip releases the GIL).
        max_frames: the most frames a sequence may have (default: ``QGAIT_MAX_FRAMES`` or 2,000;
            CASIA-B's longest has fewer than 300); a longer or oversized file is a
            :class:`DataError` (skipped with ``on_error="skip"``), refused before it is read
            into memory (:func:`qgait.data.load_pickle`).

    Attributes:
        subjects: sorted subject names that have at least one sequence.
        seqs: a :class:`SeqInfo` per sequence, sorted by subject, condition, view, file.
        labels: int64 ``[len(self)]``, the index of each sequence's subject in ``subjects``.
        n_skipped: files dropped by ``on_error="skip"``.

    Example:
        >>> ds = OpenGaitDataset("shared/data/casia-b/pkl", id_range=("001", "050"))
        >>> x, label, info = ds[0]      # uint8 {0,1} [T, 64, 44], int, SeqInfo
    """

    def __init__(self, root, subjects=None, partition_json=None, partition="TRAIN_SET",
                 id_range=None, on_error="raise", preload=True, progress=True, workers=None,
                 max_frames=None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_frames is not None and (type(max_frames) is not int or max_frames < 1):
            raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
        self.max_frames = max_frames
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        self.preload = bool(preload)
        self.n_skipped = 0
        chosen = select_subjects(_listdir(self.root), subjects, partition_json, partition,
                                 id_range)
        seqs = []
        for s in chosen:
            for c in _listdir(self.root / s):
                for v in _listdir(self.root / s / c):
                    d = self.root / s / c / v
                    # condition names are matched case-insensitively (NM-01 is nm-01)
                    seqs.extend(SeqInfo(s, c.lower(), v, str(d / f)) for f in _seq_files(d))
        if not seqs:
            raise DataError(f"{self.root}: no sequences (*.pkl / *.pkl.gz) for the selected "
                            f"subjects ({len(chosen)} selected)")

        self._bits: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._lengths: dict[int, int] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        if self.preload:
            seqs = self._preload(seqs, on_error, progress, workers)
            if not seqs:
                raise DataError(f"{self.root}: every selected file was bad ({self.n_skipped} "
                                "skipped)")
        self.seqs: list[SeqInfo] = seqs
        self.subjects: list[str] = sorted({q.subject for q in seqs})
        index = {s: i for i, s in enumerate(self.subjects)}
        self.labels = np.array([index[q.subject] for q in seqs], dtype=np.int64)

    def _preload(self, seqs, on_error, progress, workers):
        def load(q: SeqInfo):
            try:
                return _load_packed(q.path, self.max_frames)
            except DataError as e:
                if on_error == "raise":
                    raise
                return e

        workers = workers or min(8, (os.cpu_count() or 1) + 2)  # gunzip releases the GIL
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(load, seqs)
            if progress:
                from tqdm import tqdm
                results = tqdm(results, total=len(seqs), desc="loading silhouettes",
                               unit="seq", leave=False)
            results = list(results)
        kept, packed, errors = [], [], []
        for q, r in zip(seqs, results):
            if isinstance(r, DataError):
                errors.append(r)
            else:
                kept.append(q)
                packed.append(r)
        if errors:
            self.n_skipped = len(errors)
            warnings.warn(f"skipped {len(errors)} bad file(s); first: {errors[0]}", stacklevel=3)
        lengths = np.array([p.shape[0] for p in packed], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._bits = (np.concatenate(packed) if packed else
                      np.zeros((0, _BITS // 8), np.uint8))
        return kept

    def __len__(self) -> int:
        return len(self.seqs)

    def _check(self, i: int) -> int:
        n = len(self.seqs)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return i % n

    def packed(self, i: int) -> np.ndarray:
        """Sequence ``i`` as packed bits, uint8 ``[T, 352]`` (a view when preloaded)."""
        i = self._check(i)
        if self._bits is not None:
            return self._bits[self._offsets[i]:self._offsets[i + 1]]
        p = self._cache.get(i)
        if p is None:
            p = _load_packed(self.seqs[i].path, self.max_frames)
            self._lengths[i] = p.shape[0]
            # a small cache of recent sequences: a batch asks n_frames(i), then frames_at(i)
            self._cache[i] = p
            if len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return p

    def frames(self, i: int) -> np.ndarray:
        """Sequence ``i``: uint8 ``[T, 64, 44]`` of {0, 1}."""
        return _unpack(self.packed(i))

    def frames_at(self, i: int, t: np.ndarray) -> np.ndarray:
        """Frames ``t`` (ints, repeats allowed) of sequence ``i``: uint8 ``[len(t), 64, 44]``."""
        return _unpack(self.packed(i)[np.asarray(t, dtype=np.int64)])

    def n_frames(self, i: int) -> int:
        """Number of frames ``T`` of sequence ``i``."""
        i = self._check(i)
        if self._offsets is not None:
            return int(self._offsets[i + 1] - self._offsets[i])
        if i not in self._lengths:
            self.packed(i)
        return self._lengths[i]

    def __getitem__(self, i: int):
        """``(frames uint8 [T, 64, 44], label int, SeqInfo)``."""
        i = self._check(i)
        return self.frames(i), int(self.labels[i]), self.seqs[i]

    @property
    def nbytes(self) -> int:
        """Bytes of frame storage held in memory."""
        return 0 if self._bits is None else int(self._bits.nbytes)

    def __repr__(self) -> str:
        return (f"OpenGaitDataset({str(self.root)!r}: {len(self.subjects)} subjects, "
                f"{len(self)} sequences, skipped {self.n_skipped})")
