"""The AVX2 class's int8 ceilings, measured, beside the packed convolutions and torch.ao.

    python bench/avx2_ceiling.py [--rounds 7] [--layers A B] [--no-layers]
    QGAIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/avx2_ceiling.py   # on AVX-512 CPUs

Without VNNI a u8 x s8 product goes through vpmaddubsw, and what else a kernel issues per
product sets its ceiling: qgait's int16 step (one vpaddw per vpmaddubsw, widened once per L
steps) or an int8 GEMM's exact step (vpmaddubsw, vpmaddwd by ones and vpaddd per product, as
oneDNN's AVX2 kernels do). bench/peak/avx2_steps.cpp runs each step on data in L1, one thread;
the rate of each (median of ``--rounds``, this process's CPU time) is that kind of kernel's
ceiling on this core, and the ratio of the two bounds how much faster the int16 step can make a
layer than torch.ao's int8 convolution when both run as close to their ceilings.

Then (unless ``--no-layers``) the benchmark layers A and B (bench_packed_conv3d.py, float in /
out), one thread, CPU time, qgait and torch.ao alternating per round: each one's multiply-adds
per second (the layer's real ones, 27 taps x C_in per output) and the fraction of its ceiling.
qgait's W4A4 runs Winograd where it is exact (2.25x fewer multiply-adds), so its rate can pass
the direct step's ceiling. Nothing is asserted.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

import qgait  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import avx2_steps_lib, cpu_class  # noqa: E402

KINDS = {0: "vpmaddubsw alone (registers): the multiplier",
         1: "qgait int16 step, 6 px x 16 ch (maddubs + vpaddw)",
         2: "int8 GEMM step, 5 px x 16 ch (maddubs + maddwd + paddd)",
         3: "int16 step, 4 px x 24 ch (not in qgait)"}


def step_rates(lib, rounds: int, macs: float = 3e9) -> dict:
    """{kind: multiply-adds per second}, median over ``rounds`` CPU-timed runs."""
    rates = {}
    for kind in KINDS:
        lib.avx2_steps(kind, int(macs / 10))            # warm-up
        rs = []
        for _ in range(rounds):
            t = time.process_time()
            n = lib.avx2_steps(kind, int(macs))
            rs.append(n / (time.process_time() - t))
        rates[kind] = statistics.median(rs)
    return rates


def layer_rates(names, rounds: int) -> list:
    """[(layer, label, multiply-adds per second, path)] for qgait and torch.ao, one thread."""
    from bench_packed_conv3d import CASES, _layer, _qgait, _torch_ao

    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for name in names:
            runs = []
            for case, (wb, ab) in CASES.items():
                x, w_int, w_scale, bias, macs = _layer(name, wb)
                runs.append((f"qgait {case}", _qgait(wb, "f32io", x, w_int, w_scale, bias, ab)[0],
                             macs))
            x, w_int, w_scale, bias, macs = _layer(name, 8)
            runs.append(("torch.ao int8", _torch_ao("f32io", x, w_int, w_scale, bias)[0], macs))
            times = {label: [] for label, _, _ in runs}
            paths = {}
            for label, fn, _ in runs:
                fn(), fn()
                if label.startswith("qgait"):
                    paths[label] = torch.ops.qgait._packed_conv3d_cpu_path()
            for i in range(rounds):
                for label, fn, _ in (runs if i % 2 == 0 else runs[::-1]):
                    t = time.process_time()
                    fn()
                    times[label].append(time.process_time() - t)
            for label, _, macs in runs:
                rows.append((name, label, macs / statistics.median(times[label]),
                             paths.get(label, "oneDNN")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--no-layers", action="store_true", help="the step ceilings only")
    args = ap.parse_args(argv)
    lib = avx2_steps_lib()
    if isinstance(lib, str):
        sys.exit(f"avx2_ceiling: {lib}")
    if lib.avx2_step_kinds() != len(KINDS):
        sys.exit(f"avx2_ceiling: bench/peak/avx2_steps.cpp has {lib.avx2_step_kinds()} step "
                 f"kinds, this script names {len(KINDS)}: update KINDS")
    print(f"CPU class: {cpu_class()}")
    print(f"load average {os.getloadavg()[0]:.1f}; one thread, CPU time, median of {args.rounds}")
    rates = step_rates(lib, args.rounds)
    peak = rates[0]
    print("\n| step (data in L1, one core) | GMAC/s | of the multiplier |")
    print("| --- | --- | --- |")
    for kind, label in KINDS.items():
        print(f"| {label} | {rates[kind] / 1e9:.1f} | {rates[kind] / peak:.0%} |")
    print(f"\nceiling ratio, qgait int16 step / int8 GEMM step: {rates[1] / rates[2]:.2f}x "
          f"(4 x 24 tile: {rates[3] / rates[2]:.2f}x)")
    if args.no_layers:
        return
    if not qgait.cpu_isa().startswith("avx2"):
        print(f"\nnote: qgait runs at ISA level {qgait.cpu_isa()}, not the AVX2 class; set "
              "QGAIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to compare against these ceilings")
    # the step each path runs: int16 sums (maddubs, its Winograd form) or an int8 GEMM's
    # (maddubs1: vpmaddubsw, vpmaddwd, vpaddd; madd16 does as many multiplier operations)
    step = {"avx2-maddubs": 1, "avx2-maddubs-winograd": 1, "avx2-maddubs1": 2,
            "avx2-madd16": 2, "oneDNN": 2}
    rows = layer_rates(args.layers, args.rounds)
    print("\n| layer | kernel | path | GMAC/s | of its step's ceiling |")
    print("| --- | --- | --- | --- | --- |")
    for name, label, rate, path in rows:
        frac = f"{rate / rates[step[path]]:.0%}" if path in step else "-"
        print(f"| {name} | {label} | {path} | {rate / 1e9:.1f} | {frac} |")
    for name in args.layers:
        r = {label: rate for n, label, rate, _ in rows if n == name}
        print(f"layer {name}: qgait / torch.ao  W8A8 {r['qgait W8A8'] / r['torch.ao int8']:.2f}x, "
              f"W4A8 {r['qgait W4A8'] / r['torch.ao int8']:.2f}x, "
              f"W4A4 {r['qgait W4A4'] / r['torch.ao int8']:.2f}x")


if __name__ == "__main__":
    main()
