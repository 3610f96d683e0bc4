"""qgait.model_io: every model file reads back with weights_only=True and rebuilds the same
model; a file that would run code is refused (and nothing runs); files of older qgait
versions load only with the explicit opt-in."""
import builtins
import copy
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from gait_fakes import FakeGaitDataset
from qgait import model_io
from qgait.model_io import ModelFileError, load_model, save_model
from qgait.models import build_model
from qgait.pipeline.stages import quantize_model
from qgait.quant import convert
from qgait.train import build_trainer, load_config
from qgait.train.config import DEFAULTS


def _x(seed=0, frames=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, frames, 64, 44, generator=g) > 0.5).float()


def _embed(model, x):
    with torch.no_grad():
        return model(x)["embeddings"]


@pytest.fixture(scope="module")
def models():
    """fp, fake-quant (W4A4, steps initialised, BN statistics moved) and packed GaitLite3D."""
    torch.manual_seed(0)
    fp = build_model("GaitLite3D", num_classes=5, width=0.25, embed_dim=24)
    fq = quantize_model(copy.deepcopy(fp), dict(DEFAULTS["quant"], w_bits=4, a_bits=4))
    fq.train()
    fq(_x(1))          # initialises the steps, moves the BatchNorm statistics
    fq.eval()
    packed = convert(copy.deepcopy(fq))
    return {"fp": fp.eval(), "fakequant": fq, "packed": packed}


@pytest.mark.parametrize("kind", ["fp", "fakequant", "packed"])
def test_round_trip_path_bytes_and_stream(models, kind, tmp_path):
    model = models[kind]
    x = _x(2)
    ref = _embed(model, x)
    cfg = {"stage": "soft", "model": {"width": 0.25}}
    path = tmp_path / f"{kind}.pt"
    header = save_model(model, path, {"note": "test", "rank1": [1.5, 2]}, config=cfg)
    assert header["kind"] == kind and header["format_version"] == model_io.FORMAT_VERSION
    json.dumps(header)  # everything but the tensors is JSON
    assert os.listdir(tmp_path) == [f"{kind}.pt"]  # atomic: no temporary file left
    # the file is plain data: torch's weights-only unpickler reads it
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "qgait-model" and raw["kind"] == kind
    data = path.read_bytes()
    for src in (path, str(path), data, io.BytesIO(data)):
        loaded, info = load_model(src)
        assert info["kind"] == kind and info["meta"] == {"note": "test", "rank1": [1.5, 2]}
        assert info["config"] == cfg and info["file"] == "model"
        assert type(loaded) is type(model) and not loaded.training
        assert torch.equal(_embed(loaded, x), ref)  # same integers / weights: bit-exact
    loaded, info = load_model(model_io.model_to_bytes(model, {"a": 1}))
    assert info["meta"] == {"a": 1} and info["config"] is None
    assert torch.equal(_embed(loaded, x), ref)


@pytest.mark.parametrize("kind", ["fp", "fakequant", "packed"])
def test_model_without_classifier_round_trips_with_the_same_embeddings(models, kind):
    # what the zoo ships: the training-only classifier dropped, embeddings bit-identical
    model = copy.deepcopy(models[kind])
    x = _x(3)
    ref = _embed(model, x)
    full = len(model_io.model_to_bytes(model))
    model.drop_classifier()
    assert model.head is None and model.arch["num_classes"] == 0
    data = model_io.model_to_bytes(model)
    assert len(data) < full
    loaded, info = load_model(data)
    assert info["kind"] == kind and loaded.arch["num_classes"] == 0
    assert not any(k.startswith("head.") for k in loaded.state_dict())
    assert torch.equal(_embed(loaded, x), ref)
    assert loaded(x)["logits"] is None


def test_packed_rebuild_keeps_layer_structure(models):
    packed = models["packed"]
    loaded, _ = load_model(model_io.model_to_bytes(packed))
    want = {n: (type(m).__name__, getattr(m, "act", None), getattr(m, "out_scale", None)
                is not None) for n, m in packed.named_modules()}
    got = {n: (type(m).__name__, getattr(m, "act", None), getattr(m, "out_scale", None)
               is not None) for n, m in loaded.named_modules()}
    assert got == want
    assert sum(t == "PackedConv3d" for t, _, _ in got.values()) == 6
    assert any(a == "leaky_relu" for _, a, _ in got.values())   # BN + activation folded
    for k, v in packed.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_save_model_needs_a_qgait_model_and_json_meta(models, tmp_path):
    with pytest.raises(TypeError, match="build_model"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="meta must be JSON"):
        save_model(models["fp"], tmp_path / "y.pt", {"t": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    ds = FakeGaitDataset(n_subjects=4, conds=["nm-01", "nm-02"], views=["000", "090"], frames=8)
    cfg = load_config(None, {"data": {"P": 2, "K": 2, "frames": 6, "prefetch": 1},
                             "model": {"width": 0.25}, "sched": {"warmup": 1},
                             "train": {"iterations": 2, "out_dir": str(out), "progress": False,
                                       "ckpt_every": 0, "amp": "none", "threads": 1}})
    tr = build_trainer(cfg, ds)
    tr.train()
    tr.batches.close()
    return out / "last.pt", tr


def test_trainer_checkpoint_is_weights_only(checkpoint):
    path, tr = checkpoint
    ck = torch.load(path, weights_only=True)   # rng / sampler / optimizer: plain data
    assert ck["format"] == "qgait-checkpoint" and ck["format_version"] == 1
    assert ck["step"] == 2 and isinstance(ck["rng"]["numpy"]["keys"], torch.Tensor)
    model, info = load_model(path)
    assert info["file"] == "checkpoint" and info["kind"] == "fp" and info["step"] == 2
    for k, v in tr.unwrapped.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a model file carries no optimizer: it is not a checkpoint to resume from
    mf = path.with_name("model.pt")
    save_model(model, mf)
    with pytest.raises(ModelFileError, match="not a training checkpoint"):
        model_io.load_checkpoint(mf)


def test_rng_state_round_trip():
    from qgait.train.trainer import rng_state, set_rng_state
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    st = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    # the numpy tuple of a qgait 0.1 checkpoint is still accepted
    set_rng_state({"python": st["python"], "numpy": np.random.get_state(),
                   "torch": st["torch"]})


class _Marker:
    """Unpickling this creates a file: the marker of code run by a model file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _crafted(tmp_path):
    marker = tmp_path / "MARKER"
    zipped = tmp_path / "evil.pt"
    torch.save({"format": "qgait-model", "config": {}, "model": {"x": _Marker(marker)}}, zipped)
    raw = tmp_path / "evil.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"config": {}, "model": _Marker(marker)}, f)
    return marker, zipped, raw


def test_crafted_files_are_refused_and_nothing_runs(tmp_path):
    marker, zipped, raw = _crafted(tmp_path)
    readers = (load_model, model_io.load_checkpoint, model_io.load_weights,
               model_io.read_header)
    for path in (zipped, raw):
        for read in readers:
            with pytest.raises(ModelFileError) as e:
                read(path)
            msg = str(e.value)
            assert str(path) in msg and "--trust-legacy-file" in msg and "\n" not in msg
            assert "refused" in msg and "open" in msg   # what it would have imported
        with pytest.raises(ModelFileError, match="refused"):
            load_model(path.read_bytes())
    assert not marker.exists()


def test_legacy_files_load_only_with_the_opt_in(models, checkpoint, tmp_path):
    # qgait 0.1: `qgait convert` pickled the whole packed module; checkpoints held numpy RNG
    packed = models["packed"]
    old_module = copy.deepcopy(packed)
    del old_module.arch     # qgait 0.1 models had none
    legacy_packed = tmp_path / "packed_old.pt"
    cfg = {"stage": "soft", "model": {"width": 0.25, "embed_dim": 24, "scale": 16.0}}
    torch.save({"model": old_module, "config": cfg, "format": "qgait-packed-1"}, legacy_packed)
    path, _ = checkpoint
    ck = torch.load(path, weights_only=True)
    ck["rng"]["numpy"] = np.random.get_state()
    for k in ("format", "format_version", "qgait_version"):
        ck.pop(k)
    legacy_ckpt = tmp_path / "last_old.pt"
    torch.save(ck, legacy_ckpt)
    x = _x(3)
    for f in (legacy_packed, legacy_ckpt):
        with pytest.raises(ModelFileError, match="--trust-legacy-file"):
            load_model(f)
    m, info = load_model(legacy_packed, trust_legacy=True)
    assert info["kind"] == "packed" and info["legacy"]
    assert torch.equal(_embed(m, x), _embed(packed, x))
    # re-saved in the current format, it loads without the opt-in (docs/model_files.md)
    save_model(m, tmp_path / "packed_new.pt", config=info["config"])
    m2, info2 = load_model(tmp_path / "packed_new.pt")
    assert info2["kind"] == "packed" and torch.equal(_embed(m2, x), _embed(packed, x))
    with model_io.trusting_legacy_files():
        m, info = load_model(legacy_ckpt)
    assert info["file"] == "checkpoint" and info["step"] == 2
    with pytest.raises(ModelFileError, match="--trust-legacy-file"):
        load_model(legacy_ckpt)   # the context ended: refused again
    # upgrade_file: both re-written in the current format, readable with weights_only=True
    assert model_io.upgrade_file(legacy_ckpt, tmp_path / "ck_new.pt") == "checkpoint"
    assert model_io.upgrade_file(legacy_packed, tmp_path / "pk_new.pt") == "model"
    new = torch.load(tmp_path / "ck_new.pt", weights_only=True)
    assert new["format"] == "qgait-checkpoint" and new["step"] == 2
    from qgait.train.trainer import set_rng_state
    set_rng_state(new["rng"])
    assert load_model(tmp_path / "pk_new.pt")[1]["kind"] == "packed"


def test_unusable_files_name_the_file(models, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelFileError, match=f"{missing}: no such file"):
        load_model(missing)
    with pytest.raises(ModelFileError, match="is a folder"):
        load_model(tmp_path)
    good = tmp_path / "good.pt"
    save_model(models["fp"], good)
    data = good.read_bytes()
    for n, cut in enumerate((len(data) // 2, len(data) - 7, 10, 0)):
        bad = tmp_path / f"trunc{n}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=f"{bad}: cannot read it"):
            load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match=f"{other}: not a qgait model or checkpoint"):
        load_model(other)
    newer = tmp_path / "newer.pt"
    raw = torch.load(good, weights_only=True)
    torch.save(dict(raw, format_version=99), newer)
    with pytest.raises(ModelFileError, match="newer qgait"):
        load_model(newer)
    damaged = tmp_path / "damaged.pt"
    sd = dict(raw["state_dict"])
    sd.pop(next(iter(sd)))
    torch.save(dict(raw, state_dict=sd), damaged)
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_model(damaged)


def test_load_weights_kinds(models, checkpoint, tmp_path):
    path, _ = checkpoint
    assert model_io.load_weights(path)[1] == "fp"
    f = tmp_path / "fq.pt"
    save_model(models["fakequant"], f)
    sd, kind = model_io.load_weights(f)
    assert kind == "fakequant" and "stem.0.w_scale" in sd
    p = tmp_path / "packed.pt"
    save_model(models["packed"], p)
    with pytest.raises(ModelFileError, match="cannot start training"):
        model_io.load_weights(p)
    plain = tmp_path / "sd.pt"
    torch.save(models["fp"].state_dict(), plain)
    assert model_io.load_weights(plain)[1] == "fp"
