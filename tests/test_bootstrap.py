"""The CASIA-B per-probe outcomes, the 11-view tables built from them, and the paired bootstrap."""
import numpy as np
import pytest
import torch

from qgait.evaluation import casia_b_hits, casia_b_rank1, casia_b_tables, paired_bootstrap
from qgait.evaluation.bootstrap import cross_view_mean, subject_sums


def _rows_three_views():
    # Gallery: 051, 052 at 000 and 090; only 051 at 180 (052's 180 gallery walk is missing).
    # Each feature is a scalar; nearest = closest value.
    rows = [("051", "nm-01", "000", 0), ("052", "nm-01", "000", 10),
            ("051", "nm-02", "090", 20), ("052", "nm-02", "090", 30),
            ("051", "nm-03", "180", 40),
            # probes
            ("051", "nm-05", "000", 1),    # 000: 051 ok; 090: ->051 ok; 180: ->051 ok
            ("052", "nm-05", "000", 9),    # 000: 052 ok; 090: ->051 x;  180: ->051 x (absent)
            ("052", "nm-06", "090", 29),   # 000: ->052 ok; 090: 052 ok; 180: ->051 x
            ("051", "nm-06", "180", 26)]   # 000: ->052 x; 090: ->052 x; 180: 051 ok
    feats = torch.tensor([[[float(r[3])] * 3] for r in rows])
    return feats, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def test_three_view_table_hand_computed_identical_views_excluded():
    feats, subj, cond, view = _rows_three_views()
    res = casia_b_rank1(feats, subj, cond, view)
    assert res["views"] == ["000", "090", "180"]
    assert res["table"]["NM"] == {"000": {"000": 100.0, "090": 50.0, "180": 50.0},
                                  "090": {"000": 100.0, "090": 100.0, "180": 0.0},
                                  "180": {"000": 0.0, "090": 0.0, "180": 100.0}}
    cv = res["cross_view"]["NM"]
    assert cv["000"] == 50.0 and cv["090"] == 50.0 and cv["180"] == 0.0   # diagonal left out
    assert cv["mean"] == pytest.approx(100 / 3)
    assert res["same_view"]["NM"]["mean"] == 100.0
    # mAP against the gallery less the probe's own view:
    # probe 051@000 ranks 051@090 (19), 052@090 (29), 051@180 (39): AP = (1 + 2/3) / 2
    # probe 052@000: 051@090 (11), 052@090 (21), 051@180 (31): AP 1/2
    # probe 052@090: 052@000 (19), 051@000 (29), 051@180 (11 -> first!): ranks 051, 052: AP 1/2
    # probe 051@180: 051@090 (6), 052@000 (16), 051@000 (26), 052@090 (4 -> first):
    #   order 052@090, 051@090, 052@000, 051@000 -> matches at 2 and 4: AP (1/2 + 2/4) / 2
    ap = [(1 + 2 / 3) / 2, 1 / 2, 1 / 2, (1 / 2 + 2 / 4) / 2]
    assert res["mAP"]["NM"] == pytest.approx(np.mean(ap) * 100)


def test_missing_gallery_view_is_left_out_not_counted_as_miss():
    feats, subj, cond, view = _rows_three_views()
    keep = [i for i, c in enumerate(cond) if not (c == "nm-03")]   # no gallery at 180 at all
    f = feats[keep]
    res = casia_b_rank1(f, *[[a[i] for i in keep] for a in (subj, cond, view)])
    assert "180" not in res["table"]["NM"]["000"]
    assert res["cross_view"]["NM"]["000"] == 50.0                  # only gallery 090 counts


def test_tables_from_hits_with_unit_weights_equal_the_plain_tables():
    torch.manual_seed(0)
    subj, cond, view = [], [], []
    for s in ("051", "052", "053"):
        for c in ("nm-01", "nm-02", "nm-05", "bg-01", "cl-02"):
            for v in ("000", "018", "036"):
                subj.append(s), cond.append(c), view.append(v)
    feats = torch.randn(len(subj), 4, 2)
    hits = casia_b_hits(feats, subj, cond, view)
    w = casia_b_tables(hits, weights={"051": 1, "052": 1, "053": 1})
    plain = casia_b_rank1(feats, subj, cond, view)
    assert w["table"] == plain["table"] and w["cross_view"] == plain["cross_view"]
    # the vectorised resample path agrees with the table path for any weights
    sums = subject_sums(hits)
    weights = {"051": 2, "052": 0, "053": 1}
    ref = casia_b_tables(hits, weights=weights)
    got = cross_view_mean(sums, ["051", "052", "053"], np.array([[2, 0, 1]]))
    for c in ("NM", "BG", "CL"):
        assert got[c][0] == pytest.approx(ref["cross_view"][c]["mean"])


def _synthetic_hits(p_correct, n_subjects=20, views=("000", "090", "180"), seed=0):
    """Hits of a method that answers each (probe, gallery view) right with p_correct[subject]."""
    rng = np.random.default_rng(seed)
    subs = [f"{i:03d}" for i in range(n_subjects)]
    out = {"views": list(views), "cond": {}}
    for c in ("NM", "BG", "CL"):
        s_list, v_list, h = [], [], []
        for i, s in enumerate(subs):
            for v in views:
                for _ in range(2):
                    s_list.append(s), v_list.append(v)
                    h.append((rng.random(len(views)) < p_correct[i]).astype(float))
        out["cond"][c] = {"subject": np.array(s_list), "view": np.array(v_list),
                          "hit": np.array(h)}
    return out


def test_paired_bootstrap_identical_methods_and_a_clear_gap():
    p = np.linspace(0.3, 0.9, 20)
    base = [_synthetic_hits(p, seed=s) for s in range(3)]
    same = paired_bootstrap(base, base, n_boot=500)
    for c in ("NM", "BG", "CL", "mean"):
        assert same[c]["diff"] == 0.0 and same[c]["lo"] == 0.0 and same[c]["hi"] == 0.0
    better = [_synthetic_hits(np.minimum(p + 0.25, 1.0), seed=10 + s) for s in range(3)]
    res = paired_bootstrap(better, base, n_boot=2000)
    assert res["mean"]["lo"] > 0 and res["mean"]["p_le_0"] == 0.0
    assert res["mean"]["lo"] < res["mean"]["diff"] < res["mean"]["hi"]
    # the point estimate is the difference of the seed-averaged full-set rank-1
    full = {k: np.mean([casia_b_tables(h)["cross_view"][k]["mean"] for h in better])
            - np.mean([casia_b_tables(h)["cross_view"][k]["mean"] for h in base])
            for k in ("NM", "BG", "CL")}
    assert res["NM"]["diff"] == pytest.approx(full["NM"])
    assert res["mean"]["diff"] == pytest.approx(np.mean(list(full.values())))


def test_paired_bootstrap_no_real_difference_interval_covers_zero():
    p = np.linspace(0.3, 0.9, 20)
    a = [_synthetic_hits(p, seed=s) for s in range(3)]
    b = [_synthetic_hits(p, seed=100 + s) for s in range(3)]
    res = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert res["mean"]["lo"] < 0 < res["mean"]["hi"]
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], b)


def test_compare_hits_tool(tmp_path, capsys, monkeypatch):
    """tools/compare_hits.py: two stored evaluations compared as the study compares methods."""
    from pathlib import Path

    from qgait.pipeline.study import save_hits

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import compare_hits

    feats, subj, cond, view = _rows_three_views()
    hits = casia_b_hits(feats, subj, cond, view)
    worse = {"views": hits["views"], "cond": {
        c: {**h, "hit": np.zeros_like(h["hit"])} for c, h in hits["cond"].items()}}
    a, b = tmp_path / "a.hits.npz", tmp_path / "b.hits.npz"
    save_hits(a, hits, {"k": 1})
    save_hits(b, worse, {"k": 1})
    assert compare_hits.main([str(a), str(b), "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    nm = next(line for line in out.splitlines() if line.startswith("| NM |"))
    assert nm.startswith(f"| NM | {100 / 3:.2f} | 0.00 | +{100 / 3:.2f} [")
    assert compare_hits.main([f"{a},{a}", f"{a},{a}", "--n-boot", "200"]) == 0
    assert "| mean | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="missing.npz: no such hits file"):
        compare_hits.main([str(tmp_path / "missing.npz"), str(b)])
