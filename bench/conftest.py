"""Benchmark configuration: `pytest bench/ --benchmark-only`. Each benchmark records the
machine and versions in extra_info; ratios between providers are computed in the same run by
bench/_report.py's hook and printed at the end (never asserted)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")
# torch's CPU allocator: 2 MiB-aligned, MADV_HUGEPAGE allocations for large tensors. Without it
# every fresh 64 MB output costs ~50 ms of 4 KiB page faults on this VM, which would dominate
# every provider's time (a copy into a preallocated tensor takes 12 ms). Must be set before
# torch is imported; applies to all providers alike. Set THP_MEM_ALLOC_ENABLE=0 to compare.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json  # noqa: E402
from collections import defaultdict  # noqa: E402

# Conventions for every benchmark in bench/:
#   benchmark.group = "<op> <shape> <mode>"                 (providers compared within a group)
#   benchmark.extra_info.update(provider=..., role="qgait" | "baseline" | "ceiling", bytes=..., ops=...)
# At the end of the run this hook prints, per group, each provider's median time, its GB/s or
# TOPS when bytes/ops are given, and the ratio of every qgait provider against every
# baseline/ceiling in the same run. QGAIT_BENCH_REPORT=path also writes them as JSON.


def _rows(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return {}
    groups = defaultdict(list)
    for b in bs.benchmarks:
        if b.stats is None or not b.stats.rounds:
            continue
        info = dict(b.extra_info)
        # a round of several calls (bench/_common.py timed_round, on a GPU): time per call
        per_call = b.stats.median / max(1, int(info.get("calls", 1)))
        groups[b.group or b.name].append((info.get("provider", b.name), info, per_call))
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    groups = _rows(config)
    if not groups:
        return
    tr = terminalreporter
    tr.section("qgait benchmark ratios (median; speedup = other / qgait, >1 means qgait faster)")
    report = {}
    for group, rows in groups.items():
        tr.write_line(f"[{group}]")
        ours = [r for r in rows if r[1].get("role", "qgait") == "qgait"]
        others = [r for r in rows if r[1].get("role", "qgait") != "qgait"]
        entry = {}
        for prov, info, med in rows:
            extra = ""
            if info.get("bytes"):
                extra += f"  {info['bytes'] / med / 1e9:8.2f} GB/s"
            if info.get("ops"):
                extra += f"  {info['ops'] / med / 1e12:8.3f} TOPS"
            tr.write_line(f"    {prov:<28s} {med * 1e3:10.3f} ms{extra}")
            entry[prov] = {"median_s": med, **{k: v for k, v in info.items()
                                                if isinstance(v, (int, float, str))}}
        for prov, info, med in ours:
            for oprov, oinfo, omed in others:
                if oinfo.get("role") == "ceiling" and info.get("ops") and oinfo.get("ops"):
                    # fraction of the ceiling's arithmetic rate (TOPS over TOPS)
                    frac = (info["ops"] / med) / (oinfo["ops"] / omed)
                    tr.write_line(f"    peak {prov} / {oprov}: {frac * 100:6.1f}%")
                    entry.setdefault("ratios", {})[f"{prov} peak / {oprov}"] = frac
                elif oinfo.get("role") == "ceiling" and info.get("bytes") and oinfo.get("bytes"):
                    # fraction of the ceiling's bandwidth (GB/s over GB/s)
                    frac = (info["bytes"] / med) / (oinfo["bytes"] / omed)
                    tr.write_line(f"    bandwidth {prov} / {oprov}: {frac * 100:6.1f}%")
                    entry.setdefault("ratios", {})[f"{prov} bandwidth / {oprov}"] = frac
                else:
                    tr.write_line(f"    speedup {prov} vs {oprov}: {omed / med:6.2f}x")
                    entry.setdefault("ratios", {})[f"{prov} vs {oprov}"] = omed / med
        report[group] = entry
    path = os.environ.get("QGAIT_BENCH_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
