"""Paired timing of qgait's packed_conv3d against torch.ao's int8 Conv3d (x86 engine).

    python bench/paired_packed_conv3d.py [--rounds 10] [--layers A B] [--cases W8A8 W4A8 W4A4]
    QGAIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/paired_packed_conv3d.py  # AVX2 class

pytest-benchmark times one provider after the other, so on a VM whose speed drifts (this one's
does, by up to ~1.8x over a day) or that other jobs load, a ratio of two medians can mix two
machine states. Here every round calls qgait and torch.ao back to back (alternating which goes
first), on the same layers and modes as bench_packed_conv3d.py, and the ratio is taken per
round; the median and the spread of the per-round ratios are printed (never asserted).
torch.ao always runs its int8 convolution (8-bit activations, int8 weights; for the W4 cases
the same int4-valued weights qgait runs): it has no faster mode for fewer bits. The first line
names the CPU class and the ISA caps in force.
"""
import argparse
import os
import statistics
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_timing_args, cpu_class, timer  # noqa: E402
from bench_packed_conv3d import CASES, LAYERS, _layer, _qgait, _torch_ao  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--modes", nargs="+", default=["f32io", "q8io"], choices=["f32io", "q8io"])
    ap.add_argument("--full-range", action="store_true",
                    help="8-bit activations over all 256 codes (x * 2.55 at step 0.01) instead of "
                         "0..100; q8io then also counts torch.ao's codes that differ from qgait's "
                         "exact ones by more than 1 (vpmaddubsw saturation without VNNI)")
    add_timing_args(ap)
    args = ap.parse_args(argv)
    _time = timer(args)
    if "x86" not in torch.backends.quantized.supported_engines:
        sys.exit("torch has no x86 quantized engine")
    print(f"CPU class: {cpu_class()}")
    print(f"clock {args.clock}, load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, {args.rounds} rounds")
    with torch.no_grad():
        for name in args.layers:
            for case in args.cases:
                w_bits, a_bits = CASES[case]
                x, w_int, w_scale, bias, _ = _layer(name, w_bits)
                if args.full_range:
                    x = x * 2.55
                for mode in args.modes:
                    ao, _ = _torch_ao(mode, x, w_int, w_scale, bias)
                    ours, _ = _qgait(w_bits, mode, x, w_int, w_scale, bias, a_bits)
                    for _ in range(3):  # warm-up
                        ours(), ao()
                    pairs = []
                    for i in range(args.rounds):
                        if i % 2:
                            ta = _time(ao)
                            pairs.append((_time(ours), ta))
                        else:
                            pairs.append((_time(ours), _time(ao)))
                    wrong = ""
                    if mode == "q8io" and a_bits == 8:
                        d = (ours().int() - ao().int_repr().int()).abs()
                        wrong = f"; torch.ao codes off by > 1: {int((d > 1).sum())} of {d.numel()}"
                    r = sorted(q / a for q, a in pairs)
                    tq = statistics.median(p[0] for p in pairs) * 1e3
                    ta = statistics.median(p[1] for p in pairs) * 1e3
                    print(f"layer {name} {mode} {case}: qgait {tq:6.1f} ms, torch.ao int8 "
                          f"{ta:6.1f} ms, torch.ao / qgait per round: median "
                          f"{1 / statistics.median(r):.2f}x (range {1 / r[-1]:.2f}-{1 / r[0]:.2f}){wrong}",
                          flush=True)


if __name__ == "__main__":
    main()
