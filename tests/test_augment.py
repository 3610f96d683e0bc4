"""SilhouetteAugment: exact geometry, per-sequence consistency, determinism, and its wiring
into the training batches and configs."""
import numpy as np
import pytest
import torch

from gait_fakes import FakeGaitDataset
from qgait.data.augment import SilhouetteAugment, warp
from qgait.train import build_trainer, load_config
from qgait.train.data import TrainBatches


def walker(T=6, H=64, W=44, seed=0):
    """A blob that moves: T different {0, 1} frames, off-centre so flips and warps show."""
    rng = np.random.default_rng(seed)
    x = np.zeros((T, H, W), np.float32)
    for t in range(T):
        x[t, 8 + t:50 + t, 12:26] = 1
        x[t, 30:40, 5 + t:12 + t] = 1
    return np.maximum(x, rng.random((T, H, W)) > 0.97).astype(np.float32)


# ----------------------------------------------------------------------------- geometry
def test_warp_identity_and_exact_geometry():
    x = walker()
    assert np.array_equal(warp(x, 0.0), x)
    sq = walker(T=3, H=21, W=21)
    for k in (1, 2, 3):   # multiples of 90 degrees on a square frame are exact
        assert np.array_equal(warp(sq, 90.0 * k), np.rot90(sq, k, axes=(1, 2)))
    # integer shifts: a translation with zeros coming in
    s = warp(x, 0.0, 1.0, ty=3, tx=-2)
    ref = np.zeros_like(x)
    ref[:, 3:, :-2] = x[:, :-3, 2:]
    assert np.array_equal(s, ref)
    # scale 2 about the centre: the central pixel stays, a corner leaves the frame
    big = warp(sq, 0.0, 2.0)
    assert big[:, 10, 10].tolist() == sq[:, 10, 10].tolist()
    with pytest.raises(ValueError, match="scale"):
        warp(x, 0.0, 0.0)


@pytest.mark.parametrize("kind", ["flip", "affine", "erase"])
def test_each_transform_is_per_sequence_and_binary(kind):
    """One draw per sequence: identical input frames stay identical after the transform, and
    {0, 1} stays {0, 1}."""
    frame = walker(T=1)[0]
    clip = np.repeat(frame[None], 7, axis=0)
    aug = SilhouetteAugment(**{kind: 1.0})
    rng = np.random.default_rng(3)
    changed = 0
    for _ in range(10):
        out = aug(clip, rng)
        assert out.shape == clip.shape and out.dtype == clip.dtype
        assert set(np.unique(out)) <= {0.0, 1.0}
        assert all(np.array_equal(out[0], out[t]) for t in range(7))
        changed += not np.array_equal(out, clip)
    assert changed >= 8
    if kind == "flip":
        assert np.array_equal(aug(clip, rng), clip[:, :, ::-1])
    if kind == "erase":   # only removes pixels, and hits the walker
        out = aug(clip, np.random.default_rng(0))
        assert (out <= clip).all() and out.sum() < clip.sum()


def test_erase_rectangle_size_and_moving_walker():
    x = walker()
    aug = SilhouetteAugment(erase=1.0, erase_area=(0.05, 0.05))
    out = aug(x, np.random.default_rng(1))
    gone = (x == 1) & (out == 0)
    assert gone.any() and ((x == 0) | (out == x) | gone).all()
    # the erased region is one rectangle shared by all frames: where any frame lost a pixel,
    # every frame is 0
    region = gone.any(axis=0)
    assert (out[:, region] == 0).all()
    ys, xs = np.nonzero(region)
    assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) <= round(0.05 * 64 * 44) * 1.3


def test_disabled_is_identity_and_draws_are_deterministic():
    x = walker()
    off = SilhouetteAugment()
    assert not off.enabled and np.array_equal(off(x, np.random.default_rng(0)), x)
    aug = SilhouetteAugment(flip=0.5, affine=0.5, erase=0.5)
    a = [aug(x, r) for r in [np.random.default_rng(9)] for _ in range(6)]
    b = [aug(x, r) for r in [np.random.default_rng(9)] for _ in range(6)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("kwargs, msg", [
    ({"flip": 1.5}, "flip is a probability"),
    ({"erase": -0.1}, "erase is a probability"),
    ({"rotate": -1}, "rotate must be >= 0"),
    ({"scale": 1.0}, "scale must be < 1"),
    ({"erase_area": (0.2, 0.1)}, "erase_area"),
])
def test_bad_parameters_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SilhouetteAugment(**kwargs)


def test_bad_clip_and_unknown_key():
    with pytest.raises(ValueError, match=r"SilhouetteAugment: expected a clip \[T, H, W\]"):
        SilhouetteAugment(flip=1)(np.zeros((2, 1, 64, 44)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown keys"):
        SilhouetteAugment.from_config({"flipp": 0.5})


# ----------------------------------------------------------------------------- wiring
@pytest.fixture(scope="module")
def fake():
    return FakeGaitDataset(n_subjects=4, conds=["nm-01", "nm-02"], views=["000", "090"],
                           frames=10)


def test_batches_change_only_by_the_augmentation(fake):
    aug = SilhouetteAugment(flip=0.5, affine=0.5, erase=0.5)
    plain = TrainBatches(fake, 2, 2, 6, prefetch=0)
    augd = TrainBatches(fake, 2, 2, 6, prefetch=0, augment=aug)
    for step in range(4):
        (x0, l0), (x1, l1) = plain.build(step), augd.build(step)
        assert torch.equal(l0, l1)             # same identities, same clips drawn
        idx = plain.sampler.batch(step)
        rng = np.random.default_rng([0, 2, 0, step])
        for n in range(x0.shape[0]):           # each sequence is its own clip's augmentation
            assert np.array_equal(x1[n, 0].numpy(), aug(x0[n, 0].numpy(), rng)), (step, idx)
    # the prefetching thread yields the same batches
    pre = TrainBatches(fake, 2, 2, 6, prefetch=2, augment=aug)
    try:
        for step in range(3):
            s, x, _ = next(pre)
            assert s == step and torch.equal(x, augd.build(step)[0])
    finally:
        pre.close()


def test_config_reaches_the_trainer(fake, tmp_path):
    cfg = load_config(None, {"data": {"P": 2, "K": 2, "frames": 6, "prefetch": 0,
                                      "augment": {"flip": 1.0, "erase": 0.3}},
                             "model": {"width": 0.25},
                             "train": {"iterations": 1, "out_dir": str(tmp_path),
                                       "progress": False, "amp": "none", "threads": 1}})
    tr = build_trainer(cfg, fake)
    try:
        assert tr.batches.augment == SilhouetteAugment(flip=1.0, erase=0.3)
    finally:
        tr.batches.close()
    with pytest.raises(ValueError, match="flip is a probability"):
        load_config(None, {"data": {"augment": {"flip": 2}}})
