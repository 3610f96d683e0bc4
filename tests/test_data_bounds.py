"""Bounded loading of silhouette pickles: crafted files that would exhaust memory or time.

Every crafted file here is assembled from raw pickle opcodes, so the test states exactly what
an attacker writes. Each is refused with a DataError naming the file, without allocating
anything large: tracemalloc (which sees numpy's array buffers and pickle's memo) bounds the peak
memory of the load. A dataset skips such files with ``on_error="skip"``.
"""
from __future__ import annotations

import functools
import gzip
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest

from qgait.data import DataError, OpenGaitDataset, load_pickle, save_pickle
from qgait.data.pickle_io import MAX_FRAMES, MEMO_CAP


# --------------------------------------------------------------------------- a tiny assembler
def _s(text: str) -> bytes:
    b = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _i(v: int) -> bytes:  # LONG1: any int
    n = (v.bit_length() + 8) // 8
    return pickle.LONG1 + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _b(data: bytes) -> bytes:
    return pickle.BINBYTES8 + struct.pack("<Q", len(data)) + data


def _t(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _g(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + pickle.STACK_GLOBAL


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _t(*args) + pickle.REDUCE


def _asm(*parts: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + b"".join(parts) + pickle.STOP


NDARRAY = _g("numpy", "ndarray")
RECONSTRUCT = _g("numpy._core.multiarray", "_reconstruct")
FROMBUFFER = _g("numpy._core.numeric", "_frombuffer")


def _dtype(code="u1") -> bytes:
    state = _t(_i(3), _s("|"), pickle.NONE, pickle.NONE, pickle.NONE, _i(-1), _i(-1), _i(0))
    return _call(_g("numpy", "dtype"), _s(code), pickle.NEWFALSE, pickle.NEWTRUE) + state \
        + pickle.BUILD


def _shape(*dims: int) -> bytes:
    return _t(*map(_i, dims))


def _numpy_style(shape, raw: bytes, code="u1") -> bytes:
    """What numpy writes for an array (protocols 2-4), with any shape / data."""
    return _asm(_call(RECONSTRUCT, NDARRAY, _shape(0), pickle.SHORT_BINBYTES + b"\x01b")
                + _t(_i(1), _shape(*shape), _dtype(code), pickle.NEWFALSE, _b(raw))
                + pickle.BUILD)


def test_assembler_writes_what_numpy_writes(tmp_path):
    """The assembler is right: a numpy-style file with honest bytes loads as that array."""
    a = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    (tmp_path / "ok.pkl").write_bytes(_numpy_style(a.shape, a.tobytes()))
    assert np.array_equal(load_pickle(tmp_path / "ok.pkl"), a)
    assert np.array_equal(pickle.loads(_numpy_style(a.shape, a.tobytes())), a)


# --------------------------------------------------------------------------- crafted files
def stride0() -> bytes:
    """numpy.ndarray((10**9, 64, 64), 'u1', 4 KB of zeros, 0, strides=(0, 64, 1)): a 4 TB view
    of 4 KB that passed as a silhouette; packing it died with MemoryError."""
    return _asm(_call(NDARRAY, _shape(10**9, 64, 64), _s("u1"), _b(bytes(4096)), _i(0),
                      _shape(0, 64, 1)))


def uninit() -> bytes:
    """numpy.ndarray((2_000_000, 64, 64), 'u1'): 7.6 GiB of uninitialised memory in 66 bytes."""
    return _asm(_call(NDARRAY, _shape(2_000_000, 64, 64), _s("u1")))


def reconstruct_big() -> bytes:
    """_reconstruct(ndarray, (2_000_000, 64, 64), 'u1'): numpy allocates before any state."""
    return _asm(_call(RECONSTRUCT, NDARRAY, _shape(2_000_000, 64, 64), _s("u1")))


def state_lies() -> bytes:
    """numpy's own layout, declaring 2,000 frames (within the cap) but carrying one."""
    return _numpy_style((2000, 64, 64), bytes(4096))


def frombuffer_lies() -> bytes:
    """Protocol 5's _frombuffer with a shape its buffer does not fill."""
    return _asm(_call(FROMBUFFER, _b(bytes(4096)), _dtype(), _shape(10**6, 64, 64), _s("C")))


def memo_long_binput() -> bytes:
    """PROTO 4, NONE, LONG_BINPUT 2**27, STOP: 9 bytes; pickle's C memo grew to 1 GiB."""
    return _asm(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 1 << 27))


def memo_put_text() -> bytes:
    """The same with protocol 0's text PUT and a larger index."""
    return pickle.NONE + pickle.PUT + b"2000000000\n" + pickle.STOP


def too_many_frames() -> bytes:
    """An honest numpy pickle one frame over the default cap."""
    return pickle.dumps(np.zeros((MAX_FRAMES + 1, 64, 64), np.uint8), protocol=4)


CRAFTED = {f.__name__: f for f in (stride0, uninit, reconstruct_big, state_lies, frombuffer_lies,
                                   memo_long_binput, memo_put_text, too_many_frames)}
# What the message says, so a refusal for the wrong reason fails the test.
WHY = {"stride0": "numpy.ndarray", "uninit": "numpy.ndarray", "reconstruct_big": "_reconstruct",
       "state_lies": "needs 8,192,000 bytes, the pickle carries 4,096",
       "frombuffer_lies": "1000000 frames exceed the cap",
       "memo_long_binput": "memo index 134217728", "memo_put_text": "memo index 2000000000",
       "too_many_frames": "2001 frames exceed the cap of max_frames=2000"}


def _load_measured(path, **kw):
    """load_pickle's exception, peak traced memory (bytes) and seconds."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError) as e:
            load_pickle(path, **kw)
    finally:
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return e.value, peak, dt


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_pickle_refused_cheaply(tmp_path, name):
    data = CRAFTED[name]()
    p = tmp_path / f"crafted_{name}.pkl"
    p.write_bytes(data)
    err, peak, dt = _load_measured(p)
    assert p.name in str(err)
    assert any(w in str(err) for w in WHY[name].split("|")), str(err)
    # Nothing large is allocated: at most the file's bytes a few times over (the legitimate
    # too_many_frames file is 8 MB; everything else is under 5 KB).
    assert peak < 4 * len(data) + (1 << 20), (peak, len(data))
    print(f"\n{name}: {len(data):,} bytes, refused in {dt * 1e3:.2f} ms, peak {peak:,} B")


def test_crafted_files_are_what_the_issue_describes():
    """The attacks are real: a plain unpickler builds the 4 TB view (no memory touched), and the
    same opcodes with a small T are an array to it, so only the size differs."""
    a = pickle.loads(stride0())
    assert a.shape == (10**9, 64, 64) and a.strides == (0, 64, 1) and a.dtype == np.uint8
    small = uninit().replace(_i(2_000_000), _i(2))
    assert pickle.loads(small).shape == (2, 64, 64)
    assert len(memo_long_binput()) == 9 and len(uninit()) < 100


def test_gzip_bomb_stops_at_the_cap(tmp_path):
    # max_frames=1 caps the decompressed stream at 6 x 4096 + 64 KiB = 90,112 bytes; the bomb
    # is 8 MiB of zeros in ~8 KB. The test runs with a small cap to stay fast; the default
    # cap (2,000 frames: 49 MB) works the same way.
    p = tmp_path / "bomb.pkl.gz"
    p.write_bytes(gzip.compress(bytes(8 << 20), compresslevel=9))
    err, peak, dt = _load_measured(p, max_frames=1)
    assert "bomb.pkl.gz" in str(err) and "decompresses to more than 90,112 bytes" in str(err)
    assert peak < 4 * 90_112 + p.stat().st_size, peak
    print(f"\ngzip bomb: {p.stat().st_size:,} bytes, refused in {dt * 1e3:.2f} ms, peak {peak:,} B")
    # a plain file over the cap is refused by its size, unread
    q = tmp_path / "big.pkl"
    q.write_bytes(bytes(200_000))
    with pytest.raises(DataError, match="big.pkl: refused: the file holds more than 90,112"):
        load_pickle(q, max_frames=1)


@pytest.mark.parametrize("payload,why", [
    (_asm(_call(NDARRAY, _shape(1), _s("u1"))), "numpy.ndarray"),
    (_numpy_style((2, 64, 64), bytes(4 * 2 * 64 * 64), code="f4"), "dtype 'f4' is not allowed"),
    (_numpy_style((2, 64, 64), bytes(2 * 64 * 64), code="O"), "dtype 'O' is not allowed"),
    (_numpy_style((2, -64, 64), b""), "negative dimension"),
    (_asm(_call(FROMBUFFER, _b(bytes(16)), _dtype(), _shape(10**12, 10**12), _s("C"))),
     "holds more than 8,192,000 elements"),  # any shape (check_shape=False) is capped too
    (_asm(_g("_codecs", "encode") + _t() + pickle.BUILD), "BUILD at byte"),  # on a function
    (_asm(NDARRAY + _t(_shape(10**9)) + pickle.NEWOBJ), "opcode NEWOBJ"),
    (_asm(pickle.EMPTY_DICT), "opcode EMPTY_DICT"),
    (_asm(_g("os", "system")), "global os.system is not allowed"),
    (_asm(_call(FROMBUFFER, _b(bytes(8)), _dtype(), _shape(2, 4), _s("K"), _shape(0, 0))),
     "axis_order"),
    (_asm(pickle.NONE + pickle.BINGET + b"\x07"), "memo index 7 at byte 3 was never set"),
    (_asm(pickle.NONE + pickle.BINBYTES8 + struct.pack("<Q", 1 << 60)), "truncated"),
    (pickle.PROTO + b"\x04" + pickle.NONE, "without STOP"),
], ids=["ndarray-call", "float32", "object", "negative", "too-many-elements", "build-on-function", "newobj", "dict",
        "os.system", "axis-order", "memo-unset", "huge-length", "no-stop"])
def test_malformed_streams_refused_with_a_reason(tmp_path, payload, why):
    p = tmp_path / "bad.pkl"
    p.write_bytes(payload)
    with pytest.raises(DataError, match="bad.pkl") as e:
        load_pickle(p, check_shape=False)
    assert why in str(e.value)


def test_memo_indices_below_the_cap_still_work(tmp_path):
    # a valid pickle may use any memo index below the cap
    a = np.arange(2 * 64 * 64, dtype=np.uint8).reshape(2, 64, 64)
    data = pickle.dumps(a, protocol=2)
    hi = (MEMO_CAP - 1).to_bytes(4, "little")
    data = data.replace(pickle.BINPUT + b"\x00", pickle.LONG_BINPUT + hi, 1).replace(
        pickle.BINGET + b"\x00", pickle.LONG_BINGET + hi)
    (tmp_path / "m.pkl").write_bytes(data)
    assert np.array_equal(load_pickle(tmp_path / "m.pkl"), a)


# --------------------------------------------------------------------------- normal files
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_real_sized_pickles_load_exactly(tmp_path, protocol):
    """A CASIA-B-sized sequence (300 frames: the longest there is < 300) from any layout numpy
    writes, plain and gzipped, and one at the frame cap load bit for bit, as owned C-contiguous
    writeable arrays."""
    rng = np.random.default_rng(protocol)
    a = rng.integers(0, 256, (300, 64, 64), dtype=np.uint8)
    cases = [(arr, gz) for arr in (a, np.asfortranarray(a), a.transpose(0, 2, 1))
             for gz in (False, True)]
    cases.append((rng.integers(0, 256, (MAX_FRAMES, 64, 64), dtype=np.uint8), False))
    for arr, gz in cases:
        data = pickle.dumps(arr, protocol=protocol)
        p = tmp_path / ("x.pkl.gz" if gz else "x.pkl")
        p.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
        b = load_pickle(p)
        assert np.array_equal(b, arr) and b.dtype == np.uint8
        assert b.flags.c_contiguous and b.flags.owndata and b.flags.writeable


def test_bool_arrays_are_canonical(tmp_path):
    # a bool array's byte 7 reads as True (1), never as a non-canonical bool
    (tmp_path / "b.pkl").write_bytes(_numpy_style((4,), bytes([0, 1, 7, 0]), code="b1"))
    b = load_pickle(tmp_path / "b.pkl", check_shape=False)
    assert b.dtype == np.bool_ and b.view(np.uint8).tolist() == [0, 1, 1, 0]
    with pytest.raises(DataError, match="expected dtype uint8"):
        load_pickle(tmp_path / "b.pkl")


def test_frame_cap_is_configurable(tmp_path, monkeypatch):
    a = np.zeros((12, 64, 64), np.uint8)
    save_pickle(tmp_path / "x.pkl.gz", a)
    assert load_pickle(tmp_path / "x.pkl.gz", max_frames=12).shape == (12, 64, 64)
    with pytest.raises(DataError, match="12 frames exceed the cap of max_frames=11"):
        load_pickle(tmp_path / "x.pkl.gz", max_frames=11)
    monkeypatch.setenv("QGAIT_MAX_FRAMES", "11")
    with pytest.raises(DataError, match="max_frames=11"):
        load_pickle(tmp_path / "x.pkl.gz")
    monkeypatch.setenv("QGAIT_MAX_FRAMES", "lots")
    with pytest.raises(ValueError, match="QGAIT_MAX_FRAMES"):
        load_pickle(tmp_path / "x.pkl.gz")
    with pytest.raises(ValueError, match="max_frames"):
        load_pickle(tmp_path / "x.pkl.gz", max_frames=0)


# --------------------------------------------------------------------------- the dataset
@functools.cache
def _bomb() -> bytes:
    return gzip.compress(bytes(60 << 20), compresslevel=9)  # 60 MiB > the default 49 MB cap


def _tree_with_crafted(root):
    rng = np.random.default_rng(0)
    good = []
    for s in ("001", "002"):
        for c in ("nm-01", "nm-02"):
            p = root / s / c / "090" / "090.pkl.gz"
            save_pickle(p, rng.integers(0, 256, (6, 64, 64), dtype=np.uint8))
            good.append(str(p))
    bad = []
    for name in ("stride0", "uninit", "memo_long_binput"):
        p = root / "002" / "bg-01" / "090" / f"{name}.pkl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(CRAFTED[name]())
        bad.append(str(p))
    p = root / "001" / "cl-01" / "090" / "bomb.pkl.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(_bomb())
    bad.append(str(p))
    return good, bad


@pytest.mark.parametrize("preload", [True, False])
def test_dataset_skips_or_names_crafted_files(tmp_path, preload):
    good, bad = _tree_with_crafted(tmp_path)
    if preload:
        with pytest.raises(DataError, match="stride0|uninit|memo|bomb"):
            OpenGaitDataset(tmp_path, progress=False, workers=2)
        with pytest.warns(UserWarning, match="skipped 4"):
            ds = OpenGaitDataset(tmp_path, on_error="skip", progress=False, workers=2)
        assert ds.n_skipped == 4 and sorted(q.path for q in ds.seqs) == sorted(good)
    else:  # read on access: each crafted file raises a DataError naming it when touched
        ds = OpenGaitDataset(tmp_path, preload=False, progress=False)
        by_path = {q.path: i for i, q in enumerate(ds.seqs)}
        for p in bad:
            with pytest.raises(DataError, match=p.rsplit("/", 1)[1]):
                ds.frames(by_path[p])
        assert ds.frames(by_path[good[0]]).shape == (6, 64, 44)


def test_dataset_max_frames_and_memory_error(tmp_path, monkeypatch):
    save_pickle(tmp_path / "001" / "nm-01" / "090" / "a.pkl", np.zeros((9, 64, 64), np.uint8))
    save_pickle(tmp_path / "001" / "nm-02" / "090" / "b.pkl", np.zeros((3, 64, 64), np.uint8))
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = OpenGaitDataset(tmp_path, on_error="skip", progress=False, max_frames=8)
    assert [q.condition for q in ds.seqs] == ["nm-02"]
    with pytest.raises(ValueError, match="max_frames"):
        OpenGaitDataset(tmp_path, max_frames=0, progress=False)
    # a MemoryError while packing (a machine short of memory) is a DataError that skip skips
    import qgait.data.dataset as dataset

    def oom(arr):
        raise MemoryError
    monkeypatch.setattr(dataset, "_pack", oom)
    with pytest.raises(DataError, match="out of memory"):
        OpenGaitDataset(tmp_path, progress=False)
    with pytest.warns(UserWarning, match="skipped 2"), pytest.raises(DataError, match="bad"):
        OpenGaitDataset(tmp_path, on_error="skip", progress=False)
