"""Shared helpers for benchmarks: machine facts and timing helpers."""
import ctypes
import functools
import os
import platform
import shutil
import subprocess
import tempfile

import torch


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_int8")


def cpu_class() -> str:
    """The CPU class a number was measured on: model, cores, the ISA flags that pick kernels,
    and the caps in force (QGAIT_CPU_ISA for qgait, ONEDNN_MAX_CPU_ISA for torch / oneDNN)."""
    import qgait

    model, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; flags: {have}; "
            f"qgait ISA {qgait.cpu_isa()} (QGAIT_CPU_ISA={os.environ.get('QGAIT_CPU_ISA', '-')}), "
            f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")


@functools.cache
def _peak_lib(name: str, flags=()):
    """bench/peak/NAME.cpp built with the system compiler and loaded, or the reason it cannot
    be had."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peak", f"{name}.cpp")
    out = os.path.join(tempfile.mkdtemp(prefix="qgait_peak_"), f"lib{name}.so")
    r = subprocess.run([cxx, "-O2", "-shared", "-fPIC", *flags, src, "-o", out],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"building {name}.cpp failed: {r.stderr.strip()[:200]}"
    return ctypes.CDLL(out)


def _int8_peak_lib(has: str, fn: str, missing: str):
    """bench/peak/int8_peak.cpp loaded with ``fn(macs, threads)`` typed, or the reason it cannot
    be had (no compiler, or ``has()`` false: ``missing``)."""
    lib = _peak_lib("int8_peak", ("-pthread",))
    if isinstance(lib, str):
        return lib
    if not getattr(lib, has)():
        return missing
    f = getattr(lib, fn)
    f.restype = None
    f.argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib


def int8_peak_lib():
    """The AVX-512 VNNI ceiling, ``int8_peak(macs, threads)``: register-only vpdpbusd."""
    return _int8_peak_lib("has_vnni", "int8_peak", "this CPU has no AVX-512 VNNI")


def amx_peak_lib():
    """The AMX-INT8 ceiling, ``amx_peak(macs, threads)``: register-only tdpbusd."""
    return _int8_peak_lib("has_amx", "amx_peak", "this CPU (or Linux) gives no AMX-INT8")


def avx2_steps_lib():
    """bench/peak/avx2_steps.cpp as a shared library (``avx2_steps(kind, macs)``,
    ``avx2_step_macs(kind)``), or the reason it cannot be had."""
    lib = _peak_lib("avx2_steps")
    if isinstance(lib, str):
        return lib
    if not lib.has_avx2():
        return "this CPU has no AVX2"
    lib.avx2_steps.restype = ctypes.c_int64
    lib.avx2_steps.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.avx2_step_macs.restype = ctypes.c_int64
    lib.avx2_step_macs.argtypes = [ctypes.c_int]
    lib.avx2_step_kinds.restype = ctypes.c_int
    return lib


def machine_info() -> dict:
    import qgait

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "qgait_isa": qgait.cpu_isa(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "cpu_class": cpu_class(),
    }


# On a GPU a benchmark round is this many back-to-back calls and one synchronisation: a round
# of one call times the host's launch and the sync too, which at 0.04-0.4 ms per call was a
# large share of the first GPU run's numbers (docs/benchmarks.md).
GPU_CALLS = int(os.environ.get("QGAIT_BENCH_GPU_CALLS", "20"))


def timed_round(body, sync, on_gpu: bool):
    """``(run, calls)``: ``run`` does ``calls`` calls of ``body`` and then ``sync()``, one call on
    the CPU, GPU_CALLS on a GPU. Put ``calls`` in the benchmark's extra_info: bench/conftest.py
    divides the round's median by it, so times, GB/s and ratios stay per call."""
    calls = max(1, GPU_CALLS) if on_gpu else 1

    def run():
        for _ in range(calls - 1):
            body()
        r = body()
        sync()
        return r

    return run, calls


def add_timing_args(ap) -> None:
    """``--threads`` and ``--clock`` of the paired timing scripts."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (use with --threads 1 on a loaded machine: "
                         "time spent waiting for a core is not counted)")


def timer(args):
    """Applies ``--threads`` and returns ``timed(fn) -> seconds`` on the ``--clock`` chosen."""
    import time
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    def timed(fn) -> float:
        t = clock()
        fn()
        return clock() - t
    return timed
