"""Paired timing of qgait's packed_conv3d against torch.ao's int8 Conv3d (x86 engine).

    python bench/paired_packed_conv3d.py [--rounds 10]

pytest-benchmark times one provider after the other, so on a VM whose speed drifts (this one's
does, by up to ~1.8x over a day) a ratio of two medians can mix two machine states. Here every
round calls qgait and torch.ao back to back, on the same layers and modes as
bench_packed_conv3d.py, and the ratio is taken per round; the median and the spread of the
per-round ratios are printed (never asserted).
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_packed_conv3d import LAYERS, _layer, _qgait, _torch_ao  # noqa: E402


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    if "x86" not in torch.backends.quantized.supported_engines:
        sys.exit("torch has no x86 quantized engine")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {args.rounds} rounds")
    with torch.no_grad():
        for name in LAYERS:
            x, w_int, w_scale, bias, _ = _layer(name)
            for mode in ("f32io", "q8io"):
                ao, _ = _torch_ao(mode, x, w_int, w_scale, bias)
                for bits in (8, 4):
                    ours, _ = _qgait(bits, mode, x, w_int, w_scale, bias)
                    for _ in range(3):  # warm-up
                        ours(), ao()
                    pairs = [(_time(ours), _time(ao)) for _ in range(args.rounds)]
                    r = sorted(q / a for q, a in pairs)
                    tq = statistics.median(p[0] for p in pairs) * 1e3
                    ta = statistics.median(p[1] for p in pairs) * 1e3
                    print(f"layer {name} {mode} int{bits}: qgait {tq:6.1f} ms, torch.ao {ta:6.1f} "
                          f"ms, qgait / torch.ao per round: median {statistics.median(r):.2f} "
                          f"(range {r[0]:.2f}-{r[-1]:.2f})")


if __name__ == "__main__":
    main()
