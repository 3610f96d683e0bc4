"""Safe, bounded reading and writing of OpenGait's silhouette pickles.

One OpenGait pickle holds one ``numpy.ndarray``: uint8, shape ``[T, 64, 64]``, values 0..255.
Pickles come from strangers, so :func:`load_pickle` never hands the file to ``pickle``'s own
unpickler. It decodes and runs the opcode stream itself and admits only what numpy 1.x and 2.x
emit for a plain array (checked with ``pickletools``):

* protocols 0-4: ``numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` (module
  ``numpy.core.multiarray`` before numpy 2), then BUILD with the state
  ``(1, shape, dtype, is_fortran, raw bytes)``;
* protocol 5: ``numpy._core.numeric._frombuffer(buffer, dtype, shape, order[, axis_order])``
  (``numpy.core.numeric`` before numpy 2);
* ``numpy.dtype('u1' | 'b1', align, copy)`` with its BUILD state;
* protocols 0-2 additionally ``_codecs.encode(str, "latin1")`` (Python 3 bytes pickled for
  Python 2) and ``bytes()`` (empty bytes).

Nothing else is callable from a pickle: no other global, no INST / OBJ / NEWOBJ (they build
objects from classes on the stack), no persistent ids, no extension codes, no lists or dicts.
The globals resolve to small guard functions, never to numpy's own ``ndarray`` / ``dtype`` /
``_reconstruct``, so a pickle cannot ask numpy for an array of any shape, strides or buffer:
the guards read shape, dtype and the raw bytes from the arguments, check that
``shape x itemsize`` equals the bytes actually present and that the array is within the frame
cap, and only then build an owned, C-contiguous copy. Hence:

* Only ``uint8`` and ``bool`` arrays load (silhouettes; a float array would multiply the memory
  bound by 4-8 and nothing in qgait writes one). ``check_shape`` (the default) requires uint8
  ``[T, 64, 64]`` with ``1 <= T <= max_frames``.
* ``max_frames`` (default :data:`MAX_FRAMES` = 2,000, or the ``QGAIT_MAX_FRAMES`` environment
  variable; CASIA-B's longest sequence has fewer than 300) caps a sequence, and with it the
  bytes read: a plain file, and a gzip file's *decompressed* stream, may hold at most
  ``6 x max_frames x 64 x 64`` bytes + 64 KiB (protocol 0 writes a zero byte as 6 characters),
  so a gzip bomb stops after that many bytes.
* Memo indices are capped at :data:`MEMO_CAP` (numpy uses fewer than 25 slots) and the memo
  is a dict: a huge index costs nothing.

Every failure, ``MemoryError`` included, is a :class:`DataError` naming the file, so
``OpenGaitDataset(on_error="skip")`` can skip it.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MAX_FRAMES", "MEMO_CAP", "SIL_SIZE", "DataError", "default_max_frames",
           "load_pickle", "save_pickle"]

SIL_SIZE = 64  # OpenGait's CASIA-B pickles are [T, 64, 64]
MAX_FRAMES = 2000  # default cap on frames per sequence (CASIA-B's longest has < 300)
MEMO_CAP = 1 << 16  # memo indices a pickle may use (numpy's own pickles use < 25)
_FRAME = SIL_SIZE * SIL_SIZE  # elements per frame
_SLACK = 64 << 10  # pickle bytes around the array data (numpy's opcodes take ~200)
_EXPANSION = 6  # protocol 0 writes "\0" as "\u0000": 6 bytes per data byte at worst
_DTYPES = {"u1": np.dtype(np.uint8), "b1": np.dtype(np.bool_)}


class DataError(ValueError):
    """A data file is unreadable, unsafe or not what OpenGait's layout promises."""


class _Refused(Exception):
    """Raised inside the unpickler; :func:`load_pickle` turns it into a :class:`DataError`."""


def default_max_frames() -> int:
    """The frame cap used when none is passed: ``QGAIT_MAX_FRAMES`` or :data:`MAX_FRAMES`."""
    v = os.environ.get("QGAIT_MAX_FRAMES")
    if v is None:
        return MAX_FRAMES
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"QGAIT_MAX_FRAMES must be a positive integer, got {v!r}")
    return n


def _short(v) -> str:
    """repr for messages; a huge int (a crafted shape) is named, not printed in full."""
    if isinstance(v, int) and v.bit_length() > 64:
        return f"<{v.bit_length()}-bit int>"
    if isinstance(v, tuple):
        return "(" + ", ".join(_short(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + ")"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class _Token:
    """Stands for ``numpy.ndarray``: only ever passed to ``_reconstruct``, never callable."""

    def __repr__(self):
        return "numpy.ndarray"


_NDARRAY = _Token()


class _Dtype:
    """``numpy.dtype(code, align, copy)`` before and after its BUILD state."""

    __slots__ = ("code", "built")

    def __init__(self, code: str):
        self.code, self.built = code, False

    def setstate(self, state):
        # numpy: (3, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if (self.built or not isinstance(state, tuple) or len(state) not in (8, 9)
                or state[0] not in (3, 4) or state[1] not in ("|", "<", ">", "=")
                or any(s is not None for s in state[2:5] + state[8:])
                or not all(type(s) is int for s in state[5:8])):
            raise _Refused(f"dtype state {_short(state)} is not that of a plain "
                           f"{self.code} dtype")
        self.built = True


class _Array:
    """What ``_reconstruct`` returns; BUILD gives it shape, dtype and bytes (then ``array``)."""

    __slots__ = ("loader", "array")

    def __init__(self, loader):
        self.loader, self.array = loader, None

    def setstate(self, state):
        if self.array is not None:
            raise _Refused("an array's state was given twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused(f"array state must be (version, shape, dtype, is_fortran, data), got "
                           f"{_short(state)}")
        if len(state) == 5:
            if state[0] != 1 or type(state[0]) is not int:
                raise _Refused(f"array state version {_short(state[0])} is not 1")
            state = state[1:]
        shape, dtype, is_fortran, raw = state
        if type(is_fortran) is not bool:
            raise _Refused(f"array state's is_fortran must be a bool, got {_short(is_fortran)}")
        self.array = self.loader.build(shape, dtype, raw, "F" if is_fortran else "C")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes for protocols 0-2 as _codecs.encode(str, "latin1"); nothing else.
    if (not isinstance(obj, str) or not isinstance(encoding, str)
            or encoding.replace("-", "").lower() != "latin1" or errors != "strict"):
        raise _Refused("_codecs.encode is admitted only as encode(str, 'latin1')")
    return obj.encode("latin1")


def _empty_bytes(*args):
    # Protocols 0-2 pickle b"" (a 0-element array's data) as __builtin__.bytes().
    if args:
        raise _Refused("bytes() is admitted only without arguments")
    return b""


class _Loader:
    """Runs one pickle's opcodes on a stack, calling only the guards of the module docstring."""

    def __init__(self, max_elems: int, check_shape: bool, max_frames: int):
        self.max_elems, self.check_shape, self.max_frames = max_elems, check_shape, max_frames
        # Bound once, so REDUCE can check its callable by identity.
        self.calls = {
            ("numpy.core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self.frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self.frombuffer,
            ("numpy", "dtype"): self.dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("__builtin__", "bytes"): _empty_bytes,
            ("builtins", "bytes"): _empty_bytes,
        }
        self.callables = tuple(self.calls.values())

    # -- the guards a pickle can call ----------------------------------------------------------
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Refused("a global's module and name must be strings")
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        try:
            return self.calls[(module, name)]
        except KeyError:
            raise _Refused(f"global {_short(module)[1:-1]}.{_short(name)[1:-1]} is not allowed "
                           "(only numpy array reconstruction)") from None

    def reconstruct(self, subtype, shape, typecode):
        # numpy calls _reconstruct(ndarray, (0,), b'b') and then sets the state; any other
        # shape would make numpy allocate it here, before anything could be checked.
        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise _Refused("_reconstruct is admitted only as numpy writes it: "
                           f"_reconstruct(numpy.ndarray, (0,), b'b'), got ({_short(subtype)}, "
                           f"{_short(shape)}, {_short(typecode)})")
        return _Array(self)

    def frombuffer(self, buf, dtype, shape, order, axis_order=None):
        if order not in ("C", "F", "K") or (axis_order is not None and order != "K"):
            raise _Refused(f"_frombuffer order {_short(order)} / axis_order "
                           f"{_short(axis_order)} is not numpy's")
        return self.build(shape, dtype, buf, order, axis_order)

    def dtype(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in _DTYPES or type(align) is not bool \
                or type(copy) is not bool:
            raise _Refused(f"dtype {_short(code)} is not allowed (silhouettes are uint8 'u1' or "
                           "bool 'b1')")
        return _Dtype(code)

    # -- the one place an array is made ----------------------------------------------------------
    def build(self, shape, dtype, raw, order, axis_order=None) -> np.ndarray:
        """Checks shape, dtype, cap and byte count, then copies ``raw`` into a new C array."""
        if not isinstance(dtype, _Dtype):
            raise _Refused(f"array dtype must be numpy.dtype('u1' | 'b1'), got "
                           f"{type(dtype).__name__}")
        dt = _DTYPES[dtype.code]
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"array data must be bytes, got {type(raw).__name__}")
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(type(d) is int for d in shape)):
            raise _Refused(f"array shape must be a tuple of at most 32 ints, got {_short(shape)}")
        if any(d < 0 for d in shape):
            raise _Refused(f"negative dimension in shape {_short(shape)}")
        if order == "K":
            if (not isinstance(axis_order, tuple)
                    or not all(type(a) is int for a in axis_order)
                    or sorted(axis_order) != list(range(len(shape)))):
                raise _Refused(f"axis_order {_short(axis_order)} is not a permutation of the "
                               f"{len(shape)} axes")
            final = tuple(shape[a] for a in axis_order)
        else:
            final = shape
        if self.check_shape:  # the silhouette layout, frame cap first: it names the problem
            if dt != np.uint8:
                raise _Refused(f"expected dtype uint8, got {dt}")
            if len(final) != 3 or final[1:] != (SIL_SIZE, SIL_SIZE) or final[0] < 1:
                raise _Refused(f"expected shape [T>=1, {SIL_SIZE}, {SIL_SIZE}], got "
                               f"{_short(final)}")
            if final[0] > self.max_frames:
                raise _Refused(f"{_short(final[0])} frames exceed the cap of max_frames="
                               f"{self.max_frames} (pass max_frames= or set QGAIT_MAX_FRAMES to "
                               "load longer sequences)")
        count = 1
        for d in shape:  # stops before a crafted product grows big
            count *= d
            if count > self.max_elems or d > self.max_elems:
                raise _Refused(f"shape {_short(shape)} holds more than {self.max_elems:,} elements "
                               f"(max_frames={self.max_frames} x {SIL_SIZE} x {SIL_SIZE})")
        if len(raw) != count * dt.itemsize:
            raise _Refused(f"shape {_short(final)} of {dt} needs {count * dt.itemsize:,} bytes, "
                           f"the pickle carries {len(raw):,}")
        # Read as uint8 even for bool: a byte other than 0/1 must not become a non-canonical bool.
        flat = np.frombuffer(raw, dtype=np.uint8, count=count) if count else np.empty(0, np.uint8)
        if order == "K":
            view = flat.reshape(shape).transpose(axis_order)
        else:
            view = flat.reshape(shape, order=order)
        out = np.empty(final, dtype=dt)  # owned, C-contiguous, writeable
        if dt == np.bool_:
            np.not_equal(view, 0, out=out)
        else:
            out[...] = view
        return out

    # -- the opcode interpreter ------------------------------------------------------------------
    def run(self, data: bytes):
        """Executes the admitted opcodes (:data:`_OPS`) of ``data``; returns what STOP pops.

        A small decoder of its own rather than ``pickle``'s unpickler (whose C memo grows to the
        largest index a PUT names, and whose NEWOBJ / INST / BUILD reach any class on the
        stack) or ``pickletools.genops`` (4x slower on these 65-opcode files).
        """
        n = len(data)
        pos = 0
        stack: list = []
        marks: list[list] = []
        memo: dict[int, object] = {}

        def take(k: int) -> bytes:
            nonlocal pos
            if k < 0 or pos + k > n:
                raise _Refused(f"truncated: an argument of {k:,} bytes at byte {pos} runs past "
                               f"the end ({n:,} bytes)")
            b = data[pos:pos + k]
            pos += k
            return b

        def line() -> bytes:
            nonlocal pos
            end = data.find(b"\n", pos)
            if end < 0:
                raise _Refused(f"truncated: no end of line after byte {pos}")
            b = data[pos:end]
            pos = end + 1
            return b

        def put(idx: int, at: int):
            if not 0 <= idx < MEMO_CAP:
                raise _Refused(f"memo index {_short(idx)} at byte {at} is beyond the cap of "
                               f"{MEMO_CAP}")
            memo[idx] = stack[-1]

        def get(idx: int, at: int):
            try:
                stack.append(memo[idx])
            except KeyError:
                raise _Refused(f"memo index {_short(idx)} at byte {at} was never set") from None

        def pop_mark() -> list:
            nonlocal stack
            items = stack
            stack = marks.pop()
            return items

        u32, u64 = _U32.unpack, _U64.unpack
        while True:
            if pos >= n:
                raise _Refused("truncated: the pickle ends without STOP")
            at = pos
            op = data[pos]
            pos += 1
            kind = _OPS.get(op)
            if kind is None:
                name = getattr(pickletools.code2op.get(chr(op)), "name", f"0x{op:02x}")
                raise _Refused(f"opcode {name} at byte {at} is not allowed (a numpy array pickle "
                               "never uses it)")
            if kind == "memoize":
                put(len(memo), at)
            elif kind == "str1":
                stack.append(take(take(1)[0]).decode("utf-8", "surrogatepass"))
            elif kind == "int1":
                stack.append(take(1)[0])
            elif kind == "stack_global":
                gname = stack.pop()
                stack.append(self.find_class(stack.pop(), gname))
            elif kind == "binput":
                put(take(1)[0], at)
            elif kind == "binget":
                get(take(1)[0], at)
            elif kind == "tuple_n":
                k = op - _TUPLE1 + 1
                if len(stack) < k:
                    raise _Refused(f"TUPLE{k} at byte {at} on a stack of {len(stack)}")
                items = tuple(stack[-k:])
                del stack[-k:]
                stack.append(items)
            elif kind == "mark":
                marks.append(stack)
                stack = []
            elif kind == "tuple":
                items = tuple(pop_mark())  # (not inline: pop_mark rebinds stack)
                stack.append(items)
            elif kind == "reduce":
                args = stack.pop()
                func = stack[-1]
                if not any(func is f for f in self.callables) or not isinstance(args, tuple):
                    what = "numpy.ndarray" if func is _NDARRAY else type(func).__name__
                    raise _Refused(f"REDUCE at byte {at} calls {what}, not one of the admitted "
                                   "functions (numpy.ndarray is admitted only as the first "
                                   "argument of _reconstruct)")
                stack[-1] = func(*args)
            elif kind == "build":
                state = stack.pop()
                inst = stack[-1]
                if not isinstance(inst, (_Array, _Dtype)):
                    raise _Refused(f"BUILD at byte {at} on {type(inst).__name__}: only numpy "
                                   "arrays and dtypes take a state")
                inst.setstate(state)
            elif kind == "const":
                stack.append(_CONSTS[op])
            elif kind == "int4":
                stack.append(_I32.unpack(take(4))[0])
            elif kind == "int2":
                stack.append(_U16.unpack(take(2))[0])
            elif kind == "bytes1":
                stack.append(take(take(1)[0]))
            elif kind == "bytes4":
                stack.append(take(u32(take(4))[0]))
            elif kind == "bytes8":
                stack.append(take(u64(take(8))[0]))
            elif kind == "bytearray8":
                stack.append(bytearray(take(u64(take(8))[0])))
            elif kind == "str4":
                stack.append(take(u32(take(4))[0]).decode("utf-8", "surrogatepass"))
            elif kind == "str8":
                stack.append(take(u64(take(8))[0]).decode("utf-8", "surrogatepass"))
            elif kind == "long1":
                stack.append(int.from_bytes(take(take(1)[0]), "little", signed=True))
            elif kind == "long4":
                stack.append(int.from_bytes(take(_I32.unpack(take(4))[0]), "little",
                                            signed=True))
            elif kind == "long_binput":
                put(u32(take(4))[0], at)
            elif kind == "long_binget":
                get(u32(take(4))[0], at)
            elif kind == "put":
                put(int(line()), at)
            elif kind == "get":
                get(int(line()), at)
            elif kind == "int_text":  # protocol 0: I01 / I00 are True / False
                t = line()
                stack.append(True if t == b"01" else False if t == b"00" else int(t))
            elif kind == "long_text":
                stack.append(int(line().rstrip(b"L")))
            elif kind == "unicode_text":
                stack.append(line().decode("raw-unicode-escape"))
            elif kind == "global":
                module = line().decode("utf-8")
                stack.append(self.find_class(module, line().decode("utf-8")))
            elif kind == "proto":
                if take(1)[0] > pickle.HIGHEST_PROTOCOL:
                    raise _Refused(f"unsupported pickle protocol {data[pos - 1]}")
            elif kind == "frame":  # a length prefix for buffering; the opcodes follow inline
                take(8)
            elif kind == "stop":
                if not stack:
                    raise _Refused(f"STOP at byte {at} on an empty stack")
                return stack.pop()


_U16, _U32, _U64, _I32 = (struct.Struct(f) for f in ("<H", "<I", "<Q", "<i"))
# The opcodes numpy's array pickles use (protocols 0-5), by kind; every other one is refused.
_OPS = {op[0]: kind for op, kind in [
    (pickle.MEMOIZE, "memoize"), (pickle.SHORT_BINUNICODE, "str1"), (pickle.BININT1, "int1"),
    (pickle.STACK_GLOBAL, "stack_global"), (pickle.BINPUT, "binput"), (pickle.BINGET, "binget"),
    (pickle.TUPLE1, "tuple_n"), (pickle.TUPLE2, "tuple_n"), (pickle.TUPLE3, "tuple_n"),
    (pickle.MARK, "mark"), (pickle.TUPLE, "tuple"), (pickle.REDUCE, "reduce"),
    (pickle.BUILD, "build"), (pickle.NONE, "const"), (pickle.NEWTRUE, "const"),
    (pickle.NEWFALSE, "const"), (pickle.EMPTY_TUPLE, "const"), (pickle.BININT, "int4"),
    (pickle.BININT2, "int2"), (pickle.SHORT_BINBYTES, "bytes1"), (pickle.BINBYTES, "bytes4"),
    (pickle.BINBYTES8, "bytes8"), (pickle.BYTEARRAY8, "bytearray8"),
    (pickle.BINUNICODE, "str4"), (pickle.BINUNICODE8, "str8"), (pickle.LONG1, "long1"),
    (pickle.LONG4, "long4"), (pickle.LONG_BINPUT, "long_binput"),
    (pickle.LONG_BINGET, "long_binget"), (pickle.PUT, "put"), (pickle.GET, "get"),
    (pickle.INT, "int_text"), (pickle.LONG, "long_text"), (pickle.UNICODE, "unicode_text"),
    (pickle.GLOBAL, "global"), (pickle.PROTO, "proto"), (pickle.FRAME, "frame"),
    (pickle.STOP, "stop"),
]}
_TUPLE1 = pickle.TUPLE1[0]
_CONSTS = {pickle.NONE[0]: None, pickle.NEWTRUE[0]: True, pickle.NEWFALSE[0]: False,
           pickle.EMPTY_TUPLE[0]: ()}


def _gunzip(comp: bytes, cap: int) -> bytes:
    """``gzip.decompress`` that stops after ``cap + 1`` output bytes (a gzip bomb costs that much).

    zlib checks each member's CRC and length (wbits 31: gzip framing); members may follow one
    another as in ``gzip.decompress``.
    """
    out, n = [], 0
    while comp:
        d = zlib.decompressobj(31)
        chunk = d.decompress(comp, cap + 1 - n)
        out.append(chunk)
        n += len(chunk)
        if n > cap:
            break
        if not d.eof:
            raise EOFError("compressed stream ended before the end-of-stream marker")
        comp = d.unused_data
    return b"".join(out)


def _read_bytes(path: Path, cap: int) -> bytes:
    """The file's bytes (gunzipped for ``.gz``), refusing more than ``cap`` of them."""
    with open(path, "rb") as f:
        # The size first: read(n) allocates n bytes up front, so n is the file's size.
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise _Refused(f"the file holds more than {cap:,} bytes, the most a sequence of "
                           "max_frames frames can take (pass max_frames= or set "
                           "QGAIT_MAX_FRAMES to raise it)")
        raw = f.read(size + 1)  # (a file growing meanwhile is caught below)
    what = "holds"
    if path.name.endswith(".gz") and len(raw) <= cap:
        # EOFError: truncated stream; zlib.error: corrupt or not gzip at all.
        raw = _gunzip(raw, cap)
        what = "decompresses to"
    if len(raw) > cap:
        raise _Refused(f"{what} more than {cap:,} bytes, the most a sequence of max_frames "
                       "frames can take (pass max_frames= or set QGAIT_MAX_FRAMES to raise it)")
    return raw


def load_pickle(path: str | os.PathLike, *, check_shape: bool = True,
                max_frames: int | None = None) -> np.ndarray:
    """Loads one OpenGait silhouette pickle (``.pkl`` or gzip-compressed ``.pkl.gz``), bounded.

    Args:
        path: the file.
        check_shape: require uint8 ``[T, 64, 64]`` with ``1 <= T <= max_frames`` (the OpenGait
            CASIA-B layout). With False, any uint8 / bool array of at most
            ``max_frames x 64 x 64`` elements is returned.
        max_frames: the frame cap (default :func:`default_max_frames`: ``QGAIT_MAX_FRAMES`` or
            2,000). It also bounds the bytes read (module docstring).

    Returns:
        A new, owned, C-contiguous array (uint8 ``[T, 64, 64]``, values 0..255, with
        ``check_shape``).

    Raises:
        DataError: the file is missing, empty, truncated, too large, not a pickle, uses
            anything but numpy's array reconstruction (nothing in it is executed), declares a
            shape its bytes do not fill, or holds something other than the array promised;
            also on ``MemoryError``. The message names the file.
    """
    path = Path(path)
    if max_frames is None:
        max_frames = default_max_frames()
    if type(max_frames) is not int or max_frames < 1:
        raise ValueError(f"load_pickle: max_frames must be a positive int, got {max_frames!r}")
    max_elems = max_frames * _FRAME
    try:
        try:
            raw = _read_bytes(path, _EXPANSION * max_elems + _SLACK)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
        if not raw:
            raise DataError(f"{path}: empty file")
        obj = _Loader(max_elems, check_shape, max_frames).run(raw)
        if isinstance(obj, _Array):
            if obj.array is None:
                raise _Refused("the array was never given its data")
            obj = obj.array
        if type(obj) is not np.ndarray:
            what = {_Dtype: "numpy.dtype", _Token: "numpy.ndarray (the class)"}.get(
                type(obj), type(obj).__name__)
            raise DataError(f"{path}: expected a numpy.ndarray, got {what}")
        return obj
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"{path}: refused: {e}") from None
    except MemoryError:
        raise DataError(f"{path}: out of memory while loading") from None
    except Exception as e:  # truncated or garbage streams: ValueError, IndexError, ...
        raise DataError(f"{path}: corrupt pickle: {type(e).__name__}: {_short(str(e))}") from e


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
