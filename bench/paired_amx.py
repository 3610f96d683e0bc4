"""The AMX-INT8 tiles against the AVX-512 VNNI tiles, whole packed GaitLite3D and per layer,
timed in paired, alternating rounds (a CPU with AMX only).

    python bench/paired_amx.py [--models casiab-lite3d-w8a8-packed ...] [--rounds 40] [--threads 1]

The same packed model runs one 30-frame binary sequence with QGAIT_AMX=0 (every layer on the
VNNI path, Winograd where it takes 4-bit layers) and QGAIT_AMX unset (the AMX tiles where
amx_wanted sends a layer), the order alternating from round to round, so a drifting machine
affects both alike; the ratio is taken per round. Each PackedConv3d is timed too (forward
hooks), and each layer's rate is given against this CPU's tdpbusd peak (bench/peak/int8_peak.cpp,
measured here on as many threads). Wall clock; never asserted.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import amx_peak_lib, cpu_class  # noqa: E402

MODES = {"vnni": "0", "amx": None}  # QGAIT_AMX for each side (None: unset, the default choice)


def amx_peak(threads: int):
    """This CPU's tdpbusd rate in MAC/s on `threads` threads, or the reason it has none."""
    lib = amx_peak_lib()
    if isinstance(lib, str):
        return lib
    macs, best = 100_000_000_000, float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        lib.amx_peak(macs, threads)
        best = min(best, time.perf_counter() - t0)
    return macs / best


def _set_mode(mode):
    v = MODES[mode]
    if v is None:
        os.environ.pop("QGAIT_AMX", None)
    else:
        os.environ["QGAIT_AMX"] = v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["casiab-lite3d-w8a8-packed", "casiab-lite3d-w4a4-packed"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import qgait
    import qgait.zoo

    if "amx_int8=1" not in torch.ops.qgait._cpu_features():
        sys.exit(f"no AMX-INT8 on this CPU ({torch.ops.qgait._cpu_features()})")
    print(f"CPU class: {cpu_class()}")
    peak = amx_peak(args.threads)
    print(f"tdpbusd peak on {args.threads} thread(s): " +
          (f"{peak / 1e9:.0f} GMAC/s" if not isinstance(peak, str) else peak))
    x = (torch.rand(1, 1, 30, 64, 44, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    for name in args.models:
        model, _ = qgait.zoo.load(name)
        model.eval()
        convs = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "PackedConv3d"]
        whole = {k: [] for k in MODES}
        per = {(n, k): [] for n, _ in convs for k in MODES}
        paths, shapes = {}, {}
        state = {"mode": "vnni", "t0": {}}

        def pre(mod, inp, n):
            state["t0"][n] = time.perf_counter()

        def post(mod, inp, out, n):
            per[(n, state["mode"])].append(time.perf_counter() - state["t0"][n])
            paths[(n, state["mode"])] = torch.ops.qgait._packed_conv3d_cpu_path()
            shapes[n] = tuple(out.shape)

        hooks = []
        for n, m in convs:
            hooks.append(m.register_forward_pre_hook(lambda mod, i, n=n: pre(mod, i, n)))
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: post(mod, i, o, n)))
        with torch.no_grad():
            for mode in MODES:  # warm-up (weight layouts built, buffers grown)
                _set_mode(mode)
                state["mode"] = mode
                for _ in range(3):
                    model(x)
            for k in per:
                per[k].clear()
            for r in range(args.rounds):
                for mode in (("vnni", "amx") if r % 2 else ("amx", "vnni")):
                    _set_mode(mode)
                    state["mode"] = mode
                    t0 = time.perf_counter()
                    model(x)
                    whole[mode].append(time.perf_counter() - t0)
        for h in hooks:
            h.remove()
        os.environ.pop("QGAIT_AMX", None)
        ratio = sorted(a / b for a, b in zip(whole["vnni"], whole["amx"]))
        print(f"{name}: VNNI {statistics.median(whole['vnni']) * 1e3:.2f} ms, AMX "
              f"{statistics.median(whole['amx']) * 1e3:.2f} ms per sequence; VNNI / AMX per "
              f"round median {statistics.median(ratio):.2f}x (range {ratio[0]:.2f}-"
              f"{ratio[-1]:.2f}), {args.rounds} rounds")
        for n, m in convs:
            a, b = statistics.median(per[(n, "vnni")]), statistics.median(per[(n, "amx")])
            mac = _macs(shapes[n], m)
            frac = (f", {mac / b / peak * 100:4.1f}% of the tdpbusd peak"
                    if not isinstance(peak, str) else "")
            print(f"  {n:12s} {paths[(n, 'vnni')]:>14s} {a * 1e3:6.3f} ms  "
                  f"{paths[(n, 'amx')]:>14s} {b * 1e3:6.3f} ms  {a / b:4.2f}x{frac}")


def _macs(out_shape, conv) -> int:
    """Multiply-adds of one PackedConv3d call: its output elements times C_in times the kernel
    volume."""
    n, co, t, h, w = out_shape
    k = conv.kernel_size
    return n * co * t * h * w * conv.in_channels * k[0] * k[1] * k[2]


if __name__ == "__main__":
    main()
