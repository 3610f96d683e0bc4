import json

import numpy as np
import pytest
import torch

from gait_fakes import FakeGaitDataset
from qgait.evaluation import (casia_b_rank1, evaluate, extract, format_casia_b, model_embed_fn,
                              part_distance, retrieval_metrics)
from qgait.models import GaitLite3D


def test_part_distance_is_mean_of_per_part_euclidean():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 4), torch.randn(2, 5, 4)
    d = part_distance(a, b)
    for i in range(3):
        for j in range(2):
            ref = np.mean([np.linalg.norm(a[i, :, p] - b[j, :, p]) for p in range(4)])
            assert d[i, j].item() == pytest.approx(ref, rel=1e-5)


def test_retrieval_metrics_hand_computed():
    #            g0   g1   g2   g3      gallery labels 2, 1, 3, 1
    dist = [[0.1, 0.2, 0.3, 0.25],   # probe label 1: ranked g0 x, g1 v, g3 v, g2 x
            [0.5, 0.1, 0.2, 0.3],    # probe label 2: ranked g1 x, g2 x, g3 x, g0 v
            [0.1, 0.1, 0.1, 0.1],    # probe label 9: no match anywhere -> skipped, counted
            [0.9, 0.8, 0.0, 0.7]]    # probe label 3: g2 first -> hit
    res = retrieval_metrics(torch.tensor(dist), [1, 2, 9, 3], [2, 1, 3, 1], ks=(1, 2, 5))
    assert res["n_probes"] == 4 and res["n_no_match"] == 1
    assert res["rank-1"] == pytest.approx(100 / 3)
    assert res["rank-2"] == pytest.approx(200 / 3)
    assert res["rank-5"] == pytest.approx(100.0)
    ap = [(1 / 2 + 2 / 3) / 2, 1 / 4, 1.0]
    inp = [2 / 3, 1 / 4, 1.0]
    assert res["mAP"] == pytest.approx(np.mean(ap) * 100)
    assert res["mINP"] == pytest.approx(np.mean(inp) * 100)


def test_retrieval_metrics_exclude_and_no_match_at_all():
    d = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 0.0]])
    # Leave-one-out: 0 and 1 share a label; 2 has no other sequence of its label.
    res = retrieval_metrics(d, [0, 0, 1], [0, 0, 1], ks=(1,), exclude=np.eye(3, dtype=bool))
    assert res["n_no_match"] == 1
    # probe 1: ranked (excluding itself) g2 x (0.5), g0 v (1.0) -> miss at rank 1, AP 1/2
    assert res["rank-1"] == pytest.approx(50.0)
    assert res["mAP"] == pytest.approx((1.0 + 0.5) / 2 * 100)
    none = retrieval_metrics(torch.zeros(1, 2), [5], [1, 2])
    assert none["n_no_match"] == 1 and np.isnan(none["rank-1"]) and np.isnan(none["mAP"])


def test_casia_b_rank1_hand_computed():
    rows = [  # subject, condition, view, feature value
        ("051", "nm-01", "000", 0), ("052", "nm-01", "000", 10),
        ("051", "nm-01", "090", 20), ("052", "nm-01", "090", 30),
        ("051", "nm-05", "000", 1), ("052", "nm-05", "000", 4),
        ("051", "nm-06", "090", 21), ("052", "nm-06", "090", 29),
        ("051", "cl-01", "000", 19),
        ("053", "cl-02", "000", 0),   # subject absent from the gallery: always a miss
    ]
    feats = torch.tensor([[[float(r[3])] * 2] for r in rows])   # [N, C=1, P=2]
    res = casia_b_rank1(feats, *zip(*[r[:3] for r in rows]))
    nm, cl = res["table"]["NM"], res["table"]["CL"]
    assert nm == {"000": {"000": 50.0, "090": 50.0}, "090": {"000": 50.0, "090": 100.0}}
    assert res["cross_view"]["NM"] == {"000": 50.0, "090": 50.0, "mean": 50.0}
    assert res["same_view"]["NM"] == {"000": 50.0, "090": 100.0, "mean": 75.0}
    # CL probes at 000: gallery 000 -> 052 (wrong), 051 (wrong);
    #                   gallery 090 -> 051 (right), 051 (wrong)
    assert cl == {"000": {"000": 0.0, "090": 50.0}}
    assert res["cross_view"]["CL"]["mean"] == 50.0 and res["same_view"]["CL"]["mean"] == 0.0
    assert "BG" not in res["table"]
    text = format_casia_b(res)
    assert "NM" in text and "50.00" in text and "75.00" in text


@pytest.fixture(scope="module")
def test_set():
    return FakeGaitDataset(n_subjects=3, views=["000", "090"], frames=8, seed=3, first_id=51)


def test_extract_is_independent_of_packing(test_set):
    torch.manual_seed(0)
    model = GaitLite3D(num_classes=0, width=0.25).eval()
    fn = model_embed_fn(model)
    alone = extract(fn, test_set, max_frames=1, progress=False)
    packed = extract(fn, test_set, max_frames=10_000, progress=False)
    assert alone.shape == (len(test_set), model.embed_dim, model.parts)
    torch.testing.assert_close(alone, packed, rtol=1e-5, atol=1e-5)


def test_evaluate_with_an_oracle_embed_fn(test_set):
    # An embed_fn that knows each sequence's subject (sequences arrive in dataset order) must
    # score 100% everywhere: checks packing, ordering and the tables end to end.
    subj = {q.path: int(q.subject) for q in test_set.seqs}
    order = []

    def fn(x, seqL):
        n = len(seqL)
        ids = [order.pop(0) for _ in range(n)]
        e = torch.zeros(n, 4, 2)
        for j, s in enumerate(ids):
            e[j, 0, :] = s
        return e

    order.extend(subj[q.path] for q in test_set.seqs)
    res = evaluate(fn, test_set, "casia-b", max_frames=30, progress=False, min_frames=10)
    short = [i for i in range(len(test_set)) if test_set.n_frames(i) < 10]
    assert 0 < len(short) < len(test_set)
    f = res["filtered"]
    assert len(f["excluded"]) == len(short) and f["generic"]["rank-1"] == 100.0
    n_probe = sum(q.condition[:2] != "nm" or q.condition >= "nm-05" for q in test_set.seqs)
    n_probe_short = sum(test_set.seqs[i].condition[:2] != "nm"
                        or test_set.seqs[i].condition >= "nm-05" for i in short)
    assert res["generic"]["n_probes"] == n_probe
    assert f["generic"]["n_probes"] == n_probe - n_probe_short
    for cond in ("NM", "BG", "CL"):
        assert res["casia_b"]["cross_view"][cond]["mean"] == 100.0
    assert res["generic"]["rank-1"] == 100.0 and res["generic"]["mAP"] == 100.0
    json.dumps(res)  # serialisable
    order.extend(subj[q.path] for q in test_set.seqs)
    g = evaluate(fn, test_set, "generic", progress=False)["generic"]
    assert g["rank-1"] == 100.0 and g["n_no_match"] == 0


def test_dataset_fingerprint_follows_contents_not_paths_or_times(tmp_path):
    import os
    import shutil
    from types import SimpleNamespace

    from qgait.evaluation.cache import dataset_fingerprint

    def tree(root):
        seqs = []
        for i, (s, c, v) in enumerate([("001", "nm-01", "000"), ("001", "bg-01", "090"),
                                       ("002", "cl-01", "180")]):
            p = root / s / c / v / f"{v}.pkl"
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                p.write_bytes(bytes([i]) * (100 + i))
            seqs.append(SimpleNamespace(subject=s, condition=c, view=v, path=str(p)))
        return SimpleNamespace(seqs=seqs)

    a = tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = tree(tmp_path / "b")
    os.utime(b.seqs[0].path, (1, 1))            # another place, other times: same data
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    with open(b.seqs[2].path, "r+b") as f:      # one byte of one file: another data set
        f.write(b"\xff")
    assert dataset_fingerprint(a) != dataset_fingerprint(b)
    b.seqs[0].view = "018"                       # the same files under other labels
    assert dataset_fingerprint(tree(tmp_path / "a")) != dataset_fingerprint(b)
