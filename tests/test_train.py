import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gait_fakes import FakeGaitDataset
from qgait.train import (batch_all_triplet_loss, build_trainer, load_config, parse_overrides,
                         part_cross_entropy)
from qgait.train.config import CONFIG_DIR
from qgait.train.trainer import atomic_save, lr_lambda

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def fake():
    return FakeGaitDataset(n_subjects=5, conds=["nm-01", "nm-02", "bg-01"], views=["000", "090"],
                           frames=10)


def small_cfg(out_dir, **over):
    base = {"data": {"P": 3, "K": 2, "frames": 6, "prefetch": 2},
            "model": {"width": 0.25},
            "optim": {"name": "adamw", "lr": 0.003},
            "sched": {"warmup": 2},
            "train": {"iterations": 8, "out_dir": str(out_dir), "progress": False,
                      "ckpt_every": 0, "amp": "none", "threads": 1}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(None, base)


# ----------------------------------------------------------------------------- losses
def test_triplet_loss_matches_brute_force():
    torch.manual_seed(0)
    emb = torch.randn(6, 4, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    margin = 0.5
    loss, info = batch_all_triplet_loss(emb, labels, margin)
    parts = []
    for p in range(3):
        x = emb[:, :, p].double()
        hinges = []
        for a in range(6):
            for q in range(6):
                for n in range(6):
                    if q != a and labels[q] == labels[a] and labels[n] != labels[a]:
                        hinges.append(max(0.0, margin + float((x[a] - x[q]).norm())
                                          - float((x[a] - x[n]).norm())))
        nz = sum(h > 0 for h in hinges)
        parts.append(sum(hinges) / max(nz, 1))
    assert loss.item() == pytest.approx(sum(parts) / 3, rel=1e-5)
    assert 0 < info["triplet_nonzero"] <= 1


def test_triplet_loss_zero_when_separated():
    emb = torch.zeros(4, 2, 1)
    emb[2:, 0, 0] = 10.0  # two tight clusters far apart
    loss, info = batch_all_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), 0.2)
    assert loss.item() == 0.0 and info["triplet_nonzero"] == 0


def test_part_cross_entropy_matches_manual():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3)
    labels = torch.tensor([0, 4, 2, 2])
    loss, info = part_cross_entropy(logits, labels, label_smoothing=0.1)
    manual = 0.0
    for p in range(3):
        logp = torch.log_softmax(logits[:, :, p], 1)
        for i, y in enumerate(labels):
            manual += -(0.9 * logp[i, y] + 0.1 * logp[i].mean()).item()
    assert loss.item() == pytest.approx(manual / 12, rel=1e-5)
    assert info["accuracy"] == pytest.approx(
        (logits.argmax(1) == labels[:, None]).float().mean().item())


# ----------------------------------------------------------------------------- config
def test_config_overrides_and_validation(tmp_path):
    over = parse_overrides(["--optim.lr", "0.05", "--train.amp=none",
                            "--data.train_ids", "[1, 20]"])
    cfg = load_config("casia_b_fp", over)
    assert cfg["optim"]["lr"] == 0.05 and cfg["train"]["amp"] == "none"
    assert cfg["data"]["train_ids"] == ["001", "020"]
    assert cfg["train"]["out_dir"] == "runs/casia_b_fp"
    with pytest.raises(ValueError, match="unknown key 'optim.lrr'"):
        load_config("casia_b_fp", {"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="sched.name"):
        load_config(None, {"sched": {"name": "linear"}})
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        load_config("no_such_config")
    assert load_config("synthetic_fp")["stage"] == "fp"


def test_zero_padded_subject_ids_stay_decimal(tmp_path):
    # YAML 1.1 reads 074 as octal 60 and 050 as 40: "[001,074]" silently meant 001-060
    over = parse_overrides(["--data.train_ids", "[001,074]", "--data.test_ids=[051, 074]"])
    cfg = load_config("casia_b_fp", over)
    assert cfg["data"]["train_ids"] == ["001", "074"]
    assert cfg["data"]["test_ids"] == ["051", "074"]
    f = tmp_path / "c.yaml"
    f.write_text("base: casia_b_fp\ndata:\n  train_ids: [001, 050]\n  test_ids: [051, 074]\n")
    cfg = load_config(str(f))
    assert cfg["data"]["train_ids"] == ["001", "050"] and cfg["data"]["test_ids"] == ["051", "074"]
    # other numbers keep their YAML meaning
    over = parse_overrides(["--optim.lr", "0.05", "--train.iterations", "0x10",
                            "--train.log_every", "0"])
    assert over == {"optim": {"lr": 0.05}, "train": {"iterations": 16, "log_every": 0}}


def test_config_base_chain(tmp_path):
    """``base:`` loads the named config first; the file holds only what differs."""
    (tmp_path / "a.yaml").write_text("base: casia_b_fp_w1\nname: a\noptim: {lr: 0.02}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\ndata: {K: 2}\n")
    ref = load_config("casia_b_fp_w1")
    b = load_config(str(tmp_path / "b.yaml"))
    assert (b["name"], b["optim"]["lr"], b["data"]["K"]) == ("b", 0.02, 2)
    assert b["model"] == ref["model"] and b["train"]["iterations"] == ref["train"]["iterations"]
    assert b["data"]["P"] == ref["data"]["P"] and b["train"]["out_dir"] == "runs/b"
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="'base' cycle"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "e.yaml").write_text("base: casia_b_fp\noptim: {lrr: 1}\n")
    with pytest.raises(ValueError, match="unknown key 'optim.lrr'"):
        load_config(str(tmp_path / "e.yaml"))
    (tmp_path / "f.yaml").write_text("base: no_such_base\n")
    with pytest.raises(FileNotFoundError, match="no_such_base"):
        load_config(str(tmp_path / "f.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    """A shipped recipe with a typo'd key or a bad value fails here, not an hour into a run."""
    cfg = load_config(path.stem)
    assert cfg["name"] == path.stem and cfg["train"]["iterations"] > 0


def test_lr_schedule():
    cfg = load_config(None, {"sched": {"name": "cosine", "warmup": 4, "min_lr_ratio": 0.0}})
    f = lr_lambda(cfg, 104)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(54) == pytest.approx(0.5) and f(104) == pytest.approx(0.0, abs=1e-12)
    cfg = load_config(None, {"sched": {"name": "step", "warmup": 0, "milestones": [10, 20]}})
    f = lr_lambda(cfg, 30)
    assert (f(9), f(10), f(25)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))


def test_atomic_save_leaves_no_tmp(tmp_path):
    atomic_save({"a": torch.arange(3)}, tmp_path / "x.pt")
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.load(tmp_path / "x.pt")["a"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- training
def test_training_lowers_the_loss(fake, tmp_path):
    cfg = small_cfg(tmp_path, train={"iterations": 24}, sched={"warmup": 3})
    tr = build_trainer(cfg, fake)
    hist = tr.train()
    tr.batches.close()
    losses = [r["loss"] for r in hist]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])
    assert (tmp_path / "last.pt").exists()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 25


def test_resume_reproduces_the_uninterrupted_run(fake, tmp_path):
    full = build_trainer(small_cfg(tmp_path / "a"), fake)
    ref = [r["loss"] for r in full.train()]
    full.batches.close()

    first = build_trainer(small_cfg(tmp_path / "b"), fake)
    part1 = [r["loss"] for r in first.train(iterations=3)]
    first.batches.close()
    # Scramble the global RNGs: the resumed run must restore them from the checkpoint.
    torch.manual_seed(1234)
    np.random.seed(4321)
    second = build_trainer(small_cfg(tmp_path / "b"), fake, resume=tmp_path / "b" / "last.pt")
    assert second.step == 3 and second.batches.sampler.step == 3
    part2 = [r["loss"] for r in second.train()]
    second.batches.close()
    assert part1 + part2 == ref  # exactly: same batches, same states, same arithmetic
    from qgait.model_io import load_checkpoint
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_extra_loss_term_and_stage_hook(fake, tmp_path, monkeypatch):
    import qgait.pipeline.stages  # noqa: F401  (registers the real "qat" and "soft" stages)
    from qgait.train import register_stage
    from qgait.train.trainer import STAGES
    real = STAGES["qat"]
    seen = {}

    def prepare(model, cfg):
        seen["prepared"] = True
        return model
    with monkeypatch.context() as mp:
        mp.setitem(STAGES, "qat", real)  # remembers the real stage; put back when the block ends
        register_stage("qat", prepare)
        tr = build_trainer(small_cfg(tmp_path, train={"iterations": 2}) | {"stage": "qat"}, fake)
    assert seen["prepared"]
    # later tests in this process (the pipeline's) find the real stage again
    assert STAGES["qat"] is real and STAGES["qat"].prepare is not prepare
    tr.add_loss_term("l2", lambda t, out, x, y: ((out["embeddings"] ** 2).mean(),
                                                 {"scale": 1.0}), 0.5)
    rec = tr.train()[-1]
    tr.batches.close()
    assert "l2" in rec and rec["l2_scale"] == 1.0
    assert rec["loss"] == pytest.approx(rec["triplet"] + rec["ce"] + 0.5 * rec["l2"], rel=1e-5)
    with pytest.raises(ValueError, match="exists"):
        tr.add_loss_term("l2", lambda *a: None)


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported()
                    if hasattr(torch.cpu, "_is_avx512_bf16_supported") else True,
                    reason="CPU without native bf16")
def test_bf16_autocast_step(fake, tmp_path):
    tr = build_trainer(small_cfg(tmp_path, train={"iterations": 2, "amp": "bf16"}), fake)
    assert tr.amp_dtype == torch.bfloat16 and tr.channels_last
    hist = tr.train()
    tr.batches.close()
    assert all(math.isfinite(r["loss"]) for r in hist)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", "--master_port=0", "--rdzv_backend=c10d",
           "--rdzv_endpoint=127.0.0.1:0", str(HERE / "ddp_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights_rank0.pt")
    w1 = torch.load(tmp_path / "weights_rank1.pt")
    # DDP averages gradients, so the parameters stay identical although the ranks saw
    # different batches (BatchNorm running statistics are per rank and do differ).
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = [k for k in w0 if not k.endswith(buffers)]
    assert len(params) > 10
    for k in params:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.endswith("running_mean"))
    b0 = torch.load(tmp_path / "batches_rank0.pt")
    b1 = torch.load(tmp_path / "batches_rank1.pt")
    for s0, s1 in zip(b0, b1):  # each step's shards are disjoint
        assert len(s0) == 4 and not set(s0).intersection(s1)
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "log.csv").exists()


def test_init_from_loads_weights_only(fake, tmp_path):
    a = build_trainer(small_cfg(tmp_path / "a", train={"iterations": 2}), fake)
    a.train()
    a.batches.close()
    b = build_trainer(small_cfg(tmp_path / "b", train={"init_from": str(tmp_path / "a" / "last.pt"),
                                                        "iterations": 2}), fake)
    assert b.step == 0 and not b.optimizer.state  # a new run ...
    for k, v in a.unwrapped.state_dict().items():  # ... from the old weights
        torch.testing.assert_close(b.unwrapped.state_dict()[k], v, rtol=0, atol=0)
    b.batches.close()


def test_compare_runs_plot(tmp_path):
    """python -m qgait.train.plot RUN_A RUN_B: the runs' eval JSONs, one point per step."""
    pytest.importorskip("matplotlib")
    import json

    from qgait.train.plot import compare_runs, main, read_evals
    runs = []
    for r, steps in enumerate(([1000, 2000], [1500, 3000, 4500])):
        d = tmp_path / f"run{r}"
        d.mkdir()
        for s in steps:
            res = {"step": s, "casia_b": {"cross_view": {
                c: {"mean": 50.0 + s / 100 + r} for c in ("NM", "BG", "CL")}}}
            (d / f"ckpt_{s:06d}.eval.json").write_text(json.dumps(res))
        runs.append(d)
    assert [s for s, _ in read_evals(runs[1])] == [1500, 3000, 4500]
    assert read_evals(runs[0])[1][1]["CL"] == 70.0
    out = compare_runs(runs, tmp_path / "cmp.png", labels=["a", "b"])
    assert out.stat().st_size > 1000
    main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp2.png")])
    assert (tmp_path / "cmp2.png").exists()
    with pytest.raises(ValueError, match="labels"):
        compare_runs(runs, tmp_path / "x.png", labels=["only one"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CASIA-B"):
        compare_runs([runs[0], tmp_path / "empty"], tmp_path / "y.png")


# ----------------------------------------------------------------------------- time budget
def test_budget_iterations_arithmetic():
    from qgait.train.trainer import budget_iterations
    assert budget_iterations(100.0, 10.0, 5, 2.0, 1000) == 5 + 45
    assert budget_iterations(100.0, 10.0, 5, 2.0, 30) == 30          # capped by iterations
    assert budget_iterations(100.0, 150.0, 5, 2.0, 1000) == 6        # over budget: one more


def _budget_cfg(out, **train):
    return small_cfg(out, sched={"warmup": 6},
                     train={"iterations": 100, "budget_minutes": 0.5, "budget_calibration": 3,
                            **train})


def test_time_budget_sets_the_length_and_equals_a_run_of_that_length(fake, tmp_path,
                                                                     monkeypatch):
    import qgait.train.trainer as tr
    ticks = iter(range(10**6))
    monkeypatch.setattr(tr, "_clock", lambda: float(next(ticks)))  # every step takes 1 s
    run = build_trainer(_budget_cfg(tmp_path / "budget"), fake)
    hist = run.train()
    run.batches.close()
    # 3 calibration steps in 3 s, then 27 more fit into the 30 s budget
    assert run.budget_iterations == 30 and len(hist) == 30 and run.step == 30
    from qgait.model_io import load_checkpoint
    ck = load_checkpoint(tmp_path / "budget" / "last.pt")
    assert ck["budget_iterations"] == 30 and ck["config"]["train"]["iterations"] == 30
    # the same as a run configured with 30 iterations from the start: lr and loss, exactly
    plain = build_trainer(small_cfg(tmp_path / "plain", sched={"warmup": 6},
                                    train={"iterations": 30}), fake)
    ref = plain.train()
    plain.batches.close()
    assert [r["lr"] for r in hist] == [r["lr"] for r in ref]
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref]


def test_time_budget_run_resumes_at_its_length(fake, tmp_path, monkeypatch):
    import qgait.train.trainer as tr
    ticks = iter(range(10**6))
    monkeypatch.setattr(tr, "_clock", lambda: float(next(ticks)))
    first = build_trainer(_budget_cfg(tmp_path / "r"), fake)
    first.add_step_hook(lambda t: setattr(t, "_stop", t.step >= 9))   # interrupted at 10
    first.train()
    first.batches.close()
    assert first.step == 10 and first.budget_iterations == 30
    # resumed on a machine twice as slow: the length measured once is kept
    ticks2 = iter(range(0, 10**6, 2))
    monkeypatch.setattr(tr, "_clock", lambda: float(next(ticks2)))
    second = build_trainer(_budget_cfg(tmp_path / "r"), fake, resume="auto")
    second.train()
    second.batches.close()
    assert second.step == 30
    with pytest.raises(ValueError, match="warmup"):
        small_cfg(tmp_path, train={"budget_minutes": 1.0, "budget_calibration": 5})
