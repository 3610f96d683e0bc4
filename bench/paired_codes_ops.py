"""A packed GaitLite3D with its pooling and part FCs on codes (C++ kernels) against the same model
with the torch ops they replaced, paired in one process.

    python bench/paired_codes_ops.py [--checkpoint qgait/zoo/casiab-lite3d-fp.qgm] [--bits W4A4]
        [--rounds 40] [--reps 10] [--threads N]

"after": the model as ``convert()`` builds it: ``PackedMaxPool3d`` pools int8 / uint8 codes with
``qgait::_max_pool_codes`` and ``PackedPartLinear`` multiplies codes and integer weights with
``qgait::_part_linear_codes`` (qgait/ops/codes.py). "before": the same model with those two
forwards replaced by what they ran until session 14, kept here: the codes pooled an axis at a
time with elementwise ``torch.maximum`` over strided views, and the part FCs as
``soft_fake_quant`` then an fp32 ``bmm`` with the dequantized weights. Each round times ``--reps``
forwards of one 30-frame sequence per variant (median), the order alternating; printed are the
medians, the per-round ratio before / after (median and 10-90% range) and how far the two
embeddings differ (fp32 rounding of the part FCs). Never asserted.
"""
import argparse
import importlib
import os
import statistics
import time
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paired_peers_model as peers  # noqa: E402
from _common import cpu_class  # noqa: E402

from qgait.nn.soft_quant import part_matmul  # noqa: E402
from qgait.ops import soft_fake_quant  # noqa: E402
from qgait.ops.codes import _triple  # noqa: E402

CV = importlib.import_module("qgait.quant.convert")


def _torch_pool(self, x):
    """PackedMaxPool3d.forward before the C++ kernel (stride = kernel, GaitLite3D's pool)."""
    if x.is_floating_point():
        return torch.nn.MaxPool3d.forward(self, x)
    v = x.permute(0, 2, 3, 4, 1)
    for ax, kk in zip((1, 2, 3), _triple(self.kernel_size)):
        if kk == 1:
            continue
        n = v.shape[ax] // kk
        v = v.narrow(ax, 0, n * kk).reshape(*v.shape[:ax], n, kk, *v.shape[ax + 1:])
        y = torch.maximum(v.select(ax + 1, 0), v.select(ax + 1, 1))
        for j in range(2, kk):
            torch.maximum(y, v.select(ax + 1, j), out=y)
        v = y
    return v.permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)


def _fp32_fc(self, x):
    """PackedPartLinear.forward before the C++ kernel: fake-quant input, fp32 bmm."""
    x = soft_fake_quant(x, self.a_scale, bits=self.a_bits, signed=self.a_signed)
    return part_matmul(x, self._dequantized(x.dtype))


AFTER = (CV.PackedMaxPool3d.forward, CV.PackedPartLinear.forward)
BEFORE = (_torch_pool, _fp32_fc)


def _use(fns):
    CV.PackedMaxPool3d.forward, CV.PackedPartLinear.forward = fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="qgait/zoo/casiab-lite3d-fp.qgm")
    ap.add_argument("--width", type=float, default=1.0, help="without --checkpoint")
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W8A8"], choices=list(peers.BITS))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU class: {cpu_class()}; {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}, {args.rounds} rounds of {args.reps}")
    model, desc = peers._fp_model(args.width, args.checkpoint or None)
    print(f"model: {desc}")
    x, calib = peers._silhouettes(model, 30, 4)
    for bits in args.bits:
        q = peers._qgait(model, calib, *peers.BITS[bits])
        times = {"before": [], "after": []}
        with torch.no_grad():
            for name, fns in (("before", BEFORE), ("after", AFTER)):
                _use(fns)
                for _ in range(5):
                    q(x)
            for r in range(args.rounds):
                order = (("before", BEFORE), ("after", AFTER))
                for name, fns in (order if r % 2 else order[::-1]):
                    _use(fns)
                    ts = []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        q(x)
                        ts.append(time.perf_counter() - t)
                    times[name].append(statistics.median(ts))
            _use(BEFORE)
            e_before = peers._emb(q(x))
            _use(AFTER)
            e_after = peers._emb(q(x))
        diff = float((e_after - e_before).abs().max() / e_before.abs().max())
        b, a = (statistics.median(times[k]) * 1e3 for k in ("before", "after"))
        ratios = sorted(p / n for p, n in zip(times["before"], times["after"]))
        lo, hi = ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]
        print(f"{bits}: before {b:.3f} ms, after {a:.3f} ms per sequence; before / after per "
              f"round median {ratios[len(ratios) // 2]:.3f}x (10-90%: {lo:.3f}-{hi:.3f}); "
              f"embeddings differ by {diff:.1e} (relative)")


if __name__ == "__main__":
    main()
