"""One command for the day a GPU is lent: build, test and benchmark qgait's CUDA and Triton paths.

    python -m qgait.gpu_check --out DIR [--budget 480] [--skip build,tests,bench] [--plan]

On a CUDA machine, from a source checkout, within ``--budget`` seconds (8 minutes by default):

1. build: ``pip install -e . --no-build-isolation`` if ``qgait._C`` has no CUDA kernels;
2. tests: the CUDA and Triton tests of every op (``tests/test_{soft_quant,pooling,
   packed_conv3d}.py -k "cuda or triton"`` and ``tests/test_triton.py``), Triton compiled, not
   interpreted;
3. bench: bench/bench_soft_quant.py (against copy bandwidth), bench/bench_pooling.py (against
   the memory floor) and bench/bench_packed_conv3d_gpu.py (against cuDNN fp16 / bf16), run by
   pytest-benchmark with bench/conftest.py's report (``QGAIT_BENCH_REPORT``): the same code and
   ratios as a CPU benchmark run, nothing re-implemented here.

It writes ``DIR/gpu_check.json`` (every phase, every benchmark group, the targets) and
``DIR/gpu_check.md`` (a short table), plus each phase's log. Each phase runs in a subprocess with
its share of the budget; one that fails or runs out of time is recorded and the next one runs.
Without CUDA it says so in one line and exits 2 (``--plan`` prints the commands anyway).
Exit status: 0 when every phase ran and passed, 1 otherwise, 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("build", "tests", "bench")
OP_TESTS = ("tests/test_soft_quant.py", "tests/test_pooling.py", "tests/test_packed_conv3d.py")
TRITON_TESTS = ("tests/test_triton.py",)
# (report name, file, -k filter): the quick check leaves out the torch.compile baselines (their
# compilation alone would take the budget) and keeps what the targets need
BENCHES = (
    ("soft_quant", "bench/bench_soft_quant.py",
     "(act or 256M) and (qgait or copy or learnable)"),
    ("pooling", "bench/bench_pooling.py", "not compiled"),
    ("packed_conv3d", "bench/bench_packed_conv3d_gpu.py", ""),
)
# share of the budget each phase may use at most (of what is left when it starts)
SHARES = {"build": 0.45, "tests": 0.5, "bench": 1.0}
# targets on a GPU: fraction of the copy / memory-floor bandwidth
TARGETS = (("soft_fake_quant", "copy", 0.8), ("set_pool_hpp", "floor", 0.8))


@dataclass
class Phase:
    name: str
    cmd: list[str]
    env: dict = field(default_factory=dict)
    report: str | None = None   # a file the phase writes (junit XML / benchmark JSON)


def repo_root() -> Path:
    """The source checkout qgait is imported from (tests/ and bench/ live there)."""
    return Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qgait.gpu_check",
                                 description="Build, test and benchmark qgait on a CUDA GPU.")
    ap.add_argument("--out", required=True, type=Path, help="directory for the JSON, table, logs")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds for all phases together (default 480)")
    ap.add_argument("--skip", default="", help=f"comma-separated phases to skip: {PHASES}")
    ap.add_argument("--plan", action="store_true",
                    help="print the commands and exit (works without a GPU)")
    a = ap.parse_args(argv)
    skip = {s for s in a.skip.split(",") if s}
    if not skip <= set(PHASES):
        ap.error(f"--skip: unknown phase(s) {sorted(skip - set(PHASES))}; choose from {PHASES}")
    if a.budget <= 0:
        ap.error("--budget must be > 0 seconds")
    a.skip = skip
    return a


def has_cuda_kernels() -> bool:
    from qgait import _ext

    return _ext.has_kernel("soft_fake_quant", "CUDA")


def plan(out: Path, root: Path, need_build: bool, skip=()) -> list[Phase]:
    """The subprocesses of each phase, in order."""
    py = sys.executable
    env = {"TRITON_INTERPRET": "0"}
    phases = []
    if "build" not in skip and need_build:
        # --no-deps: build against the torch already there (a GPU image's torch need not be the
        # pinned one) and never reach for an index
        phases.append(Phase("build", [py, "-m", "pip", "install", "-e", str(root),
                                      "--no-build-isolation", "--no-deps"],
                            {**env, "MAX_JOBS": str(os.cpu_count() or 4)}))
    if "tests" not in skip:
        junit = str(out / "tests.xml")
        files = [str(root / f) for f in OP_TESTS]
        phases.append(Phase("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "--tb=short", "-rfE", *xdist_args(),
                                      f"--junitxml={junit}", *files, "-k", "cuda or triton",
                                      *[str(root / f) for f in TRITON_TESTS]], env, junit))
    if "bench" not in skip:
        for name, path, k in BENCHES:
            rep = str(out / f"bench_{name}.json")
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / path),
                   "--benchmark-only", "--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
            if k:
                cmd += ["-k", k]
            phases.append(Phase(f"bench:{name}", cmd, {**env, "QGAIT_BENCH_REPORT": rep}, rep))
    return phases


def xdist_args() -> list[str]:
    """Spread the tests over the CPUs when pytest-xdist is there: most of a GPU test run is
    Triton compiling kernels, one CPU at a time per process."""
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, max(1, (os.cpu_count() or 1) // 2)))]


def parse_junit(path) -> dict:
    """Counts and failed test ids of a pytest --junitxml report."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = failed
    return counts


def targets(groups: dict) -> list[dict]:
    """Every target ratio found in the benchmark groups (bench/conftest.py's report format:
    group -> provider -> {median_s, ...} and group -> "ratios" -> {name: value})."""
    out = []
    for group, entry in sorted(groups.items()):
        for op, ceiling, want in TARGETS:
            if not group.startswith(op):
                continue
            for name, value in sorted(entry.get("ratios", {}).items()):
                if name.endswith(f"bandwidth / {ceiling}"):
                    out.append({"group": group, "ratio": name, "value": value, "target": want,
                                "met": value >= want})
    return out


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def run_phase(ph: Phase, out: Path, timeout: float) -> dict:
    """Runs one phase; returns its record (status ok / failed / timeout, seconds, log)."""
    log = out / f"{ph.name.replace(':', '_')}.log"
    t0 = time.monotonic()
    env = {**os.environ, **ph.env}
    try:
        p = subprocess.run(ph.cmd, env=env, capture_output=True, text=True,
                           timeout=max(1.0, timeout), cwd=str(repo_root()))
        status = "ok" if p.returncode == 0 else "failed"
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                else (e.stdout or "")) + "\n[timed out]"
    log.write_text(text)
    rec = {"status": status, "seconds": round(time.monotonic() - t0, 1),
           "command": " ".join(ph.cmd), "log": log.name, "log_tail": _tail(text, 1500)}
    if ph.report and Path(ph.report).exists():
        if ph.name == "tests":
            rec.update(parse_junit(ph.report))
            if status == "failed" and rec.get("failures", 0) + rec.get("errors", 0) == 0:
                rec["status"] = "failed"  # pytest failed before collecting (see the log)
        else:
            rec["groups"] = json.loads(Path(ph.report).read_text())
    # pytest exit 5: nothing collected / everything deselected: not a failure of the code
    if status == "failed" and re.search(r"\bno tests ran\b", text):
        rec["status"] = "empty"
    return rec


def machine() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    sm_count=p.multi_processor_count)
    return info


def render_markdown(result: dict) -> str:
    """The short table of gpu_check.md."""
    m = result.get("machine", {})
    lines = [f"# qgait GPU check ({result.get('date', '')})", "",
             f"{m.get('gpu', 'no GPU')} (sm {m.get('capability', '-')}), torch {m.get('torch')}"
             f", CUDA {m.get('cuda')}, Triton {m.get('triton')}; "
             f"{result.get('seconds', 0):.0f} s in all.", "",
             "| phase | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    for name, rec in result.get("phases", {}).items():
        if name == "tests" and "tests" in rec:
            detail = (f"{rec['passed']} passed, {rec['failures'] + rec['errors']} failed, "
                      f"{rec['skipped']} skipped")
        elif "groups" in rec:
            detail = f"{len(rec['groups'])} benchmark groups"
        else:
            detail = rec.get("reason", "")
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', 0):.0f} | {detail} |")
    rows = []
    for name, rec in result.get("phases", {}).items():
        for group, entry in sorted(rec.get("groups", {}).items()):
            for prov, v in sorted(entry.items()):
                if prov == "ratios" or not isinstance(v, dict):
                    continue
                rate = ""
                if v.get("bytes"):
                    rate = f"{v['bytes'] / v['median_s'] / 1e9:.0f} GB/s"
                elif v.get("ops"):
                    rate = f"{v['ops'] / v['median_s'] / 1e12:.1f} TOPS"
                rows.append(f"| {group} | {prov} | {v['median_s'] * 1e3:.3f} | {rate} |")
    if rows:
        lines += ["", "| benchmark group | provider | median ms | rate |",
                  "| --- | --- | ---: | ---: |", *rows]
    if result.get("targets"):
        lines += ["", "| target | group | value | wanted | met |",
                  "| --- | --- | ---: | ---: | --- |"]
        for t in result["targets"]:
            lines.append(f"| {t['ratio']} | {t['group']} | {t['value'] * 100:.0f}% | "
                         f"{t['target'] * 100:.0f}% | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, result: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "gpu_check.json", out / "gpu_check.md"
    j.write_text(json.dumps(result, indent=1, sort_keys=True))
    md.write_text(render_markdown(result))
    return j, md


def main(argv=None) -> int:
    args = parse_args(argv)
    root = repo_root()
    if args.plan:
        for ph in plan(args.out, root, need_build=True, skip=args.skip):
            env = " ".join(f"{k}={v}" for k, v in ph.env.items())
            print(f"[{ph.name}] {env} {' '.join(ph.cmd)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        why = ("torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        print(f"qgait.gpu_check: no CUDA GPU here ({why}, torch {torch.__version__}); nothing "
              "was run", file=sys.stderr)
        return 2
    if not (root / "tests").is_dir() or not (root / "bench").is_dir():
        print("qgait.gpu_check: needs a source checkout (tests/ and bench/ beside "
              f"{root / 'qgait'})", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "budget_s": args.budget, "phases": {}}
    need_build = not has_cuda_kernels()
    if not need_build:
        result["phases"]["build"] = {"status": "skipped", "seconds": 0,
                                     "reason": "qgait._C already has CUDA kernels"}
    phases = plan(args.out, root, need_build, args.skip)
    for ph in phases:
        left = args.budget - (time.monotonic() - t0)
        if left < 5:
            result["phases"][ph.name] = {"status": "timeout", "seconds": 0,
                                         "reason": "no budget left"}
            continue
        share = SHARES["bench" if ph.name.startswith("bench") else ph.name]
        if ph.name.startswith("bench:"):  # the benchmarks split what is left between them
            n_left = sum(1 for p in plan(args.out, root, False, args.skip)
                         if p.name.startswith("bench:") and p.name not in result["phases"])
            share = 1.0 / max(1, n_left)
        if ph is phases[-1]:  # the last phase (e.g. the tests with --skip bench) takes the rest
            share = 1.0
        print(f"qgait.gpu_check: {ph.name} ({left:.0f} s left)", flush=True)
        result["phases"][ph.name] = run_phase(ph, args.out, left * share)
        if ph.name == "build" and result["phases"]["build"]["status"] != "ok":
            break  # the tests and benchmarks would only measure the old build
    groups = {}
    for rec in result["phases"].values():
        groups.update(rec.get("groups", {}))
    result["targets"] = targets(groups)
    result["seconds"] = round(time.monotonic() - t0, 1)
    j, md = write_report(args.out, result)
    print(render_markdown(result))
    print(f"qgait.gpu_check: wrote {j} and {md}")
    ok = all(r["status"] in ("ok", "skipped") for r in result["phases"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
