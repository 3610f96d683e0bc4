"""Each packed convolution's share of a packed GaitLite3D's time, and the stem's (issue 14,
item 2).

GaitLite3D's stem reads a binary 1-channel silhouette; the packed kernels take it as uint8 0 / 1
codes (``PackedConv3d(a_bits=None)``), with the W taps of a window row folded into the 4-byte
steps on the CPU. This script times every PackedConv3d inside whole-model embeddings of one
30-frame sequence (forward hooks around each) for the shipped packed models, in this process's
CPU time, so a share is that of the work done; per layer it also prints the multiply-adds and,
where bench/peak/int8_peak.cpp builds and runs (AVX-512 VNNI), the fraction of this CPU's
measured int8 peak the layer reaches (the peak timed here, on as many threads):

    python bench/stem_share.py [--reps 20] [--threads 1] [--no-layers]

Run it again under ``QGAIT_CPU_ISA=avx2`` for the AVX2 class (the peak is then the AVX-512 one,
so its fractions read low). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch


def _macs(mod, out) -> int:
    """Multiply-adds of a convolution that wrote ``out`` (the real ones: C_in unpadded)."""
    kt, kh, kw = mod.kernel_size
    return out.numel() * mod.in_channels * kt * kh * kw


@functools.cache   # the shipped models share their layer shapes: each count timed once
def _peak_seconds(macs: int, threads: int, reps: int = 5):
    """CPU seconds (wall x threads, comparable with the layers' CPU time) this CPU's VNNI peak
    needs for ``macs`` multiply-adds on ``threads`` threads, or None."""
    from _common import int8_peak_lib

    lib = int8_peak_lib()
    if isinstance(lib, str):
        return None
    lib.int8_peak(macs, threads)   # warm-up (clock)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        lib.int8_peak(macs, threads)
        best = min(best, time.perf_counter() - t)
    return best * threads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-layers", action="store_true", help="only the stem's share line")
    ap.add_argument("--models", nargs="+",
                    default=["casiab-lite3d-w8a8-packed", "casiab-lite3d-w4a4-packed"])
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import cpu_class

    from qgait import zoo
    from qgait.ops.packed_conv3d import PackedConv3d

    torch.set_num_threads(args.threads)
    print(f"CPU class: {cpu_class()}")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1, 30, 64, 44, generator=g) > 0.5).float()
    for name in args.models:
        model, _ = zoo.load(name)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedConv3d)]
        spent = {n: 0.0 for n, _ in layers}
        macs, t0, hooks = {}, {}, []
        for n, m in layers:
            def pre(mod, inp, n=n):
                t0[n] = time.process_time()

            def post(mod, inp, out, n=n):
                spent[n] += time.process_time() - t0[n]
                macs[n] = _macs(mod, out)
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            spent = dict.fromkeys(spent, 0.0)
            t = time.process_time()
            for _ in range(args.reps):
                model(x)
            total = time.process_time() - t
        for h in hooks:
            h.remove()
        stem_name, stem = layers[0]
        ms = {n: 1e3 * v / args.reps for n, v in spent.items()}
        print(f"{name}: stem {type(stem).__name__}({stem.in_channels} -> {stem.out_channels}, "
              f"stride {stem.stride}, a_bits={stem.a_bits}): {ms[stem_name]:.2f} "
              f"ms of {1e3 * total / args.reps:.2f} ms CPU per sequence = "
              f"{100 * spent[stem_name] / total:.1f}%")
        if args.no_layers:
            continue
        for n, m in layers:
            peak = _peak_seconds(macs[n], args.threads)
            frac = ("" if peak is None
                    else f", {100 * peak * 1e3 / ms[n]:.0f}% of the measured VNNI peak")
            print(f"  {n:12s} {m.in_channels:>3} -> {m.out_channels:<3} k{m.kernel_size} "
                  f"{macs[n] / 1e6:7.1f} M MAC  {ms[n]:6.2f} ms CPU "
                  f"({100 * spent[n] / total:4.1f}%){frac}")
        convs = sum(spent.values())
        print(f"  convolutions {100 * convs / total:.1f}% of the model's CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
