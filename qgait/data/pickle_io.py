"""Safe reading and writing of OpenGait's silhouette pickles.

One OpenGait pickle holds one ``numpy.ndarray``: uint8, shape ``[T, 64, 64]``, values 0..255.
A pickle can run arbitrary code when loaded, so :func:`load_pickle` uses an unpickler that
resolves only the globals numpy itself emits when pickling a plain ndarray and refuses every
other global. What numpy 1.x and 2.x really emit (checked with ``pickletools``):

* protocols 3 and 4: ``numpy._core.multiarray._reconstruct`` (``numpy.core...`` before
  numpy 2), ``numpy.ndarray``, ``numpy.dtype``;
* protocol 5: ``numpy._core.numeric._frombuffer`` (``numpy.core.numeric`` before numpy 2),
  ``numpy.dtype``;
* protocols 0-2 additionally ``_codecs.encode`` (Python 3 bytes pickled for Python 2), which we
  admit only as ``encode(str, "latin1")``.

The names are mapped to the objects of the *installed* numpy (never imported by name), so a
numpy-1 pickle loads under numpy 2 and vice versa.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["SIL_SIZE", "DataError", "load_pickle", "save_pickle"]

SIL_SIZE = 64  # OpenGait's CASIA-B pickles are [T, 64, 64]


class DataError(ValueError):
    """A data file is unreadable, unsafe or not what OpenGait's layout promises."""


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes for protocols 0-2 as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(obj, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("_codecs.encode admitted only as encode(str, 'latin1')")
    return obj.encode("latin1", errors)


_probe = np.zeros((1, 1), np.uint8)
_RECONSTRUCT = _probe.__reduce_ex__(4)[0]
_FROMBUFFER = _probe.__reduce_ex__(5)[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
del _probe


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed (only numpy array reconstruction)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        # EOFError: truncated stream; BadGzipFile / zlib.error: corrupt or not gzip at all.
        raw = gzip.decompress(raw)
    return raw


def load_pickle(path: str | os.PathLike, *, check_shape: bool = True) -> np.ndarray:
    """Loads one OpenGait silhouette pickle (``.pkl`` or gzip-compressed ``.pkl.gz``).

    Args:
        path: the file.
        check_shape: require uint8 ``[T, 64, 64]`` with ``T >= 1`` (the OpenGait CASIA-B layout).
            With False, any uint8 / bool array is returned as it is.

    Returns:
        The array (uint8, ``[T, 64, 64]``, values 0..255).

    Raises:
        DataError: the file is missing, empty, truncated, not a pickle, uses any global other
            than numpy's array reconstruction (nothing in it is executed), or holds something
            other than a uint8 ``[T, 64, 64]`` array. The message names the file.
    """
    path = Path(path)
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
    if not raw:
        raise DataError(f"{path}: empty file")
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused or corrupt pickle: {e}") from e
    except Exception as e:  # truncated pickles raise EOFError, garbage anything
        raise DataError(f"{path}: corrupt pickle: {type(e).__name__}: {e}") from e
    if type(obj) is not np.ndarray:
        raise DataError(f"{path}: expected a numpy.ndarray, got {type(obj).__name__}")
    if obj.dtype != np.uint8:
        raise DataError(f"{path}: expected dtype uint8, got {obj.dtype}")
    if check_shape and (obj.ndim != 3 or obj.shape[1:] != (SIL_SIZE, SIL_SIZE) or obj.shape[0] < 1):
        raise DataError(f"{path}: expected shape [T>=1, {SIL_SIZE}, {SIL_SIZE}], "
                        f"got {list(obj.shape)}")
    return obj


def save_pickle(path: str | os.PathLike, array: np.ndarray, compresslevel: int = 6) -> None:
    """Writes ``array`` as OpenGait does (pickle protocol 4; gzip when ``path`` ends in .gz).

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    array = np.ascontiguousarray(array)
    data = pickle.dumps(array, protocol=4)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=compresslevel, mtime=0)  # mtime=0: reproducible bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
