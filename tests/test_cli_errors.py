"""Every user mistake in a ``qgait`` command: one line on stderr naming the file or key, exit
status 2, no traceback, nothing written. Run as a user runs it: ``python -m qgait ...`` in a
fresh process."""
import builtins
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qgait.data import save_pickle
from qgait.model_io import save_model
from qgait.models import build_model
from qgait.pipeline.stages import quantize_model
from qgait.quant import convert
from qgait.train.config import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent


def qgait(*args, cwd, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), QGAIT_DEBUG="")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qgait", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=300)


def files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line_error(r, *words):
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(err) == 1, r.stderr
    assert "Traceback" not in r.stderr and err[0].startswith("qgait ")
    for w in words:
        assert str(w) in err[0], (w, err[0])
    return err[0]


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny fp model file and fake-quant one, an upper-case CASIA-B-like tree, and the bad
    files: missing, truncated, foreign, crafted, legacy."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    fp = build_model("GaitLite3D", num_classes=0, width=0.25).eval()
    save_model(fp, d / "fp.pt")
    fq = quantize_model(copy.deepcopy(fp), dict(DEFAULTS["quant"]))
    fq(torch.ones(1, 1, 4, 64, 44))
    save_model(fq, d / "fq.pt")
    data = (d / "fp.pt").read_bytes()
    (d / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(2)}, d / "foreign.pt")
    torch.save({"config": {}, "model": _Marker(d / "MARKER")}, d / "crafted.pt")
    torch.save({"model": convert(copy.deepcopy(fq)), "config": {"stage": "qat"},
                "format": "qgait-packed-1"}, d / "legacy_packed.pt")
    rng = np.random.default_rng(0)
    tree = d / "UPPER"
    for s in ("001", "002"):
        for c in ("NM-01", "NM-02", "NM-03", "NM-04", "NM-05", "NM-06", "BG-01", "CL-01"):
            for v in ("000", "090"):
                frames = (rng.random((6, 64, 64)) < 0.3).astype(np.uint8) * 255
                save_pickle(tree / s / c / v / f"{s}-{c}-{v}.pkl", frames)
    (d / "empty").mkdir()
    save_pickle(d / "seq.pkl", (rng.random((5, 64, 64)) < 0.3).astype(np.uint8) * 255)
    return d


@pytest.mark.parametrize("case", ["missing", "trunc", "foreign", "crafted", "folder"])
def test_eval_bad_model_file(work, case):
    path = {"missing": "nope.pt", "trunc": "trunc.pt", "foreign": "foreign.pt",
            "crafted": "crafted.pt", "folder": "empty"}[case]
    before = files(work)
    r = qgait("eval", "--checkpoint", path, "--data", "UPPER", "--ids", "001", "002",
              "--no-progress", cwd=work)
    words = {"missing": ["no such file"], "trunc": ["cannot read it", "truncated"],
             "foreign": ["not a qgait model or checkpoint"],
             "crafted": ["refused", "--trust-legacy-file"], "folder": ["is a folder"]}[case]
    assert_one_line_error(r, path, *words)
    assert files(work) == before
    assert not (work / "MARKER").exists()


def test_legacy_file_needs_the_flag(work):
    before = files(work)
    r = qgait("embed", "legacy_packed.pt", "seq.pkl", cwd=work)
    assert_one_line_error(r, "legacy_packed.pt", "--trust-legacy-file")
    assert files(work) == before
    r = qgait("embed", "legacy_packed.pt", "seq.pkl", "--trust-legacy-file", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "embedding (" in r.stdout and "--trust-legacy-file" in r.stderr   # it warns


def test_debug_shows_the_traceback(work):
    for extra, env in ((["--debug"], None), ([], {"QGAIT_DEBUG": "1"})):
        r = qgait("eval", "--checkpoint", "nope.pt", *extra, cwd=work, env=env)
        assert r.returncode != 0 and "Traceback" in r.stderr and "nope.pt" in r.stderr


@pytest.mark.parametrize("data", ["empty", "no_such_folder"])
def test_train_without_data_writes_nothing(work, data):
    before = files(work)
    r = qgait("train", "--config", "casia_b_fp", "--data", data, "--out", "run_out", cwd=work)
    assert_one_line_error(r, data, "--data")
    assert files(work) == before   # no run_out/, no config.json


@pytest.mark.parametrize("cmd,words", [
    (["train", "--config", "synthetic_fp", "--out", "run_out", "--train.iters", "5"],
     ["'train.iters'", "did you mean 'train.iterations'"]),
    (["pipeline", "--config", "demo_fast", "--out", "run_out", "--pipeline.qat.train.iters", "3"],
     ["'pipeline.qat.train.iters'", "did you mean 'pipeline.qat.train.iterations'"]),
    (["pipeline", "--config", "demo_fast", "--out", "run_out", "--pipeline.qatt.train", "{}"],
     ["'pipeline.qatt'"]),
    (["pipeline", "--config", "demo_fast", "--out", "run_out", "--pipeline.variants", "[w9a9]"],
     ["pipeline.variants", "w9a9"]),
    (["demo", "--fast", "--out", "run_out", "--train.iters", "3"], ["'train.iters'"]),
])
def test_unknown_config_key(work, cmd, words):
    before = files(work)
    r = qgait(*cmd, cwd=work)
    assert_one_line_error(r, *words)
    assert files(work) == before


def test_pipeline_yaml_key_is_checked_at_load(work):
    (work / "bad.yaml").write_text("base: demo_fast\npipeline:\n  soft: {optim: {lrr: 0.1}}\n")
    try:
        before = files(work)
        r = qgait("pipeline", "--config", "bad.yaml", "--out", "run_out", cwd=work)
        assert_one_line_error(r, "pipeline.soft.optim.lrr")
        assert files(work) == before   # the fp stage did not start
    finally:
        (work / "bad.yaml").unlink()


@pytest.mark.parametrize("cmd,words", [
    (["eval"], ["--checkpoint"]),                                       # argparse
    (["train", "--config", "no_such_config"], ["no_such_config"]),
    (["train", "--config", "synthetic_fp", "--optim.lr"], ["--optim.lr", "no value"]),
    (["train", "--config", "synthetic_fp", "--optim.lr", "abc"], ["optim.lr"]),
    (["convert", "fp.pt", "--out", "packed.pt"], ["fp.pt", "fp model"]),
    (["convert", "nope.pt", "--out", "packed.pt"], ["nope.pt"]),
    (["export-onnx", "nope.pt"], ["nope.pt"]),
    (["pipeline", "--config", "demo_fast", "--out", "run_out", "--fp-checkpoint", "fq.pt"],
     ["fq.pt", "full-precision"]),
    (["embed", "fp.pt", "no_such_seq.pkl"], ["no_such_seq.pkl"]),
    (["data", "import-png", "no_such_png_tree", "out_pkl"], ["no_such_png_tree"]),
    (["info", "--config", "no_such_config"], ["no_such_config"]),
    (["train", "--config", "synthetic_fp", "--out", "run_out", "--resume", "nope.pt"],
     ["nope.pt"]),
])
def test_other_mistakes(work, cmd, words):
    before = files(work)
    r = qgait(*cmd, cwd=work)
    assert_one_line_error(r, *words)
    assert files(work) == before


def test_upper_case_condition_folders_are_matched(work):
    """NM-01 ... CL-01 folders: the CASIA-B tables are filled, not silently empty."""
    r = qgait("eval", "--checkpoint", "fp.pt", "--data", "UPPER", "--ids", "001", "002",
              "--amp", "none", "--no-progress", "--json", "upper.json", cwd=work)
    try:
        assert r.returncode == 0, r.stderr
        res = json.loads((work / "upper.json").read_text())
        assert set(res["casia_b"]["cross_view"]) == {"NM", "BG", "CL"}
        assert res["precision"] == "fp32" and len(res["model_sha256"]) == 64
    finally:
        (work / "upper.json").unlink(missing_ok=True)
