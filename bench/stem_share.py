"""The first layer's share of a packed GaitLite3D's time (issue 14, item 2).

GaitLite3D's stem reads a binary 1-channel silhouette; the packed kernels take it as uint8 0 / 1
codes (``PackedConv3d(a_bits=None)``) padded to 4 input channels on the CPU. This script times
the stem inside whole-model embeddings of one 30-frame sequence (a forward hook around it) for
the shipped packed models, in this process's CPU time, so the share is that of the work done:

    python bench/stem_share.py [--reps 20] [--threads 1]

Run it again under ``QGAIT_CPU_ISA=avx2`` for the AVX2 class. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+",
                    default=["casiab-lite3d-w8a8-packed", "casiab-lite3d-w4a4-packed"])
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import cpu_class

    from qgait import zoo

    torch.set_num_threads(args.threads)
    print(f"CPU class: {cpu_class()}")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1, 30, 64, 44, generator=g) > 0.5).float()
    for name in args.models:
        model, _ = zoo.load(name)
        stem = model.stem[0]
        acc = {"stem": 0.0, "t0": 0.0}

        def pre(mod, inp):
            acc["t0"] = time.process_time()

        def post(mod, inp, out):
            acc["stem"] += time.process_time() - acc["t0"]
        hooks = [stem.register_forward_pre_hook(pre), stem.register_forward_hook(post)]
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            acc["stem"] = 0.0
            t = time.process_time()
            for _ in range(args.reps):
                model(x)
            total = time.process_time() - t
        for h in hooks:
            h.remove()
        print(f"{name}: stem {type(stem).__name__}({stem.in_channels} -> {stem.out_channels}, "
              f"stride {stem.stride}, a_bits={stem.a_bits}): {1e3 * acc['stem'] / args.reps:.2f} "
              f"ms of {1e3 * total / args.reps:.2f} ms CPU per sequence = "
              f"{100 * acc['stem'] / total:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
