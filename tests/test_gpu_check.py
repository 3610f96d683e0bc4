"""python -m qgait.gpu_check up to the CUDA boundary: arguments, the plan of commands, the no-GPU
exit, the junit / benchmark readers and the JSON + table writer on made-up results, and one real
(CPU) run of a bench/ file through the same report path the GPU benchmarks use."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qgait import gpu_check as G

ROOT = Path(__file__).resolve().parent.parent


def test_arguments():
    a = G.parse_args(["--out", "d"])
    assert a.out == Path("d") and a.budget == 480 and a.skip == set() and not a.plan
    a = G.parse_args(["--out", "d", "--skip", "build,bench", "--budget", "60"])
    assert a.skip == {"build", "bench"} and a.budget == 60
    for bad in ([], ["--out", "d", "--skip", "lint"], ["--out", "d", "--budget", "0"]):
        with pytest.raises(SystemExit) as e:
            G.parse_args(bad)
        assert e.value.code == 2


def test_plan(tmp_path):
    phases = G.plan(tmp_path, ROOT, need_build=True)
    names = [p.name for p in phases]
    assert names == ["build", "tests", "bench:soft_quant", "bench:pooling", "bench:packed_conv3d"]
    build, tests = phases[0], phases[1]
    assert build.cmd[-5:] == ["install", "-e", str(ROOT), "--no-build-isolation", "--no-deps"]
    assert "cuda or triton" in tests.cmd and str(ROOT / "tests/test_triton.py") in tests.cmd
    assert tests.report == str(tmp_path / "tests.xml")
    for p in phases[2:]:
        assert p.env["QGAIT_BENCH_REPORT"] == p.report and "--benchmark-only" in p.cmd
        assert Path(p.cmd[p.cmd.index("--benchmark-only") - 1]).is_file()  # the bench file
    assert all(p.env.get("TRITON_INTERPRET") == "0" for p in phases)
    assert [p.name for p in G.plan(tmp_path, ROOT, need_build=False, skip={"bench"})] == ["tests"]


def test_tests_spread_over_cpus_only_with_xdist(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def xdist(spec):
        return lambda name, *a: spec if name == "xdist" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", xdist(None))
    assert G.xdist_args() == []
    monkeypatch.setattr(importlib.util, "find_spec", xdist(object()))
    monkeypatch.setattr(G.os, "cpu_count", lambda: 16)
    assert G.xdist_args() == ["-n", "8"]
    monkeypatch.setattr(G.os, "cpu_count", lambda: 2)
    assert G.xdist_args() == ["-n", "1"]


def test_plan_flag_prints_commands_without_a_gpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qgait.gpu_check", "--out", str(tmp_path), "--plan"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert [line.split("]")[0] + "]" for line in r.stdout.splitlines()] == [
        "[build]", "[tests]", "[bench:soft_quant]", "[bench:pooling]", "[bench:packed_conv3d]"]


def test_without_cuda_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU if this machine has one
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qgait.gpu_check", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    # one line of its own (an import warning, e.g. without qgait._C, is not gpu_check's)
    lines = [ln for ln in r.stderr.splitlines() if "Warning" not in ln and ln[:1] != " "]
    assert len(lines) == 1 and lines[0].startswith("qgait.gpu_check: no CUDA GPU"), r.stderr
    assert not out.exists()  # nothing was run or written


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
 failures="1" skipped="2" tests="7"><testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad[triton]"><failure message="x"/></testcase>
<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>
</testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    p = tmp_path / "t.xml"
    p.write_text(JUNIT)
    r = G.parse_junit(p)
    assert (r["tests"], r["passed"], r["failures"], r["errors"], r["skipped"]) == (7, 3, 1, 1, 2)
    assert r["failed_ids"] == ["tests.test_a::test_bad[triton]", "tests.test_b::test_err"]


def _fake_groups():
    # bench/conftest.py's QGAIT_BENCH_REPORT format
    return {
        "soft_fake_quant act[8,64,30,32,22] per-tensor forward": {
            "qgait-cuda": {"median_s": 1.0e-4, "bytes": 8e7, "role": "qgait"},
            "copy": {"median_s": 0.9e-4, "bytes": 8e7, "role": "ceiling"},
            "ratios": {"qgait-cuda bandwidth / copy": 0.9, "qgait-triton bandwidth / copy": 0.7}},
        "set_pool_hpp N32 bins16 forward": {
            "qgait-triton": {"median_s": 2e-4, "bytes": 1e8, "role": "qgait"},
            "floor": {"median_s": 1.9e-4, "bytes": 1e8, "role": "ceiling"},
            "eager": {"median_s": 9e-4, "role": "baseline"},
            "ratios": {"qgait-triton bandwidth / floor": 0.95, "qgait-triton vs eager": 4.5}},
        "packed_conv3d gpu layer A": {
            "qgait-cuda-w8a8": {"median_s": 1e-3, "ops": 2e12, "role": "qgait"},
            "cudnn-fp16": {"median_s": 2e-3, "ops": 2e12, "role": "baseline"},
            "ratios": {"qgait-cuda-w8a8 vs cudnn-fp16": 2.0}},
    }


def test_targets_from_benchmark_groups():
    t = G.targets(_fake_groups())
    got = {(x["ratio"], x["met"]) for x in t}
    assert got == {("qgait-cuda bandwidth / copy", True), ("qgait-triton bandwidth / copy", False),
                   ("qgait-triton bandwidth / floor", True)}
    assert all(x["target"] == 0.8 for x in t)


def test_report_writer_on_fake_results(tmp_path):
    groups = _fake_groups()
    result = {"date": "2026-01-01 00:00 UTC", "seconds": 301.2, "budget_s": 480,
              "machine": {"gpu": "NVIDIA H200", "capability": "9.0", "torch": "2.x",
                          "cuda": "12.8", "triton": "3.x"},
              "phases": {"build": {"status": "ok", "seconds": 150.0},
                         "tests": {"status": "failed", "seconds": 80, "tests": 7, "passed": 3,
                                   "failures": 1, "errors": 1, "skipped": 2},
                         "bench:soft_quant": {"status": "ok", "seconds": 30,
                                              "groups": {k: v for k, v in groups.items()
                                                         if k.startswith("soft")}},
                         "bench:pooling": {"status": "timeout", "seconds": 40}},
              "targets": G.targets(groups)}
    j, md = G.write_report(tmp_path / "o", result)
    assert json.loads(j.read_text()) == json.loads(json.dumps(result))
    text = md.read_text()
    assert "NVIDIA H200 (sm 9.0)" in text
    assert "| tests | failed | 80 | 3 passed, 2 failed, 2 skipped |" in text
    assert "| bench:pooling | timeout | 40 |  |" in text
    row = ("| soft_fake_quant act[8,64,30,32,22] per-tensor forward | qgait-cuda | 0.100 | "
           "800 GB/s |")
    assert row in text
    assert "| qgait-triton bandwidth / copy |" in text and "| 70% | 80% | no |" in text


def test_bench_report_path_end_to_end_on_cpu(tmp_path):
    """One bench/ file through run_phase exactly as on a GPU (here its CPU providers): the
    report bench/conftest.py writes is read back and yields the copy-bandwidth target."""
    pytest.importorskip("pytest_benchmark")
    import qgait

    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    ph = [p for p in G.plan(tmp_path, ROOT, need_build=False, skip={"tests"})
          if p.name == "bench:soft_quant"][0]
    k = ph.cmd.index("-k")
    ph.cmd[k + 1] = "16M and per-tensor and forward and (qgait-cpu or copy)"
    ph.cmd += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=1"]
    rec = G.run_phase(ph, tmp_path, timeout=600)
    assert rec["status"] == "ok", rec["log_tail"]
    (group,) = rec["groups"]
    assert group == "soft_fake_quant 16M per-tensor forward"
    assert set(rec["groups"][group]) >= {"qgait-cpu", "copy", "ratios"}
    (t,) = G.targets(rec["groups"])
    assert t["ratio"] == "qgait-cpu bandwidth / copy" and t["value"] > 0
    assert (tmp_path / "bench_soft_quant.log").exists()


def test_machine_info_without_gpu():
    m = G.machine()
    assert m["torch"] == torch.__version__
    assert ("gpu" in m) == torch.cuda.is_available()


def test_budget_shares(tmp_path, monkeypatch):
    """The tests take half of what the build left, the benchmarks split the rest; whatever
    phase runs last takes all that is left (--skip bench: the tests get the whole budget)."""
    import torch

    calls = []

    def fake_run(ph, out, timeout):
        calls.append((ph.name, round(timeout)))
        return {"status": "ok", "seconds": 0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(G, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(G, "machine", lambda: {})
    monkeypatch.setattr(G, "run_phase", fake_run)
    assert G.main(["--out", str(tmp_path / "a"), "--budget", "120"]) == 0
    assert calls == [("tests", 60), ("bench:soft_quant", 40), ("bench:pooling", 60),
                     ("bench:packed_conv3d", 120)]
    calls.clear()
    assert G.main(["--out", str(tmp_path / "b"), "--budget", "120", "--skip", "bench"]) == 0
    assert calls == [("tests", 120)]


def test_gpu_rounds_are_back_to_back_calls_and_one_sync(monkeypatch):
    """bench/_common.py timed_round: on a GPU a round is GPU_CALLS calls and one sync, and
    bench/conftest.py reports the round's median per call (on the CPU: one call per round)."""
    import importlib.util
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from _common import GPU_CALLS, timed_round

    counts = {"calls": 0, "syncs": 0}

    def body():
        counts["calls"] += 1

    def sync():
        counts["syncs"] += 1

    run, calls = timed_round(body, sync, on_gpu=True)
    run()
    assert calls == GPU_CALLS > 1 and counts == {"calls": GPU_CALLS, "syncs": 1}
    run, calls = timed_round(body, sync, on_gpu=False)
    run()
    assert calls == 1 and counts == {"calls": GPU_CALLS + 1, "syncs": 2}

    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench/conftest.py")
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    stats = SimpleNamespace(median=0.008, rounds=3)
    config = SimpleNamespace(_benchmarksession=SimpleNamespace(benchmarks=[
        SimpleNamespace(extra_info={"provider": "gpu", "calls": 4}, stats=stats, group="g",
                        name="a"),
        SimpleNamespace(extra_info={"provider": "cpu"}, stats=stats, group="g", name="b")]))
    rows = bench_conftest._rows(config)["g"]
    assert [(p, m) for p, _, m in rows] == [("gpu", 0.002), ("cpu", 0.008)]
