"""Packed GaitLite3D per 30-frame sequence: integer between layers (convert's chaining) against
fp32 between layers (requantize=False), timed in paired, alternating rounds.

    python bench/paired_packed_model.py [--widths 0.5 1.0] [--bits W8A8 W4A4] [--rounds 10]
    QGAIT_CPU_ISA=avx2 python bench/paired_packed_model.py     # the AVX2 class

Both models are converted from the same fake-quant model (steps initialised on random
silhouettes, BatchNorm statistics perturbed), so they compute the same embeddings (the test
suite checks they are equal bit for bit); what differs is only whether the codes or fp32 maps
travel between the convolutions. Every round runs both back to back (alternating which goes
first) and the ratio is taken per round, so a loaded or drifting machine affects both alike.
Also printed: the stem's share of the chained model's time (the stem timed alone on the same
input, same rounds). Never asserted.
"""
import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_timing_args, cpu_class, timer  # noqa: E402

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


def _models(width, w_bits, a_bits, frames):
    from qgait.models import GaitLite3D
    from qgait.quant import QuantConfig, convert, quantize_

    torch.manual_seed(0)
    m = GaitLite3D(num_classes=0, width=width)
    quantize_(m, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    x = (torch.rand(1, 1, frames, 64, 44) < 0.3).float()
    m.train()
    m(x)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm3d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    return convert(copy.deepcopy(m), requantize=False), convert(copy.deepcopy(m)), x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A4"], choices=list(BITS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--frames", type=int, default=30)
    add_timing_args(ap)
    args = ap.parse_args(argv)
    _time = timer(args)
    print(f"CPU class: {cpu_class()}")
    print(f"clock {args.clock}, load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, {args.rounds} rounds, one {args.frames}-frame sequence")
    with torch.no_grad():
        for width in args.widths:
            for bits in args.bits:
                flat, chained, x = _models(width, *BITS[bits], args.frames)
                assert torch.equal(flat(x)["embeddings"], chained(x)["embeddings"])
                runs = {"fp32 between": lambda: flat(x), "int between": lambda: chained(x),
                        "stem": lambda: chained.stem(x)}
                for f in runs.values():
                    f(), f()
                t = {k: [] for k in runs}
                order = list(runs)
                for i in range(args.rounds):
                    for k in (order if i % 2 == 0 else order[::-1]):
                        t[k].append(_time(runs[k]))
                gain = sorted(a / b for a, b in zip(t["fp32 between"], t["int between"]))
                share = sorted(s / c for s, c in zip(t["stem"], t["int between"]))
                med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
                print(f"width {width} {bits}: fp32 between {med['fp32 between']:.2f} ms, int "
                      f"between {med['int between']:.2f} ms, speed-up per round median "
                      f"{statistics.median(gain):.2f}x (range {gain[0]:.2f}-{gain[-1]:.2f}); stem "
                      f"{med['stem']:.2f} ms = {statistics.median(share) * 100:.0f}% of the "
                      f"chained model (range {share[0] * 100:.0f}-{share[-1] * 100:.0f}%)",
                      flush=True)


if __name__ == "__main__":
    main()
