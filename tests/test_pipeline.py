"""The QGait pipeline: stage transitions, the k schedule, the frozen teacher, conversion and
the demo (fast mode), on a tiny synthetic run shared by the tests of this module."""
import copy
import json

import pytest
import torch

import qgait
from qgait.nn.soft_quant import SOFT_QUANT_MODULES, SoftQuantConv3d, SoftQuantPartLinear
from qgait.pipeline.demo import run_demo
from qgait.pipeline.stages import k_at, quantize_model
from qgait.train.config import DEFAULTS


# The demo's fast settings with a test set and a budget that learn. At demo_fast.yaml as
# shipped (3 test subjects, views 000 / 090, 8 + 3 + 3 steps) every accuracy is chance: over
# seeds 0-4 the cross-view rank-1 of fp / W8A8 / W4A4 ranged 16.7-58.3 (chance 33.3, mean ~35),
# so no assertion on it could fail for a broken model without failing for a good one. Here: 6
# test subjects (chance 16.7), two neighbouring views, 60 fp steps and 10 + 10 quantized steps.
DEMO_OVERRIDES = {
    "data": {"synthetic": {"n_subjects": 12, "views": ["072", "090"]},
             "train_ids": ["001", "006"], "test_ids": ["007", "012"]},
    "pipeline": {"fp": {"train": {"iterations": 60}}, "qat": {"train": {"iterations": 10}},
                 "soft": {"train": {"iterations": 10}}},
}

# (stage, out_dir) -> the model's state when that stage's first training step began, as the
# demo below really ran it (observed, not rebuilt from the checkpoints afterwards).
STAGE_STARTS: dict = {}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    from qgait.train.trainer import Trainer
    train_step = Trainer.train_step

    def observed(self, x, labels):
        key = (self.cfg["stage"], str(self.out_dir))
        if key not in STAGE_STARTS:  # before the step's hooks and its update
            STAGE_STARTS[key] = copy.deepcopy(self.unwrapped.state_dict())
        return train_step(self, x, labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", observed)
        res = run_demo(out, fast=True, progress=False, overrides=DEMO_OVERRIDES)
    return out, res


def _load(path):
    from qgait.model_io import load_checkpoint_model
    return load_checkpoint_model(path)


def test_demo_fast_writes_table_json_and_plot(demo):
    out, res = demo
    assert (out / "results.json").exists() and (out / "results.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert [r["bits"] for r in saved["rows"]] == [32, 8, 4]
    for r in saved["rows"]:
        for c in ("NM", "BG", "CL"):
            assert 0.0 <= r[c] <= 100.0
        assert r["latency_ms"] > 0
    fp, w8, w4 = saved["rows"]
    # Accuracy (cross-view rank-1, %). Measured with these settings over seeds 0-2 (data and
    # training seed together), rows fp / W8A8 / W4A4, mean of NM, BG, CL:
    #   seed 0: 62.5 / 58.3 / 68.1   seed 1: 48.6 / 69.4 / 73.6   seed 2: 44.4 / 47.2 / 61.1
    # (cells 33.3-87.5; one probe is 1/24 = 4.2 points of a condition). Chance is 100 / 6 =
    # 16.7: every row must reach twice chance (lowest seen 44.4, 11 points of margin). W4A4
    # continues from fp for 20 more steps and was 5.6-25 points *above* fp; it must not fall
    # more than 15 points below it (a broken quantizer, convert or packed kernel lands at chance).
    chance = 100 / 6
    mean = {r["variant"]: sum(r[c] for c in ("NM", "BG", "CL")) / 3 for r in saved["rows"]}
    assert all(m >= 2 * chance for m in mean.values()), mean
    assert mean["w4a4"] >= mean["fp"] - 15, mean
    # packed int8 / int4 models are smaller than the fp32 one, int4 smallest
    assert w4["bytes"] < w8["bytes"] < fp["bytes"]
    # the packed models reproduce the fake-quant models' embeddings over the whole test set.
    # Not bit for bit: fake-quant convolves fp32 products (rounded), packed sums exact integers,
    # so a next layer's activation code can round the other way at a .5 tie; with these
    # settings W8A8 (the finer grid) measured max 5.4e-3, mean 3.4e-4, W4A4 0, and no probe's
    # outcome changed (another CPU's fp32 sums may flip other ties: one outcome is allowed).
    for r in (w8, w4):
        cmp = r["fakequant_vs_packed"]
        assert cmp["max_rel_diff"] < 2e-2 and cmp["mean_rel_diff"] < 2e-3, cmp
        assert cmp["probe_outcomes_changed"] <= 1, cmp


def test_stage_transitions_carry_steps_and_apply_k_schedule(demo):
    out, _ = demo
    from qgait.model_io import load_checkpoint
    qat = load_checkpoint(out / "w4a4" / "qat" / "final.pt")
    soft = load_checkpoint(out / "w4a4" / "soft" / "final.pt")
    assert qat["stage"] == "qat" and soft["stage"] == "soft"
    # stage 2 started from stage 1's final state, exactly: weights, learned steps and BN
    # statistics, as observed at stage 2's first step (only the temperature k differs)
    start = STAGE_STARTS[("soft", str(out / "w4a4" / "soft"))]
    assert start.keys() == qat["model"].keys()
    n = 0
    for k, v in qat["model"].items():
        if k.endswith("_extra_state"):
            assert v["k"] == 0.0 and start[k]["k"] == soft["config"]["quant"]["k0"], k
            continue
        assert torch.equal(start[k], v), k
        n += k.endswith("_scale")
    assert n > 10
    # ... and trained from there: the observation is the start, not the end
    assert any(not torch.equal(start[k], v) for k, v in soft["model"].items()
               if k.endswith("weight"))
    # stage 1 started from the fp model's weights and BN statistics (its steps are new)
    fp = load_checkpoint(out / "fp" / "final.pt")
    start1 = STAGE_STARTS[("qat", str(out / "w4a4" / "qat"))]
    assert all(torch.equal(start1[k], v) for k, v in fp["model"].items()), [
        k for k, v in fp["model"].items() if not torch.equal(start1[k], v)]
    # the k schedule ran to k1 on the last step, in every quantized layer
    q = soft["config"]["quant"]
    iters = soft["config"]["train"]["iterations"]
    k_last = k_at(iters - 1, iters, q["k0"], q["k1"])
    for k, v in soft["model"].items():
        if k.endswith("_extra_state"):
            assert v["k"] == pytest.approx(k_last), k
    assert qat["model"]["stem.0._extra_state"]["k"] == 0.0


def test_quantized_layers_follow_the_config(demo):
    out, _ = demo
    model, cfg = _load(out / "w4a4" / "soft" / "final.pt")
    stem = model.stem[0]
    assert isinstance(stem, SoftQuantConv3d) and stem.a_bits is None and stem.w_bits == 8
    assert isinstance(model.fc, SoftQuantPartLinear) and model.fc.w_bits == 8
    body = [m for n, m in model.named_modules() if isinstance(m, SOFT_QUANT_MODULES)
            and not n.startswith(("stem", "fc"))]
    assert body and all(m.w_bits == 4 and m.a_bits == 4 for m in body)
    assert all(bool(m.initialized) for m in body)


def test_teacher_frozen_and_in_eval_mode(demo):
    out, _ = demo
    from qgait.train import build_trainer, load_config
    cfg = load_config("demo_fast", {
        "stage": "soft", "data": {**DEMO_OVERRIDES["data"], "root": str(out / "data")},
        "train": {"out_dir": str(out / "probe_soft"), "iterations": 2, "progress": False},
        "quant": {"w_bits": 4, "a_bits": 4, "init_from": str(out / "w4a4" / "qat" / "final.pt"),
                  "teacher": str(out / "fp" / "final.pt")}})
    tr = build_trainer(cfg)
    try:
        teacher = tr.teacher
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        tr.train()
        assert not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, before[k]), k  # BN statistics too: eval mode
        assert any(n == "idc" for n, _, _ in tr.loss_terms)
        assert "idc" in tr.history[-1]
    finally:
        tr.batches.close()


def test_pipeline_resumes_and_skips_finished_stages(demo, capsys):
    out, _ = demo
    from qgait.pipeline.run import run_pipeline
    from qgait.pipeline.demo import demo_config
    cfg = demo_config(out, None, True, DEMO_OVERRIDES)
    before = (out / "w8a8" / "soft" / "final.pt").stat().st_mtime_ns
    run_pipeline(cfg, out, ["w8a8"], progress=False)
    assert "skipped" in capsys.readouterr().out
    assert (out / "w8a8" / "soft" / "final.pt").stat().st_mtime_ns == before


def test_k_schedule():
    assert k_at(0, 10, 1.0, 6.0) == 1.0
    assert k_at(9, 10, 1.0, 6.0) == 6.0
    assert k_at(3, 7, 2.0, 2.0) == 2.0
    assert k_at(0, 1, 1.0, 6.0) == 6.0


def test_quantize_model_keeps_first_and_last_at_8_bits():
    from qgait.models import GaitLite3D
    m = GaitLite3D(5, width=0.25)
    quantize_model(m, dict(DEFAULTS["quant"], w_bits=3, a_bits=5))
    assert m.stem[0].a_bits is None and m.stem[0].w_bits == 8
    assert m.stage2[0][0].w_bits == 3 and m.stage2[0][0].a_bits == 5
    assert m.fc.w_bits == 8 and m.fc.a_bits == 8


def test_teacher_trained_on_other_subjects_is_one_clear_error(demo, tmp_path):
    # the fp teacher has 6 identities (001-006); a stage on 001-008 has 8: one line naming both
    from qgait.model_io import ModelFileError
    from qgait.models import GaitLite3D
    from qgait.pipeline.stages import prepare_quantized
    out, _ = demo
    cfg = {"stage": "qat", "data": {"train_ids": ["001", "008"]},
           "quant": dict(DEFAULTS["quant"], init_from=str(out / "fp" / "final.pt"))}
    with pytest.raises(ModelFileError, match=r"final.pt: trained on 6 identities.*001.*008.* 8"):
        prepare_quantized(GaitLite3D(8, width=0.25), cfg)


def test_part_linear_convert_is_exact():
    from qgait.models import GaitLite3D
    torch.manual_seed(0)
    m = GaitLite3D(5, width=0.25)
    quantize_model(m, dict(DEFAULTS["quant"]))
    x = torch.rand(2, 1, 6, 64, 44).round()
    m.train()
    m(x)
    m.eval()
    p = qgait.quant.convert(copy.deepcopy(m))
    with torch.no_grad():
        a, b = m(x)["embeddings"], p(x)["embeddings"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert type(p.fc).__name__ == "PackedPartLinear"


def test_report_cache_is_keyed_by_content_data_and_settings(demo, tmp_path):
    """The report reuses an evaluation only under the same checkpoint content, test set,
    settings and qgait version; a stale <checkpoint>.eval.json (the old path-only cache) is not
    read; every quantized row compares packed and fake-quant over the whole test set."""
    import shutil

    from qgait.evaluation import cache
    from qgait.model_io import load_checkpoint, save_checkpoint
    from qgait.pipeline.demo import demo_config, report
    out, res = demo
    cfg = demo_config(out, None, True, DEMO_OVERRIDES)
    fp = tmp_path / "fp.pt"
    shutil.copyfile(out / "fp" / "final.pt", fp)
    stale = {"casia_b": {"cross_view": {c: {"mean": 123.0} for c in ("NM", "BG", "CL")}}}
    fp.with_suffix(".eval.json").write_text(json.dumps(stale))
    ck = {"fp": fp, "w4a4": out / "w4a4" / "soft" / "final.pt"}
    r1 = report(ck, cfg, tmp_path, progress=False, name="r1")
    by = {r["variant"]: r for r in res["rows"]}
    for r in r1["rows"]:   # the demo's own numbers (same models, data, settings), not 123
        assert {c: r[c] for c in ("NM", "BG", "CL")} == {c: by[r["variant"]][c]
                                                       for c in ("NM", "BG", "CL")}
        assert r["precision"] == "fp32" if r["variant"] == "fp" else "packed" in r["precision"]
    w4 = r1["rows"][1]["fakequant_vs_packed"]
    assert w4["sequences"] == r1["test_sequences"] == 120
    # the tie-rounding bound of test_demo_fast_writes_table_json_and_plot: since convert()
    # chains integer codes between GaitLite3D's layers, W4A4 too can round a tie the other way
    # (measured max 5.5e-4 here)
    assert w4["max_rel_diff"] < 2e-2 and w4["mean_rel_diff"] <= w4["max_rel_diff"]
    assert w4["probe_outcomes_changed"] <= 1
    assert len(json.loads(cache.cache_path(fp).read_text())["entries"]) == 1
    # another test subset: evaluated again, next to the first entry
    cfg2 = copy.deepcopy(cfg)
    cfg2["data"]["test_ids"] = ["006", "007"]
    r2 = report({"fp": fp}, cfg2, tmp_path, progress=False, name="r2")
    assert r2["test_sequences"] == 40
    assert len(json.loads(cache.cache_path(fp).read_text())["entries"]) == 2
    # the same path with other content: evaluated again (the key holds the content hash)
    ckd = load_checkpoint(fp)
    first = next(k for k in ckd["model"] if k.endswith("weight"))
    ckd["model"][first] = ckd["model"][first] * 0.5
    save_checkpoint({k: v for k, v in ckd.items() if k not in ("format", "format_version")}, fp)
    report({"fp": fp}, cfg2, tmp_path, progress=False, name="r3")
    entries = json.loads(cache.cache_path(fp).read_text())["entries"]
    assert len(entries) == 3
    assert len({e["key"]["model_sha256"] for e in entries.values()}) == 2


def test_noidc_shares_the_straight_through_stage_of_its_twin(demo, capsys):
    # IDC acts only in the soft stage: w8a8-noidc starts its soft stage from w8a8/qat (the same
    # run) instead of training that stage again, and trains its own soft stage without IDC
    out, _ = demo
    from qgait.pipeline.demo import demo_config
    from qgait.pipeline.run import run_pipeline
    cfg = demo_config(out, None, True, DEMO_OVERRIDES)
    qat = out / "w8a8" / "qat" / "final.pt"
    before = qat.stat().st_mtime_ns
    done = run_pipeline(cfg, out, ["w8a8-noidc"], progress=False)
    assert "w8a8/qat is done (final.pt), skipped" in capsys.readouterr().out
    assert qat.stat().st_mtime_ns == before
    assert not (out / "w8a8-noidc" / "qat").exists()
    soft = json.loads((out / "w8a8-noidc" / "soft" / "config.json").read_text())
    assert soft["quant"]["init_from"] == str(qat) and soft["quant"]["idc_weight"] == 0.0
    assert done["w8a8-noidc"] == out / "w8a8-noidc" / "soft" / "final.pt"


def test_demo_shortens_every_stage_by_what_the_fp_budget_fitted(demo, monkeypatch):
    # the demo's fp stage stops at its wall-time budget on a slow CPU; the quantized stages are
    # then cut by the same fraction (rounded, at least 1), and not at all when the budget fitted
    out, _ = demo
    from qgait.pipeline import demo as demo_mod
    from qgait.train.config import load_config
    cfg = load_config("demo", {"train": {"out_dir": str(out)}})
    assert cfg["pipeline"]["fp"]["train"]["budget_minutes"] > 0
    assert (cfg["pipeline"]["fp"]["train"]["budget_calibration"]
            < cfg["sched"]["warmup"])        # the length is set inside the warmup
    steps = {"step": 600}
    monkeypatch.setattr("qgait.model_io.read_header", lambda p: dict(steps))
    assert demo_mod.scale_quant_stages(cfg, "fp.pt") is cfg
    steps["step"] = 240                                   # 40% of 600 fitted
    short = demo_mod.scale_quant_stages(cfg, "fp.pt")
    assert short["pipeline"]["qat"]["train"]["iterations"] == 60      # 40% of 150
    assert short["pipeline"]["soft"]["train"]["iterations"] == 60
    assert short["pipeline"]["qat"]["optim"] == cfg["pipeline"]["qat"]["optim"]
    assert cfg["pipeline"]["qat"]["train"]["iterations"] == 150      # the input is not changed
    steps["step"] = 1
    tiny = demo_mod.scale_quant_stages(cfg, "fp.pt")
    assert tiny["pipeline"]["soft"]["train"]["iterations"] == 1


def test_demo_fp_budget_cuts_the_fp_stage_on_a_slow_clock(tmp_path, monkeypatch):
    # the mechanism the demo relies on, with a clock on which every step takes 5 s: a 1.5 min
    # budget calibrated after 15 steps (75 s) leaves 15 s, i.e. 3 more steps, of the 40
    from qgait.train import trainer as tr_mod
    from qgait.train.build import run_training
    from qgait.train.config import load_config
    t = [0.0]

    def clock():
        t[0] += 5.0
        return t[0]
    monkeypatch.setattr(tr_mod, "_clock", clock)
    data = tmp_path / "data"
    cfg = load_config("demo_fast", {
        "data": {"root": str(data)}, "sched": {"warmup": 20},
        "train": {"out_dir": str(tmp_path / "fp"), "iterations": 40, "budget_minutes": 1.5,
                  "budget_calibration": 15, "progress": False}})
    cfg["stage"] = "fp"
    trainer = run_training(cfg, resume="auto")
    assert trainer.step == 18
