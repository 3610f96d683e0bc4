"""Raw silhouette PNG trees -> OpenGait's pickle tree.

Input: CASIA-B's silhouette release layout ``SRC/<id>/<cond>/<view>/*.png`` (one binary or
grey silhouette per frame, frames in file-name order). Output:
``DST/<id>/<cond>/<view>/<view>.pkl``, uint8 ``[T, 64, 64]``, each frame normalised by
:func:`qgait.data.preprocess.normalise_frame` (crop to the person, height 64, centred, 64 wide).
Frames with fewer than ``min_pixels`` foreground pixels are dropped; a sequence with no frame
left is skipped with a warning. PNG decoding needs Pillow (``pip install qgait[data]``).

CLI (wired as ``qgait data import-png SRC DST``)::

    python -m qgait.data.import_png SRC DST [--workers N] [--min-pixels N] [--gzip]
"""
from __future__ import annotations

import argparse
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from qgait.data.pickle_io import save_pickle
from qgait.data.preprocess import normalise_frames

__all__ = ["find_sequences", "import_png", "main"]


def _dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_sequences(src) -> list[tuple[str, str, str, Path]]:
    """``(id, cond, view, folder)`` of every ``src/<id>/<cond>/<view>/`` holding PNGs."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory")
    out = []
    for s in _dirs(src):
        for c in _dirs(s):
            for v in _dirs(c):
                if any(f.suffix.lower() == ".png" for f in v.iterdir()):
                    out.append((s.name, c.name, v.name, v))
    return out


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def load_png_sequence(folder, min_pixels: int = 100) -> np.ndarray:
    """One folder of raw silhouette PNGs -> normalised uint8 frames [T, 64, 64] (the same
    preprocessing as ``import_png``)."""
    pngs = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() == ".png")
    if not pngs:
        raise ValueError(f"{folder}: no PNG files")
    arr = normalise_frames([_read_png(f) for f in pngs], min_pixels=min_pixels)
    if arr.shape[0] == 0:
        raise ValueError(f"{folder}: no frame has a silhouette of >= {min_pixels} pixels")
    return arr


def _convert(job):
    folder, out, min_pixels = job
    pngs = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() == ".png")
    frames = []
    bad = 0
    for f in pngs:
        try:
            frames.append(_read_png(f))
        except OSError:  # a truncated or non-PNG file among the frames: drop that frame
            bad += 1
    arr = normalise_frames(frames, min_pixels=min_pixels)
    if arr.shape[0] == 0:
        return str(folder), 0, len(pngs), bad
    save_pickle(out, arr)
    return str(folder), arr.shape[0], len(pngs), bad


def import_png(src, dst, workers: int | None = None, min_pixels: int = 100,
               gzip: bool = False, progress: bool = True) -> dict:
    """Converts a PNG silhouette tree into OpenGait's pickle tree.

    Args:
        src: ``SRC/<id>/<cond>/<view>/*.png``.
        dst: output root; ``DST/<id>/<cond>/<view>/<view>.pkl`` (``.pkl.gz`` with gzip).
        workers: processes (default: CPU count; 0 or 1: this process).
        min_pixels: frames with fewer foreground (non-zero) pixels are dropped.
        gzip: write gzip-compressed pickles (what the shared CASIA-B copy uses).
        progress: show a tqdm bar.

    Returns:
        ``{"sequences": written, "empty": skipped sequences, "frames": kept,
        "dropped_frames": dropped, "unreadable": unreadable PNGs}``.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError("import_png needs Pillow: pip install pillow (or qgait[data])") from e
    seqs = find_sequences(src)
    dst = Path(dst)
    ext = ".pkl.gz" if gzip else ".pkl"
    jobs = [(str(folder), str(dst / s / c / v / f"{v}{ext}"), min_pixels)
            for s, c, v, folder in seqs]
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        results = map(_convert, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(min(workers, max(1, len(jobs))))
        results = pool.map(_convert, jobs, chunksize=4)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(jobs), desc="import png", unit="seq")
    stats = {"sequences": 0, "empty": 0, "frames": 0, "dropped_frames": 0, "unreadable": 0}
    empty = []
    try:
        for folder, kept, total, bad in results:
            stats["frames"] += kept
            stats["dropped_frames"] += total - kept
            stats["unreadable"] += bad
            if kept:
                stats["sequences"] += 1
            else:
                stats["empty"] += 1
                empty.append(folder)
    finally:
        if pool is not None:
            pool.shutdown()
    if empty:
        warnings.warn(f"{len(empty)} sequence(s) had no usable frame and were skipped, e.g. "
                      f"{empty[0]}", stacklevel=2)
    return stats


def main(argv=None) -> int:
    """``qgait data import-png SRC DST``: see :func:`import_png`."""
    ap = argparse.ArgumentParser(prog="qgait data import-png",
                                 description="Convert a silhouette PNG tree "
                                 "(<id>/<cond>/<view>/*.png) into OpenGait's pickle tree.")
    ap.add_argument("src", help="PNG tree root")
    ap.add_argument("dst", help="output pickle tree root")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--min-pixels", type=int, default=100,
                    help="drop frames with fewer foreground pixels (default 100)")
    ap.add_argument("--gzip", action="store_true", help="write .pkl.gz")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    stats = import_png(a.src, a.dst, workers=a.workers, min_pixels=a.min_pixels, gzip=a.gzip,
                       progress=not a.no_progress)
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
