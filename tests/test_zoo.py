"""qgait.zoo: shipped models (checksum, safe load, reference embedding) and zoo:NAME everywhere."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qgait import zoo
from qgait.model_io import load_any, save_model
from qgait.models import build_model

REPO = Path(__file__).resolve().parent.parent


def _model(width=0.25):
    torch.manual_seed(0)
    return build_model("GaitLite3D", num_classes=5, width=width).eval()


@pytest.fixture()
def tmp_zoo(tmp_path):
    d = tmp_path / "zoo"
    f = tmp_path / "m.qgm"
    save_model(_model(), f, meta={"note": "test"})
    card = tmp_path / "card.md"
    card.write_text("# tiny\n")
    e = zoo.add("tiny-fp", f, card, zoo_dir=d)
    return d, e


def test_reference_sequence_is_fixed_binary_walker():
    x = zoo.reference_sequence()
    assert x.shape == (1, 1, 40, 64, 44) and set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, zoo.reference_sequence())
    assert 0.03 < float(x.mean()) < 0.5


def test_added_model_loads_verifies_and_is_listed(tmp_zoo):
    d, e = tmp_zoo
    assert zoo.list_models(d) == ["tiny-fp"] and e["kind"] == "fp"
    idx = json.loads((d / "index.json").read_text())
    assert idx["models"]["tiny-fp"]["sha256"] == e["sha256"]
    model, info = zoo.load("zoo:tiny-fp", zoo_dir=d)
    assert info["zoo"]["name"] == "tiny-fp" and info["meta"]["note"] == "test"
    r = zoo.verify("tiny-fp", zoo_dir=d)
    assert r["max_rel_diff"] <= zoo.REF_RTOL
    assert zoo.card("tiny-fp", zoo_dir=d) == "# tiny\n"


def test_damaged_or_swapped_file_fails_its_checksum(tmp_zoo):
    d, _ = tmp_zoo
    f = d / "tiny-fp.qgm"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="tiny-fp.qgm.*damaged or replaced"):
        zoo.load("tiny-fp", zoo_dir=d)


@pytest.mark.parametrize("shift", [0.05, 0.01])
def test_other_weights_fail_the_reference_embedding(tmp_zoo, tmp_path, shift):
    d, _ = tmp_zoo
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(shift)
    save_model(other, d / "tiny-fp.qgm")
    idx = json.loads((d / "index.json").read_text())       # a consistent index, wrong weights
    from qgait.model_io import file_sha256
    idx["models"]["tiny-fp"]["sha256"] = file_sha256(d / "tiny-fp.qgm")
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(zoo.ZooError, match="reference embedding differs"):
        zoo.verify("tiny-fp", zoo_dir=d)


def test_unknown_name_lists_what_is_there(tmp_zoo):
    d, _ = tmp_zoo
    with pytest.raises(zoo.ZooError, match=r"zoo:nope: no such model .*available: tiny-fp"):
        zoo.load("zoo:nope", zoo_dir=d)


def test_zoo_name_through_load_any_and_the_cli(tmp_zoo, tmp_path):
    d, _ = tmp_zoo
    env = {**os.environ, "QGAIT_ZOO_DIR": str(d)}
    os.environ["QGAIT_ZOO_DIR"] = str(d)
    try:
        model, info = load_any("zoo:tiny-fp")
        assert info["kind"] == "fp"
    finally:
        del os.environ["QGAIT_ZOO_DIR"]
    seq = tmp_path / "seq.pkl"
    import pickle
    import numpy as np
    x = np.zeros((40, 64, 64), np.uint8)           # OpenGait's 64 x 64 frames, cropped by qgait
    x[:, :, 10:54] = zoo.reference_sequence()[0, 0].numpy() * 255
    seq.write_bytes(pickle.dumps(x))
    out = tmp_path / "e.npy"
    r = subprocess.run([sys.executable, "-m", "qgait.cli", "embed", "zoo:tiny-fp", str(seq),
                        "--save", str(out)], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    ref = torch.load(d / "tiny-fp.ref.pt", weights_only=True)
    assert np.allclose(np.load(out), ref.numpy(), rtol=1e-4, atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "qgait.cli", "embed", "zoo:missing", str(seq)],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "zoo:missing" in r.stderr


SHIPPED = zoo.list_models(zoo.ZOO_DIR)


@pytest.mark.skipif(not SHIPPED, reason="no release models are shipped in this version yet "
                                        "(qgait/zoo/index.json is empty)")
@pytest.mark.parametrize("name", SHIPPED or ["-"])
def test_shipped_model_checksum_safe_load_and_reference_embedding(name):
    r = zoo.verify(name, zoo_dir=zoo.ZOO_DIR)
    assert r["max_rel_diff"] <= zoo.REF_RTOL and r["mean_rel_diff"] <= zoo.REF_MEAN_RTOL
    card = zoo.card(name, zoo_dir=zoo.ZOO_DIR)
    for must in ("CASIA-B", "qgait", "command"):
        assert must in card


@pytest.fixture(scope="module")
def synthetic_tree(tmp_path_factory):
    from qgait.data.synthetic import generate
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_subjects=3, views=["000", "090"], frames=(20, 24), workers=0,
             progress=False)
    return root


@pytest.mark.skipif(not SHIPPED, reason="no release models are shipped in this version yet")
@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-packed")] or ["-"])
def test_shipped_model_embeds_and_evaluates_from_the_cli(name, synthetic_tree, tmp_path):
    # what a fresh install can do with no data: the model's card promises these two commands
    import pickle

    import numpy as np
    seq = tmp_path / "seq.pkl"
    x = np.zeros((40, 64, 64), np.uint8)
    x[:, :, 10:54] = zoo.reference_sequence()[0, 0].numpy() * 255
    seq.write_bytes(pickle.dumps(x))
    out = tmp_path / "e.npy"
    r = subprocess.run([sys.executable, "-m", "qgait.cli", "embed", f"zoo:{name}", str(seq),
                        "--save", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    ref = torch.load(zoo.ZOO_DIR / f"{name}.ref.pt", weights_only=True)
    assert np.allclose(np.load(out), ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    r = subprocess.run([sys.executable, "-m", "qgait.cli", "eval", "--checkpoint", f"zoo:{name}",
                        "--data", str(synthetic_tree), "--ids", "001", "003",
                        "--json", str(tmp_path / "eval.json")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NM" in r.stdout and "rank-1" in r.stdout.lower(), r.stdout[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["model_kind"] == "packed"


def test_stem_share_bench_runs():
    # bench/stem_share.py (issue 14, item 2) at its smallest: a share line per shipped packed
    # model, the stem being the binary-input packed layer. Times are never checked.
    import re
    script = Path(__file__).resolve().parent.parent / "bench" / "stem_share.py"
    p = subprocess.run([sys.executable, str(script), "--reps", "1"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    shares = re.findall(r"^casiab-lite3d-(w8a8|w4a4)-packed: stem PackedConv3d\(1 -> \d+, .*"
                        r"a_bits=None\): .* = (\d+\.\d)%$", p.stdout, re.M)
    assert [s[0] for s in shares] == ["w8a8", "w4a4"], p.stdout
    assert all(0.0 < float(s[1]) < 100.0 for s in shares)
    # one line per packed convolution with its real multiply-adds: the stem's are
    # 30 frames x 32 x 22 outputs x 16 channels x 27 taps x 1 input channel
    layers = re.findall(r"^  (\S+) +(\d+) -> (\d+) +k\(.*\) +([\d.]+) M MAC", p.stdout, re.M)
    assert len(layers) == 12, p.stdout
    assert layers[0][:3] == ("stem.0", "1", "16") and layers[0][3] == "9.1", layers[0]
    assert p.stdout.count("of the model's CPU time") == 2
