"""Paired bootstrap between two evaluated models on CASIA-B, from their stored hits.

``qgait study`` stores each evaluation beside its checkpoint as ``<checkpoint>.hits.npz``
(per-probe outcomes). This compares any two of them, or two groups over seeds, as the study
compares its methods: resampling the probe subjects, paired (qgait.evaluation.bootstrap)::

    python tools/compare_hits.py A.pt.hits.npz B.pt.hits.npz
    python tools/compare_hits.py A_seed0.hits.npz,A_seed1.hits.npz B_seed0.hits.npz,B_seed1.hits.npz

prints, per condition and for the mean over conditions, rank-1 of A and B and A - B with its
95% interval. Both sides must be evaluated on the same test subjects.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_group(spec: str) -> list[dict]:
    from qgait.pipeline.study import load_hits

    out = []
    for p in spec.split(","):
        h = load_hits(Path(p))
        if h is None:
            raise SystemExit(f"compare_hits: {p}: no such hits file (qgait study writes "
                             "<checkpoint>.hits.npz beside each evaluated checkpoint)")
        out.append(h)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="hits file(s) of A, comma-separated over seeds")
    ap.add_argument("b", help="hits file(s) of B, comma-separated over seeds")
    ap.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    from qgait.evaluation.bootstrap import paired_bootstrap

    res = paired_bootstrap(load_group(args.a), load_group(args.b), n_boot=args.n_boot)
    print("| condition | A | B | A - B [95%] |")
    print("| --- | --- | --- | --- |")
    for cond, r in res.items():
        print(f"| {cond} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} "
              f"[{r['lo']:+.2f}, {r['hi']:+.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
