"""keep_freed_memory(): after it, a large block freed and allocated again is not page-faulted in
afresh (checked in a subprocess: the setting is process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys, torch
    import qgait
    applied = qgait.keep_freed_memory() if sys.argv[1] == "keep" else False
    def step():  # a training step in miniature: large temporaries above any mmap threshold
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(40 << 20, dtype=torch.uint8)
        b = torch.ones(48 << 20, dtype=torch.uint8)
        c = a[: 8 << 20] + 1
        del a, b, c
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    print(applied, [step() for _ in range(5)][-1])
""")


def run(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=dict(os.environ, **env), check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning: Linux only")
def test_keep_freed_memory_stops_refaulting():
    applied, faults = run("keep")
    if not applied:
        pytest.skip("not glibc (mallopt unavailable)")
    _, faults_default = run("default")
    # 96 MiB is 24,576 pages of 4 KiB: the default allocator faults (nearly) all of them in
    # again every step (fewer with transparent huge pages); the kept heap, once warm, none
    assert faults_default > 1000
    assert faults < faults_default / 20


def test_env_turns_it_off():
    applied, _ = run("keep", QGAIT_MALLOC="default")
    assert not applied


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning: Linux only")
def test_paired_malloc_bench_runs_and_counts_faults(tmp_path):
    # bench/paired_malloc.py at a small setting: one row per allocator. x is 48 MiB, above any
    # mmap threshold: under glibc's default every call gets fresh memory for y and dx (96 MiB,
    # 24,576 pages of 4 KiB), which the kernels ask to back with 2 MiB pages (cpu/alloc.h), so
    # where transparent huge pages are on, a call faults in a fraction of those pages; after
    # keep_freed_memory() memory is reused. Times are never checked.
    import json
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bench" / "paired_malloc.py"
    out = tmp_path / "malloc.json"
    p = subprocess.run([sys.executable, str(script), "--numel", str(12 << 20), "--rounds", "5",
                        "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.startswith("CPU class: ")
    for row in ("glibc default", "keep_freed_memory()", "THP_MEM_ALLOC_ENABLE=1"):
        assert f"| {row}" in p.stdout, p.stdout
    res = json.loads(out.read_text())["results"]
    default = res["glibc default"]["faults"]
    assert default >= 48            # fresh memory on every call: at least its 2 MiB pages
    if _thp_mode() in ("always", "madvise"):
        assert default < 24576 / 4, default
    if res["keep_freed_memory()"]["applied"]:
        assert res["keep_freed_memory()"]["faults"] <= default / 4
