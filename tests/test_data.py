"""qgait.data: safe pickle loading, the dataset, the P x K sampler, batches, PNG import and the
synthetic generator. Small trees are generated in tmp_path; the real CASIA-B copy in
../shared/data/casia-b/pkl is used when present (skipped otherwise, never copied)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qgait.data import (
    DataError,
    OpenGaitDataset,
    SeqInfo,
    TripletSampler,
    iter_test_batches,
    load_pickle,
    make_train_batch,
    save_pickle,
)

# The project root's sibling shared/ (QGAIT_CASIA_B overrides, e.g. from a git worktree).
REAL = Path(os.environ.get("QGAIT_CASIA_B",
                           Path(__file__).resolve().parents[1].parent / "shared/data/casia-b/pkl"))
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real CASIA-B not found at {REAL}")


def _seq(rng, T):
    """A random uint8 [T, 64, 64] with grey values around the 127 threshold."""
    return rng.integers(0, 256, size=(T, 64, 64), dtype=np.uint8)


def _write_tree(root: Path, subjects, conds=("nm-01", "nm-02", "bg-01"), views=("000", "090"),
                gz=False, seed=0, T=(5, 12)):
    """root/<s>/<c>/<v>/<v>.pkl[.gz] with random content; returns {path: array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in subjects:
        for c in conds:
            for v in views:
                p = root / s / c / v / (f"{v}.pkl.gz" if gz else f"{v}.pkl")
                a = _seq(rng, int(rng.integers(T[0], T[1] + 1)))
                save_pickle(p, a)
                out[str(p)] = a
    return out


# ---------------------------------------------------------------------------------------------
# load_pickle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("gz", [False, True])
def test_load_pickle_roundtrip_every_protocol(tmp_path, protocol, gz):
    a = _seq(np.random.default_rng(protocol), 7)
    data = pickle.dumps(a, protocol=protocol)
    p = tmp_path / ("x.pkl.gz" if gz else "x.pkl")
    p.write_bytes(gzip.compress(data) if gz else data)
    b = load_pickle(p)
    assert b.dtype == np.uint8 and np.array_equal(a, b)


def test_load_pickle_fortran_order(tmp_path):
    a = np.asfortranarray(_seq(np.random.default_rng(1), 3))
    for proto in (4, 5):
        (tmp_path / "f.pkl").write_bytes(pickle.dumps(a, protocol=proto))
        assert np.array_equal(load_pickle(tmp_path / "f.pkl"), a)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("gz", [False, True])
def test_malicious_pickle_refused_and_not_executed(tmp_path, gz):
    marker = tmp_path / "PWNED"
    data = pickle.dumps(_Evil(marker), protocol=4)
    p = tmp_path / ("evil.pkl.gz" if gz else "evil.pkl")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="evil.pkl") as e:
        load_pickle(p)
    assert "not allowed" in str(e.value)
    assert not marker.exists()
    # Sanity of the test itself: a plain unpickler would have run it.
    pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({"a": 1}),                          # not an array (no global needed)
    pickle.dumps(np.zeros((3, 64, 64), np.float32)),  # wrong dtype
    pickle.dumps(np.zeros((3, 64, 44), np.uint8)),    # wrong shape
    pickle.dumps(np.zeros((0, 64, 64), np.uint8)),    # no frames
    pickle.dumps(np.zeros((64, 64), np.uint8)),       # 2-D
    pickle.dumps(np.ma.zeros((3, 64, 64), np.uint8)),  # a subclass: global refused
    pickle.dumps(np.zeros(3, dtype=object)),          # object dtype
    b"",                                              # empty
    b"not a pickle at all",
], ids=["dict", "float", "shape", "T0", "2d", "masked", "object", "empty", "garbage"])
def test_bad_payloads_raise_dataerror_naming_the_file(tmp_path, payload):
    p = tmp_path / "bad_file.pkl"
    p.write_bytes(payload)
    with pytest.raises(DataError, match="bad_file.pkl"):
        load_pickle(p)


def test_truncated_files(tmp_path):
    good = gzip.compress(pickle.dumps(_seq(np.random.default_rng(0), 4)))
    (tmp_path / "t.pkl.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="t.pkl.gz"):
        load_pickle(tmp_path / "t.pkl.gz")
    raw = pickle.dumps(_seq(np.random.default_rng(0), 4))
    (tmp_path / "t.pkl").write_bytes(raw[: len(raw) - 50])
    with pytest.raises(DataError, match="t.pkl"):
        load_pickle(tmp_path / "t.pkl")
    (tmp_path / "e.pkl.gz").write_bytes(b"")
    with pytest.raises(DataError, match="e.pkl.gz"):
        load_pickle(tmp_path / "e.pkl.gz")
    (tmp_path / "n.pkl.gz").write_bytes(raw)  # not gzip at all
    with pytest.raises(DataError, match="n.pkl.gz"):
        load_pickle(tmp_path / "n.pkl.gz")
    with pytest.raises(DataError, match="missing.pkl"):
        load_pickle(tmp_path / "missing.pkl")


# ---------------------------------------------------------------------------------------------
# OpenGaitDataset
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("preload", [True, False])
def test_dataset_reads_binarises_and_crops(tmp_path, gz, preload):
    arrays = _write_tree(tmp_path, ["003", "001", "002"], gz=gz)
    ds = OpenGaitDataset(tmp_path, preload=preload, progress=False)
    assert ds.subjects == ["001", "002", "003"]
    assert len(ds) == 3 * 3 * 2 == len(arrays)
    assert [(q.subject, q.condition, q.view) for q in ds.seqs] == sorted(
        (q.subject, q.condition, q.view) for q in ds.seqs)
    for i, q in enumerate(ds.seqs):
        assert isinstance(q, SeqInfo)
        a = arrays[q.path]
        want = (a[:, :, 10:54] > 127).astype(np.uint8)
        x, label, info = ds[i]
        assert x.dtype == np.uint8 and x.shape == (a.shape[0], 64, 44)
        assert np.array_equal(x, want) and np.array_equal(ds.frames(i), want)
        assert ds.n_frames(i) == a.shape[0]
        assert ds.subjects[label] == q.subject == info.subject
        assert ds.labels.dtype == np.int64 and ds.labels[i] == label
    t = np.array([3, 0, 3, 1])
    assert np.array_equal(ds.frames_at(4, t), ds.frames(4)[t])
    with pytest.raises(IndexError):
        ds.frames(len(ds))


def test_dataset_subject_selection(tmp_path):
    _write_tree(tmp_path, [f"{i:03d}" for i in range(1, 8)], conds=("nm-01",), views=("090",))
    ds = OpenGaitDataset(tmp_path, id_range=("002", "005"), progress=False)
    assert ds.subjects == ["002", "003", "004", "005"]
    assert ds.labels.tolist() == [0, 1, 2, 3]
    ds = OpenGaitDataset(tmp_path, subjects=["007", "001"], progress=False)
    assert ds.subjects == ["001", "007"]
    part = tmp_path.parent / f"{tmp_path.name}_part.json"
    part.write_text(json.dumps({"TRAIN_SET": ["001", "002", "003"], "TEST_SET": ["006", "007",
                                                                                "099"]}))
    assert OpenGaitDataset(tmp_path, partition_json=part, progress=False).subjects == [
        "001", "002", "003"]
    with pytest.warns(UserWarning, match="not in the tree"):
        ds = OpenGaitDataset(tmp_path, partition_json=part, partition="TEST_SET", progress=False)
    assert ds.subjects == ["006", "007"]
    # selectors intersect
    ds = OpenGaitDataset(tmp_path, partition_json=part, id_range=("2", "9"), progress=False)
    assert ds.subjects == ["002", "003"]
    with pytest.raises(DataError, match="no sequences"):
        OpenGaitDataset(tmp_path, id_range=("100", "200"), progress=False)
    with pytest.raises(DataError, match="VAL_SET"):
        OpenGaitDataset(tmp_path, partition_json=part, partition="VAL_SET", progress=False)


def test_dataset_bad_files_raise_or_skip(tmp_path):
    _write_tree(tmp_path, ["001", "002"], conds=("nm-01", "nm-02"), views=("090",), gz=True)
    bad1 = tmp_path / "001" / "nm-02" / "090" / "090.pkl.gz"
    bad1.write_bytes(bad1.read_bytes()[:100])  # truncated
    bad2 = tmp_path / "002" / "nm-01" / "090" / "extra.pkl"
    bad2.write_bytes(pickle.dumps(np.zeros((4, 64, 64), np.int16)))
    with pytest.raises(DataError, match="090.pkl.gz|extra.pkl"):
        OpenGaitDataset(tmp_path, progress=False)
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = OpenGaitDataset(tmp_path, on_error="skip", progress=False)
    assert ds.n_skipped == 2 and len(ds) == 3
    assert str(bad1) not in [q.path for q in ds.seqs]
    # every file of subject 001 but one is fine: labels stay contiguous
    assert ds.subjects == ["001", "002"] and sorted(set(ds.labels.tolist())) == [0, 1]


@needs_real
def test_real_casia_b_sample(tmp_path):
    part = tmp_path / "CASIA-B.json"  # OpenGait's layout; 075-124 are not in the shared copy
    part.write_text(json.dumps({"TRAIN_SET": ["004", "005"],
                                "TEST_SET": [f"{i:03d}" for i in range(75, 125)]}))
    ds = OpenGaitDataset(REAL, partition_json=part, progress=False)
    assert ds.subjects == ["004", "005"]
    # subject 005 has no 000 view upstream; its other 10 views are all present
    assert {q.view for q in ds.seqs if q.subject == "005"} == {f"{v:03d}" for v in range(18, 181, 18)}
    ds = OpenGaitDataset(REAL, id_range=("001", "003"), progress=False)
    assert ds.subjects == ["001", "002", "003"]
    assert len(ds) == 3 * 10 * 11  # all 330 sequences of 001-003 (10 walks x 11 views) are present
    for i in (0, len(ds) // 2, len(ds) - 1):
        x, _, q = ds[i]
        raw = load_pickle(q.path)
        assert x.shape == (raw.shape[0], 64, 44) and set(np.unique(x)) <= {0, 1}
        assert np.array_equal(x, (raw[:, :, 10:54] > 127))
        # crop drops only empty margins (silhouettes are centred and ~20-30 px wide)
        assert 0.05 < x.mean() < 0.5
    conds = {q.condition for q in ds.seqs}
    assert conds == {f"nm-0{i}" for i in range(1, 7)} | {"bg-01", "bg-02", "cl-01", "cl-02"}


@needs_real
def test_real_casia_b_full_load_time():
    t0 = time.perf_counter()
    ds = OpenGaitDataset(REAL, progress=False)
    dt = time.perf_counter() - t0
    frames = int(sum(ds.n_frames(i) for i in range(len(ds))))
    print(f"\nreal CASIA-B: {len(ds)} sequences, {frames} frames, {len(ds.subjects)} subjects "
          f"loaded in {dt:.2f} s; {ds.nbytes / 2**20:.1f} MiB packed")
    assert ds.n_skipped == 0 and len(ds.subjects) == 74
    assert ds.nbytes == frames * 352


# ---------------------------------------------------------------------------------------------
# TripletSampler
# ---------------------------------------------------------------------------------------------
def _labels():
    rng = np.random.default_rng(0)
    # 12 identities with 1..9 sequences each, shuffled
    lab = np.concatenate([np.full(rng.integers(1, 10), j) for j in range(12)])
    return rng.permutation(lab)


def test_sampler_p_identities_times_k():
    lab = _labels()
    counts = np.bincount(lab)
    s = TripletSampler(lab, P=5, K=4, seed=3)
    for _, b in zip(range(50), s):
        assert len(b) == 20
        ids = lab[b].reshape(5, 4)
        assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 5
        for row, idx in zip(ids[:, 0], np.reshape(b, (5, 4))):
            if counts[row] >= 4:  # without replacement when possible
                assert len(set(idx)) == 4


def test_sampler_deterministic_and_resumable():
    lab = _labels()
    a = [b for _, b in zip(range(20), TripletSampler(lab, 4, 3, seed=7))]
    b = [b for _, b in zip(range(20), TripletSampler(lab, 4, 3, seed=7))]
    c = [b for _, b in zip(range(20), TripletSampler(lab, 4, 3, seed=8))]
    assert a == b and a != c
    s = TripletSampler(lab, 4, 3, seed=7)
    it = iter(s)
    for _ in range(8):
        next(it)
    state = s.state_dict()
    s2 = TripletSampler(lab, 4, 3, seed=7)
    s2.load_state_dict(state)
    assert [x for _, x in zip(range(12), s2)] == a[8:]
    with pytest.raises(ValueError, match="seed"):
        TripletSampler(lab, 4, 3, seed=9).load_state_dict(state)


def test_sampler_rank_shards_disjoint():
    lab = _labels()
    ws = 3
    samplers = [TripletSampler(lab, 4, 2, seed=1, rank=r, world_size=ws) for r in range(ws)]
    for step in range(30):
        shards = [s.batch(step) for s in samplers]
        ids = [set(lab[sh]) for sh in shards]
        assert all(len(x) == 4 for x in ids)
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    with pytest.raises(ValueError, match="identities"):
        TripletSampler(lab, 5, 2, world_size=3)  # 15 > 12 identities
    with pytest.raises(ValueError, match="rank"):
        TripletSampler(lab, 2, 2, rank=3, world_size=3)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def test_make_train_batch(tmp_path):
    _write_tree(tmp_path, ["001", "002"], T=(5, 40))
    ds = OpenGaitDataset(tmp_path, progress=False)
    idx = list(range(len(ds)))
    x, y = make_train_batch(ds, idx, frames=30, rng=np.random.default_rng(0))
    assert x.shape == (len(ds), 1, 30, 64, 44) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == ds.labels.tolist()
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    for n, i in enumerate(idx):  # every sampled frame is a frame of its own sequence
        f = torch.from_numpy(ds.frames(i)).float().flatten(1)
        d = torch.cdist(x[n, 0].flatten(1), f)
        assert (d.min(dim=1).values == 0).all()
        if ds.n_frames(i) >= 30:  # without replacement: 30 distinct source frames
            assert len(set(d.argmin(dim=1).tolist())) == 30
    x2, _ = make_train_batch(ds, idx, frames=30, rng=np.random.default_rng(0))
    assert torch.equal(x, x2)


def test_iter_test_batches(tmp_path):
    _write_tree(tmp_path, ["001", "002"], T=(20, 60))
    ds = OpenGaitDataset(tmp_path, progress=False)
    seen = []
    for x, seqL, idx in iter_test_batches(ds, max_frames=100):
        assert x.dtype == torch.float32 and x.shape == (1, 1, sum(seqL), 64, 44)
        assert len(seqL) == len(idx) and (sum(seqL) <= 100 or len(idx) == 1)
        starts = np.cumsum([0] + seqL)
        for j, i in enumerate(idx):
            assert seqL[j] == ds.n_frames(i)
            assert torch.equal(x[0, 0, starts[j]:starts[j + 1]],
                               torch.from_numpy(ds.frames(i)).float())
        seen += idx
    assert seen == list(range(len(ds)))
    # a sequence longer than max_frames goes alone
    batches = list(iter_test_batches(ds, [0, 1, 2], max_frames=10))
    assert [b[2] for b in batches] == [[0], [1], [2]]


# ---------------------------------------------------------------------------------------------
# preprocessing, synthetic generator, PNG import
# ---------------------------------------------------------------------------------------------
def test_normalise_frame_rectangle_and_centroid():
    from qgait.data.preprocess import normalise_frame, resize_weights

    img = np.zeros((100, 90), np.uint8)
    img[20:52, 10:18] = 255  # a 32 x 8 block: height 64 -> width 16, centred
    out = normalise_frame(img)
    want = np.zeros((64, 64), np.uint8)
    want[:, 24:40] = 255
    assert np.array_equal(out, want)
    # the mass-half column is the centre: a heavy right part pulls the person left
    img = np.zeros((64, 64), np.uint8)
    img[:, 20:24] = 255
    img[:, 30:50] = 255  # half of the 24 columns' mass is reached 8 columns into this part
    out = normalise_frame(img)
    assert np.flatnonzero(out.any(axis=0)).tolist() == list(range(14, 18)) + list(range(24, 44))
    assert normalise_frame(np.zeros((10, 10), np.uint8)) is None
    w = resize_weights(37, 64)
    assert np.allclose(w.sum(axis=1), 1) and (w >= 0).all()


def _syn_tree(root, seed=0, workers=1, **kw):
    from qgait.data import synthetic

    args = {"n_subjects": 3, "views": ("000", "090"),
            "conditions": ("nm-01", "nm-02", "bg-01", "cl-01"), "frames": (12, 20),
            "seed": seed, "workers": workers, "progress": False}
    args.update(kw)
    return synthetic.generate(root, **args)


def _tree_bytes(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.pkl"))}


def test_synthetic_tree_deterministic_and_loadable(tmp_path):
    stats = _syn_tree(tmp_path / "a", workers=1)
    _syn_tree(tmp_path / "b", workers=2)
    _syn_tree(tmp_path / "c", seed=1)
    _syn_tree(tmp_path / "z", gzip=True)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    z = {str(p.relative_to(tmp_path / "z")): p for p in (tmp_path / "z").rglob("*.pkl.gz")}
    assert {k + ".gz" for k in a} == z.keys()
    assert all(gzip.decompress(z[k + ".gz"].read_bytes()) == a[k] for k in a)
    assert len(a) == stats["sequences"] == 3 * 2 * 4
    assert a == b  # same seed, any worker count: same bytes
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    ds = OpenGaitDataset(tmp_path / "a", progress=False)
    assert ds.subjects == ["001", "002", "003"]
    assert {q.condition for q in ds.seqs} == {"nm-01", "nm-02", "bg-01", "cl-01"}
    assert sum(ds.n_frames(i) for i in range(len(ds))) == stats["frames"]
    for i in range(len(ds)):
        x = ds.frames(i)
        assert 12 <= x.shape[0] <= 20
        # every frame is a normalised person: touches the top and bottom rows, centred
        assert x[:, 0].any(axis=1).all() and x[:, -1].any(axis=1).all()
        assert 0.1 < x.mean() < 0.45


def test_synthetic_identities_differ_and_are_recoverable():
    """Gait energy images: nearest neighbour recognises identities in the same view well
    above chance, and worse across views (the task is learnable, and the view matters)."""
    from qgait.data.synthetic import generate_sequence

    n = 8

    def gei(s, c, v):
        return (generate_sequence(5, s, c, v, frames=(40, 40)) > 127)[:, :, 10:54].mean(0)

    gal = {v: np.stack([gei(s, "nm-01", v) for s in range(n)]) for v in ("090", "000")}
    probe = np.stack([gei(s, "nm-02", "090") for s in range(n)])
    assert np.abs(gal["090"][0] - gal["090"][1]).mean() > 0.01  # identities differ

    def rank1(g):
        d = ((probe[:, None] - g[None]) ** 2).sum(axis=(2, 3))
        return (d.argmin(axis=1) == np.arange(n)).mean()

    same, cross = rank1(gal["090"]), rank1(gal["000"])
    assert same >= 0.5 > 1 / n
    assert cross < same


def test_synthetic_preview(tmp_path):
    pytest.importorskip("matplotlib")
    from qgait.data import synthetic

    _syn_tree(tmp_path / "t", conditions=("nm-01", "cl-01"))
    out = synthetic.preview(tmp_path / "t", tmp_path / "p.png", subjects=2, frames=4,
                            conditions=("nm-01", "cl-01"), views=("000", "090"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_bad_arguments(tmp_path):
    from qgait.data import synthetic

    with pytest.raises(ValueError, match="condition"):
        synthetic.generate(tmp_path, n_subjects=1, conditions=("xx-01",), progress=False)
    with pytest.raises(ValueError, match="views"):
        synthetic.generate(tmp_path, n_subjects=1, views=("90",), progress=False)
    with pytest.raises(ValueError, match="frames"):
        synthetic.generate_sequence(0, 0, "nm-01", "090", frames=(5, 2))


def test_import_png(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="import-png needs Pillow")
    from qgait.data.import_png import import_png, main

    src = tmp_path / "png"
    rng = np.random.default_rng(0)
    truth = {}
    for s, c, v in [("001", "nm-01", "090"), ("001", "bg-01", "000"), ("002", "nm-01", "090")]:
        d = src / s / c / v
        d.mkdir(parents=True)
        tops = []
        for t in range(6):
            img = np.zeros((120, 160), np.uint8)
            if t != 2:  # frame 2 is empty and must be dropped
                top, h, left = int(rng.integers(5, 30)), int(rng.integers(60, 85)), \
                    int(rng.integers(10, 120))
                img[top:top + h, left:left + h // 4] = 255  # a block 1:4 wide
                img[top:top + 6, left - 3:left + h // 4 + 3] = 255  # "shoulders"
                tops.append(t)
            Image.fromarray(img).save(d / f"{s}-{c}-{v}-{t:03d}.png")
        truth[(s, c, v)] = len(tops)
    empty = src / "002" / "cl-01" / "090"
    empty.mkdir(parents=True)
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(empty / "a.png")
    (src / "001" / "nm-01" / "090" / "zz-broken.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="no usable frame"):
        stats = import_png(src, tmp_path / "pkl", workers=2, progress=False)
    assert stats["sequences"] == 3 and stats["empty"] == 1 and stats["unreadable"] == 1
    ds = OpenGaitDataset(tmp_path / "pkl", progress=False)
    assert len(ds) == 3 and ds.subjects == ["001", "002"]
    for q in ds.seqs:
        raw = load_pickle(q.path)
        assert raw.shape == (truth[(q.subject, q.condition, q.view)], 64, 64)
        assert raw[:, 0].any(axis=1).all() and raw[:, -1].any(axis=1).all()
        cols = np.flatnonzero(raw.any(axis=(0, 1)))
        assert 20 <= cols[0] and cols[-1] <= 44  # centred, ~16 + shoulders wide
    # the CLI writes the same bytes, gzip-compressed when asked
    with pytest.warns(UserWarning, match="no usable frame"):
        assert main([str(src), str(tmp_path / "cli"), "--workers", "1", "--gzip",
                     "--no-progress"]) == 0
    for q in ds.seqs:
        rel = Path(q.path).relative_to(tmp_path / "pkl")
        assert np.array_equal(load_pickle(tmp_path / "cli" / (str(rel) + ".gz")),
                              load_pickle(q.path))


def test_gei_rank1_baseline(tmp_path):
    """A tree whose rank-1 is known by construction. Subject i's silhouette is a bar at a
    column of its own, pat(i); in view 090 it shows pat(i), in view 000 pat(sigma(i)) with
    sigma swapping subjects 0<->1 and 2<->3 (4 and 5 look the same in both views). Bags add a
    block away from every bar (distances shift equally: rankings unchanged); clothes show the
    next subject's bar, pat(i + 1), in both views. Hence, with 6 subjects:

    * NM, BG: same view 100; cross view: only the 2 fixed subjects of sigma match: 33.3.
    * CL: in view 090, pat(i + 1) matches subject i + 1: 0; in view 000, the gallery subject
      showing pat(i + 1) is sigma(i + 1), which is i for i = 0 and 2 only: 33.3. Same view
      and cross view (the other view's gallery) both average 0 and 33.3: 16.7."""
    from qgait.data.baseline import gei_rank1

    n = 6
    sigma = [1, 0, 3, 2, 4, 5]

    def pat(k, bag=False):
        a = np.zeros((4, 64, 64), np.uint8)
        a[:, 0:40, 12 + 4 * k:15 + 4 * k] = 255  # inside the 10..54 crop
        if bag:
            a[:, 50:60, 40:50] = 255
        return a

    for i in range(n):
        for v in ("000", "090"):
            shown = i if v == "090" else sigma[i]
            for c in ("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06"):
                save_pickle(tmp_path / f"{i + 1:03d}" / c / v / f"{v}.pkl", pat(shown))
            for c in ("bg-01", "bg-02"):
                save_pickle(tmp_path / f"{i + 1:03d}" / c / v / f"{v}.pkl", pat(shown, bag=True))
            for c in ("cl-01", "cl-02"):
                save_pickle(tmp_path / f"{i + 1:03d}" / c / v / f"{v}.pkl", pat((i + 1) % n))
    r = gei_rank1(OpenGaitDataset(tmp_path, progress=False))
    assert r["NM"] == {"same_view": 100.0, "cross_view": pytest.approx(100 * 2 / 6)}
    assert r["BG"] == {"same_view": 100.0, "cross_view": pytest.approx(100 * 2 / 6)}
    assert r["CL"] == {"same_view": pytest.approx(100 / 6), "cross_view": pytest.approx(100 / 6)}
    # a condition without probes is NaN, not 0
    r = gei_rank1(OpenGaitDataset(tmp_path, progress=False),
                  probes={"XX": ("xx-01",), "NM": ("nm-05",)})
    assert np.isnan(r["XX"]["same_view"]) and r["NM"]["same_view"] == 100.0
