"""qgait study: the LSQ-vs-QGait study on a tiny synthetic run (training, caching, report)."""
import json

import numpy as np
import pytest
import torch

from qgait.pipeline.study import format_report, run_study, study_report, variant_name
from qgait.train import load_config


def test_variant_names():
    assert variant_name(4, "idc") == "w4a4" and variant_name(3, "ste") == "w3a3-ste"
    assert variant_name(2, "soft1") == "w2a2-soft1" and variant_name(4, "noidc") == "w4a4-noidc"
    with pytest.raises(ValueError, match="unknown method"):
        variant_name(4, "lsq")


def _hits(seed, p):
    rng = np.random.default_rng(seed)
    subs = np.repeat([f"{i:03d}" for i in range(6)], 4)
    views = np.tile(["000", "000", "090", "090"], 6)
    return {"views": ["000", "090"],
            "cond": {c: {"subject": subs, "view": views,
                         "hit": (rng.random((24, 2)) < p).astype(float)} for c in ("NM", "CL")}}


def test_report_mean_std_over_seeds_and_comparisons():
    runs = {(3, m, s): _hits(10 * s + i, p) for i, (m, p) in enumerate([("ste", 0.4), ("idc", 0.8)])
            for s in (0, 1, 2)}
    runs["fp"] = _hits(99, 0.9)
    rep = study_report(runs, [3], ["ste", "idc"], [0, 1, 2], n_boot=200)
    fp, ste, idc = rep["rows"]
    assert fp["bits"] == 32 and ste["method"] == "ste" and idc["n"] == 3
    assert "BG" not in ste                     # no BG probes: the condition is left out
    assert ste["NM"]["mean"] == pytest.approx(np.mean(ste["NM"]["seeds"]))
    assert ste["NM"]["std"] == pytest.approx(np.std(ste["NM"]["seeds"], ddof=1))
    (comp,) = rep["comparisons"]               # only idc - ste: noidc / soft1 were not run
    assert (comp["a"], comp["b"]) == ("idc", "ste")
    assert comp["mean"]["diff"] == pytest.approx(idc["mean"]["mean"] - ste["mean"]["mean"])
    text = format_report(rep)
    assert "W3A3 two-stage + IDC (QGait)" in text and "QGait (two-stage + IDC) - LSQ" in text


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = load_config("demo_fast", {"data": {"root": str(root / "data")},
                                    "pipeline": {"qat": {"train": {"iterations": 2}},
                                                 "soft": {"train": {"iterations": 2}}}})
    out = root / "out"
    rep = run_study(cfg, out, bits=[3], methods=["ste", "idc"], seeds=[0, 1], n_boot=100,
                    progress=False)
    return cfg, out, rep


def test_study_trains_every_run_and_writes_report(study):
    cfg, out, rep = study
    for s in (0, 1):
        assert (out / f"seed{s}" / "w3a3-ste" / "qat" / "final.pt").exists()
        assert (out / f"seed{s}" / "w3a3" / "soft" / "final.pt").exists()
        assert (out / f"seed{s}" / "w3a3" / "soft" / "final.pt.hits.npz").exists()
    saved = json.loads((out / "study.json").read_text())
    assert [(r["bits"], r["method"]) for r in saved["rows"]] == [(32, "fp"), (3, "ste"),
                                                                 (3, "idc")]
    for r in saved["rows"][1:]:
        assert r["n"] == 2 and len(r["NM"]["seeds"]) == 2
        assert 0.0 <= r["mean"]["mean"] <= 100.0
    assert saved["iterations"] == {"qat": 2, "soft": 2}
    c = saved["comparisons"][0]
    assert c["mean"]["lo"] <= c["mean"]["diff"] <= c["mean"]["hi"]
    assert (out / "study.png").stat().st_size > 0 and (out / "study.md").exists()
    # the seeds really are different runs
    a = np.load(out / "seed0" / "w3a3-ste" / "qat" / "final.pt.hits.npz")
    assert a["meta"].size == 1


def test_study_rerun_reuses_runs_and_evaluations(study, capsys):
    cfg, out, rep = study
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt*")}
    again = run_study(cfg, out, fp_checkpoint=out / "fp" / "final.pt", bits=[3],
                      methods=["ste", "idc"], seeds=[0, 1], n_boot=100, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt*")} == stamps
    assert again["rows"] == rep["rows"]
    assert "skipped" in capsys.readouterr().out


def test_ptq_eval_tool(study, tmp_path, monkeypatch, capsys):
    """tools/ptq_eval.py: the teacher quantized without training, steps set by an eval-mode
    calibration forward (BatchNorm statistics untouched), evaluated and stored as the study's
    variants are."""
    from pathlib import Path

    from qgait.pipeline.study import load_hits

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import ptq_eval

    cfg, out, _ = study
    res = tmp_path / "ptq.json"
    r = ptq_eval.main(["--teacher", str(out / "fp" / "final.pt"), "--config", "demo_fast",
                       "--data", cfg["data"]["root"], "--bits", "4", "--calib", "4",
                       "--out", str(res)])
    assert set(r) >= {"NM", "mean"} and all(0.0 <= v <= 100.0 for v in r.values())
    assert json.loads(res.read_text()) == r
    hits = load_hits(res.with_suffix(".hits.npz"))
    assert hits is not None and set(hits["cond"]) >= {"NM"}
    with pytest.raises(SystemExit):
        ptq_eval.main(["--out", str(res)])      # no teacher: argparse's one-line error


def test_ptq_eval_weights_only(study, tmp_path, monkeypatch):
    """--weights-only: every quantized layer keeps its weight quantizer and none quantizes its
    input (the kept-8-bit layers included); without it the same layers quantize their inputs.
    --w-init mse: the weight steps are mse_weight_init's."""
    from pathlib import Path

    import qgait.pipeline.stages as stages
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import ptq_eval

    models = []
    real = stages.quantize_model

    def spy(model, q):
        models.append(model)
        return real(model, q)

    monkeypatch.setattr(stages, "quantize_model", spy)
    cfg, out, _ = study
    for flag in ([], ["--weights-only"], ["--w-init", "mse"]):
        ptq_eval.main(["--teacher", str(out / "fp" / "final.pt"), "--config", "demo_fast",
                       "--data", cfg["data"]["root"], "--bits", "4", "--calib", "2",
                       "--out", str(tmp_path / f"ptq{len(flag)}.json"), *flag])
    full, wonly = ({f: (m.w_bits, m.a_bits) for f, m in model.named_modules()
                    if isinstance(m, SOFT_QUANT_MODULES)} for model in models[:2])
    # --w-init mse: every weight row's step is the least-squares one, not LSQ's
    from qgait.nn.soft_quant import lsq_weight_init, mse_weight_init
    layers = [m for m in models[2].modules() if isinstance(m, SOFT_QUANT_MODULES)]
    for m in layers:
        torch.testing.assert_close(m.w_scale.detach(), mse_weight_init(m.weight_rows(), m.w_bits))
    assert any(not torch.allclose(m.w_scale, lsq_weight_init(m.weight_rows(), m.w_bits))
               for m in layers)
    assert full.keys() == wonly.keys() and len(full) > 2
    assert all(a is None for _, a in wonly.values())
    assert sum(a is not None for _, a in full.values()) >= len(full) - 1   # all but the stem
    assert {f: w for f, (w, _) in wonly.items()} == {f: w for f, (w, _) in full.items()}


def test_ptq_eval_a_init_fidelity_and_save(study, tmp_path, monkeypatch):
    """--a-init max: every quantized input's step is its calibration batch's max|x| / qp (never
    below the MSE rule's, whose candidates are fractions of it); --fidelity-ids: the
    embeddings' relative difference from the teacher's on those subjects, smaller at 8 bits
    than at 2; --save: a model file that embeds as the calibrated model does."""
    from pathlib import Path

    import qgait.pipeline.stages as stages
    from qgait.model_io import load_model
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES, max_act_init

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import ptq_eval

    models, inputs = [], {}
    real = stages.quantize_model

    def keep_first(key):                            # the first batch a layer sees sets its step
        def hook(mod, args):
            inputs.setdefault(key, args[0].clone())  # (returns None: the input is unchanged)
        return hook

    def spy(model, q):
        models.append(real(model, q))
        for f, m in model.named_modules():
            if isinstance(m, SOFT_QUANT_MODULES):
                m.register_forward_pre_hook(keep_first((len(models), f)))
        return models[-1]

    monkeypatch.setattr(stages, "quantize_model", spy)
    cfg, out, _ = study
    base = ["--teacher", str(out / "fp" / "final.pt"), "--config", "demo_fast", "--data",
            cfg["data"]["root"], "--calib", "2", "--fidelity-ids", *cfg["data"]["test_ids"]]
    saved = tmp_path / "w8.qgm"
    r8 = ptq_eval.main([*base, "--bits", "8", "--a-init", "max", "--save", str(saved),
                        "--out", str(tmp_path / "w8.json")])
    r8mse = ptq_eval.main([*base, "--bits", "8", "--out", str(tmp_path / "w8mse.json")])
    r2 = ptq_eval.main([*base, "--bits", "2", "--out", str(tmp_path / "w2.json")])
    ptq_eval.main([*base, "--bits", "8", "--a-init", "pct", "--a-percentile", "100", "--out",
                   str(tmp_path / "p100.json")])     # the 100th percentile is the max rule
    for f, m in dict(models[3].named_modules()).items():
        if isinstance(m, SOFT_QUANT_MODULES) and m.a_bits is not None:
            assert m.a_init == "pct" and m.a_percentile == 100.0
            torch.testing.assert_close(m.a_scale, dict(models[0].named_modules())[f].a_scale)
    with pytest.raises(SystemExit):                   # a percentile without the pct rule
        ptq_eval.main([*base, "--bits", "8", "--a-percentile", "99", "--out", "x.json"])
    quantized = [(f, m) for f, m in models[0].named_modules()
                 if isinstance(m, SOFT_QUANT_MODULES) and m.a_bits is not None]
    assert quantized
    for f, m in quantized:
        assert m.a_init == "max"
        torch.testing.assert_close(m.a_scale.detach(),
                                   max_act_init(inputs[(1, f)], m.a_bits, m.a_signed))
        mse = dict(models[1].named_modules())[f]
        assert mse.a_init == "mse"
        # against the max rule on the MSE run's own inputs: past the first layer they differ
        # from the max run's (the earlier layers' steps differ), by enough to put the MSE step
        # 0.06% above the max run's on one CPU
        own_max = max_act_init(inputs[(2, f)], m.a_bits, m.a_signed)
        assert float(mse.a_scale.detach()) <= float(own_max) * (1 + 1e-6)
    for r in (r8, r8mse, r2):
        fid = r["fidelity"]
        assert fid["sequences"] > 0 and 0.0 <= fid["rel_mean"] <= fid["rel_p99"]
    assert r8["fidelity"]["rel_mean"] < r2["fidelity"]["rel_mean"]
    # the saved file is the calibrated fake-quant model
    loaded, info = load_model(saved)
    assert info["meta"]["ptq"]["a_init"] == "max" and not info["meta"]["ptq"]["packed"]
    x = torch.rand(1, 1, 12, 64, 44).round()
    with torch.no_grad():
        want = models[0].eval()(x)["embeddings"]
        torch.testing.assert_close(loaded.eval()(x)["embeddings"], want)
    # --packed: the same calibration (same seed), converted, evaluated and saved as integers
    packed = tmp_path / "w8p.qgm"
    rp = ptq_eval.main([*base, "--bits", "8", "--a-init", "max", "--packed", "--save",
                        str(packed), "--out", str(tmp_path / "w8p.json")])
    loaded, info = load_model(packed)
    assert info["kind"] == "packed" and info["meta"]["ptq"]["packed"]
    with torch.no_grad():
        got = loaded(x)["embeddings"]
    assert float((got - want).norm() / want.norm()) < 2e-2   # integer vs fp32 rounding
    assert abs(rp["fidelity"]["rel_mean"] - r8["fidelity"]["rel_mean"]) < 2e-2


def test_release_zoo_adds_the_post_training_model_with_its_card(study, tmp_path, monkeypatch):
    """tools/release_zoo.py --ptq: a ptq_eval --save file and its packed conversion join a zoo,
    each verified (checksum, safe load, reference embedding), with a card whose dev-split table
    is the mean of the dev runs given and the command lines that made them."""
    from pathlib import Path

    from qgait import zoo
    from qgait.model_io import load_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import ptq_eval
    import release_zoo

    cfg, out, _ = study
    base = ["--teacher", str(out / "fp" / "final.pt"), "--config", "demo_fast", "--data",
            cfg["data"]["root"], "--calib", "2", "--bits", "8", "--w-init", "mse",
            "--a-init", "pct"]
    rel = tmp_path / "rel.qgm"
    ptq_eval.main([*base, "--save", str(rel), "--out", str(tmp_path / "rel.json")])
    dev = [ptq_eval.main([*base, "--seed", str(s), "--out", str(tmp_path / f"d{s}.json")])
           for s in (0, 1)]
    ptq_eval.main([*base, "--packed", "--out", str(tmp_path / "dp.json")])
    zdir = tmp_path / "zoo"
    hits = ",".join(str(tmp_path / f"d{s}.hits.npz") for s in (0, 1))
    args = ["--ptq", str(rel), "--ptq-dev", hits, "--zoo-dir", str(zdir)]
    release_zoo.main([*args, "--ptq-dev-packed", str(tmp_path / "dp.hits.npz")])
    names = ["casiab-lite3d-w8a8-ptq", "casiab-lite3d-w8a8-ptq-packed"]
    assert zoo.list_models(zdir) == names
    for name in names:
        assert zoo.verify(name, zoo_dir=zdir)["max_rel_diff"] <= zoo.REF_RTOL
        card = zoo.card(name, zoo_dir=zdir)
        nm = np.mean([d["NM"] for d in dev])
        assert f"| post-training W8A8, fake-quant (2 calibration batches, mean +- std) | " \
               f"{nm:.1f} +- " in card
        assert "| packed - FP [95%] |" in card and "--a-init pct --seed 1 --out " in card
        assert f"--packed --out {tmp_path / 'dp.json'}" in card
        assert f"--save {rel} --out {rel.with_suffix('.json')}" in card
    model, info = load_model(zdir / f"{names[1]}.qgm")
    assert info["kind"] == "packed" and info["meta"]["ptq"]["a_init"] == "pct"
    with pytest.raises(SystemExit, match="not a fake-quant model"):   # a packed file is refused
        release_zoo.main(["--ptq", str(zdir / f"{names[1]}.qgm"), "--ptq-dev", hits,
                          "--zoo-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
