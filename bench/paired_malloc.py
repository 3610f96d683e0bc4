"""soft_fake_quant as users run it: the same work under the three allocator settings a CPU
process can have (issue 14, item 5).

The pytest benchmarks set ``THP_MEM_ALLOC_ENABLE=1`` for every provider; a user's own script
gets glibc's default malloc, which serves every block above its mmap threshold (at most 32 MiB)
with a fresh ``mmap`` and unmaps it on ``free``: each call's output and gradient are then
page-faulted in afresh, 4 KiB at a time. This script runs one child process per setting
(allocator settings are process-wide):

* ``glibc default``         what a plain script gets;
* ``keep_freed_memory()``   ``qgait.keep_freed_memory()`` (what the ``qgait`` command applies):
                            large blocks from the heap, freed memory kept;
* ``THP_MEM_ALLOC_ENABLE=1`` torch's own huge-page allocation for large tensors.

In each: soft_fake_quant forward + backward (4-bit, per tensor, k = 0, as stage 1 trains), the
same with torch's learnable fake quant (LSQ, what a user would otherwise run), ``clone()`` (a
fresh copy: the floor with fresh memory) and ``copy_`` into a preallocated tensor (the floor
without), median ms over rounds, plus the minor page faults per qgait call. The table gives each
setting's ratio torch / qgait and qgait's time against its own time under glibc's default.

    python bench/paired_malloc.py [--numel 16777216] [--rounds 15] [--threads 2]

Nothing is asserted; ``tests/test_bench_peers.py`` runs it at its smallest settings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

SETTINGS = {
    "glibc default": {"QGAIT_MALLOC": "default", "THP_MEM_ALLOC_ENABLE": "0"},
    "keep_freed_memory()": {"QGAIT_MALLOC": "keep", "THP_MEM_ALLOC_ENABLE": "0"},
    "THP_MEM_ALLOC_ENABLE=1": {"QGAIT_MALLOC": "default", "THP_MEM_ALLOC_ENABLE": "1"},
}


def child(numel: int, rounds: int, threads: int | None) -> dict:
    import resource
    import statistics
    import time

    import torch

    import qgait
    from qgait.ops.soft_quant import default_gamma, soft_fake_quant

    if threads:
        torch.set_num_threads(threads)
    applied = qgait.keep_freed_memory() if os.environ["QGAIT_MALLOC"] == "keep" else False
    bits, qn, qp = 4, -8, 7
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(numel, generator=g) * 2).requires_grad_()
    s = torch.tensor([0.25], requires_grad=True)
    zp = torch.zeros(1)
    gamma = default_gamma(numel, 1, qp)
    gy = torch.ones(numel)
    dst = torch.empty(numel)

    def qgait_step():
        y = soft_fake_quant(x, s, bits=bits, k=0.0, gamma=gamma)
        torch.autograd.grad(y, (x, s), gy)

    def torch_step():
        y = torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, qn, qp, gamma)
        torch.autograd.grad(y, (x, s), gy)

    def clone():
        x.detach().clone()

    def copy():
        dst.copy_(x.detach())

    fns = {"qgait": qgait_step, "torch": torch_step, "clone": clone, "copy_": copy}
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    faults = []
    names, order = list(fns), random.Random(0)
    for _ in range(rounds):
        # shuffled per round: a rotating order would keep each one's predecessor
        for k in order.sample(names, len(names)):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
            if k == "qgait":
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"applied": applied, "threads": torch.get_num_threads(),
            "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "faults": statistics.median(faults)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 << 20, help="elements of x (fp32)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.numel, args.rounds, args.threads)))
        return 0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import cpu_class

    print(f"CPU class: {cpu_class()}")
    print(f"soft_fake_quant 4-bit per tensor, forward + backward, {args.numel:,} fp32 elements "
          f"({args.numel * 4 / 2**20:.0f} MiB), {args.rounds} rounds, median ms", flush=True)
    res = {}
    for name, env in SETTINGS.items():
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--numel", str(args.numel),
               "--rounds", str(args.rounds)] + (["--threads", str(args.threads)]
                                                if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=dict(os.environ, **env)).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
    base = res["glibc default"]["ms"]["qgait"]
    print("| allocator | qgait fwd + bwd | torch learnable fwd + bwd | torch / qgait | "
          "qgait vs glibc default | clone() | copy_ | qgait page faults / call |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in res.items():
        m = r["ms"]
        note = "" if name != "keep_freed_memory()" or r["applied"] else " (not applied here)"
        print(f"| {name}{note} | {m['qgait']:.1f} ms | {m['torch']:.1f} ms | "
              f"{m['torch'] / m['qgait']:.2f}x | {base / m['qgait']:.2f}x | {m['clone']:.1f} ms | "
              f"{m['copy_']:.1f} ms | {r['faults']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_class": cpu_class(), "numel": args.numel, "rounds": args.rounds,
                       "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
