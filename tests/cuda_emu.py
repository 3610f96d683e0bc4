"""Runs qgait's CUDA kernels on the CPU: builds csrc/cuda/*.cu as host C++ against the emulation
header (csrc/cuda/emu/cuda_emu.h) with sanitizers, links the request driver
(csrc/cuda/emu/driver.cpp) and talks to it through files. docs/cuda_emulation.md explains the
model and what it cannot see.

    exe = build("asan")                       # cached under build/cuda_emu/<hash>/
    b = Batch()
    r = b.sfq_fwd(x, scale, ...)              # queue requests ...
    b.run(exe)                                # ... run them in one process
    r.rc, r.out["y"]                          # cudaError_t and output tensors

Variants: "asan" (AddressSanitizer + UBSan, small grids so that grid-stride loops and chunked
reductions loop), "asan_full" (the same with the production grid limits), "tsan"
(ThreadSanitizer, small grids). A mutated source can be built with ``sources={path: text}``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = ("soft_fake_quant.cu", "pooling.cu", "packed_conv3d.cu")
CACHE = Path(os.environ.get("QGAIT_EMU_CACHE", ROOT / "build" / "cuda_emu"))

_COMMON = ["-std=c++17", "-DQGAIT_CUDA_EMU", "-g", "-O1", "-pthread",
           # the device rounds every operation the kernels write; the host must not fuse them
           "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing",
           "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas"]
_SAN = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-DQGAIT_EMU_SMALL_GRID"],
    "asan_full": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread", "-DQGAIT_EMU_SMALL_GRID"],
}
ENV = {
    # leaks are not kernel bugs; every UB and race report fails the run
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}


# The real thing: the same driver and kernels built by nvcc with setup.py's flags, for a GPU.
_NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _toolchain(variant: str, inc: Path) -> tuple[str, list[str], list[str], list[str]]:
    """(compiler, compile flags, extra flags for .cu files, link flags) of a variant."""
    if variant == "cuda":
        cc = nvcc()
        if cc is None:
            raise SanitizerMissing("nvcc not found (set CUDA_HOME)")
        return cc, [*_NVCC_FLAGS, f"-I{inc}"], [], []
    cxx = compiler()
    if cxx is None:
        raise SanitizerMissing("no C++ compiler (g++ / clang++)")
    return (cxx, [*_COMMON, *_SAN[variant], f"-I{inc / 'cuda' / 'emu' / 'include'}", f"-I{inc}"],
            ["-x", "c++"], [_SAN[variant][0], "-pthread"])


class SanitizerMissing(RuntimeError):
    """The compiler cannot build / run this sanitizer here (tests skip)."""


_VERSION: dict[str, str] = {}


def _compiler_version(cxx: str) -> str:
    if cxx not in _VERSION:
        _VERSION[cxx] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return _VERSION[cxx]


def _headers(overrides: dict[str, str]) -> bytes:
    """Every header a translation unit may include, with the overrides applied."""
    files = sorted((CSRC / "cuda").glob("*.cuh")) + sorted((CSRC / "cuda" / "emu").rglob("*.h"))
    h = hashlib.sha256()
    for f in files:
        rel = str(f.relative_to(CSRC))
        h.update(rel.encode() + overrides.get(rel, f.read_text()).encode())
    return h.digest()


def build(variant: str = "asan", sources: dict[str, str] | None = None) -> Path:
    """Builds (or finds in the cache) the driver for ``variant``; returns the executable.

    ``sources`` maps paths relative to csrc/ (e.g. "cuda/pooling.cu") to replacement texts: a
    mutated kernel. Objects are cached one per translation unit and content hash, so a mutation
    recompiles only the file it changes. Variant "cuda" builds the real kernels with nvcc (it
    needs a GPU to run: SanitizerMissing otherwise)."""
    overrides = dict(sources or {})
    cxx, _, _, _ = _toolchain(variant, CSRC)
    flags_key = " ".join([cxx, *_toolchain(variant, CSRC)[1]]) + _compiler_version(cxx)
    headers = _headers(overrides)
    units = [f"cuda/{f}" for f in CU_FILES] + ["cuda/emu/driver.cpp"]
    keys = {}
    for rel in units:
        h = hashlib.sha256(flags_key.encode() + headers)
        h.update(rel.encode() + overrides.get(rel, (CSRC / rel).read_text()).encode())
        keys[rel] = h.hexdigest()[:16]
    exe_key = hashlib.sha256("".join(keys[u] for u in units).encode()).hexdigest()[:16]
    exe = CACHE / f"{variant}-{exe_key}" / "driver"
    if exe.exists():
        return exe
    objdir = CACHE / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=CACHE))
    try:
        inc = CSRC
        if overrides:  # a copy of csrc/ with the mutated files
            inc = tmp / "csrc"
            shutil.copytree(CSRC, inc, ignore=shutil.ignore_patterns("cpu", "*.o"))
            for rel, text in overrides.items():
                (inc / rel).write_text(text)
        cxx, flags, cu_flags, link_flags = _toolchain(variant, inc)
        objs, jobs = [], []
        for rel in units:
            obj = objdir / f"{variant}-{Path(rel).stem}-{keys[rel]}.o"
            objs.append(obj)
            if not obj.exists():
                lang = cu_flags if rel.endswith(".cu") else []
                jobs.append(([cxx, *flags, *lang, "-c", str(inc / rel), "-o", str(tmp / obj.name)],
                             obj))
        # two at a time (CI machines here have two cores)
        running: list = []
        errors = []
        for cmd, obj in jobs:
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True), obj))
            if len(running) == 2:
                errors += _finish(*running.pop(0), tmp)
        for p, obj in running:
            errors += _finish(p, obj, tmp)
        if errors:
            raise RuntimeError("emulation build failed:\n" + "\n".join(errors))
        link = [cxx, *link_flags, *map(str, objs), "-o", str(tmp / "driver")]
        p = subprocess.run(link, capture_output=True, text=True)
        if p.returncode != 0:
            raise SanitizerMissing(f"cannot link the {variant} driver: {p.stderr[-2000:]}")
        # a sanitizer runtime that cannot start here (e.g. TSan on an unsupported memory layout)
        probe = subprocess.run([str(tmp / "driver"), os.devnull, str(tmp / "probe.out")],
                               capture_output=True, text=True, env={**os.environ, **ENV})
        if probe.returncode != 0:
            raise SanitizerMissing(f"the {variant} driver does not start here: "
                                   f"{probe.stderr[-2000:]}")
        exe.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "driver", exe)  # atomic: a concurrent build of the same key is harmless
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


def _finish(p: subprocess.Popen, obj: Path, tmp: Path) -> list[str]:
    _, err = p.communicate()
    if p.returncode != 0:
        return [f"{' '.join(p.args[-4:])}\n{err[-4000:]}"]
    os.replace(tmp / obj.name, obj)
    return []


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
_NP = {torch.float32: np.float32, torch.float16: np.uint16, torch.bfloat16: np.uint16,
       torch.int32: np.int32, torch.int64: np.int64, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8,
       torch.bool: np.uint8}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.numpy().tobytes()


@dataclass
class Result:
    """What one request returned: the cudaError_t and the output buffers by name."""
    rc: int | None = None
    out: dict = field(default_factory=dict)
    _specs: list = field(default_factory=list)  # (name, shape, dtype)


class Batch:
    """Requests to run in one driver process (launches are synchronous and in order)."""

    def __init__(self):
        self._req = bytearray()
        self._results: list[Result] = []

    def _add(self, name: str, bufs: list, ints: list[int], dbls: list[float]) -> Result:
        """bufs: (name, tensor or None, is_output, misalign)."""
        r = Result()
        b = bytearray()
        b += struct.pack("<I", len(name)) + name.encode()
        b += struct.pack("<I", len(bufs))
        for bname, t, is_out, mis in bufs:
            if t is None:
                b += struct.pack("<IIQ", 0, 0, 0)
                continue
            data = _bytes(t)
            b += struct.pack("<IIQ", 2 if is_out else 1, mis, len(data)) + data
            if is_out:
                r._specs.append((bname, tuple(t.shape), t.dtype, len(data)))
        b += struct.pack("<I", len(ints)) + struct.pack(f"<{len(ints)}q", *ints)
        b += struct.pack("<I", len(dbls)) + struct.pack(f"<{len(dbls)}d", *dbls)
        self._req += b
        self._results.append(r)
        return r

    def run(self, exe: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Runs every queued request; fills the Results. Raises if the process failed (a
        sanitizer report, an abort), with its output."""
        with tempfile.TemporaryDirectory(prefix="qgait-emu-") as d:
            fin, fout = Path(d) / "in.bin", Path(d) / "out.bin"
            fin.write_bytes(bytes(self._req))
            p = subprocess.run([str(exe), str(fin), str(fout)], capture_output=True, text=True,
                               timeout=timeout, env={**os.environ, **ENV})
            if p.returncode != 0:
                raise EmuFailure(p)
            raw = fout.read_bytes()
        off = 0
        for r in self._results:
            (r.rc,) = struct.unpack_from("<i", raw, off)
            off += 4
            for bname, shape, dtype, n in r._specs:
                arr = np.frombuffer(raw, dtype=_NP[dtype], count=n // np.dtype(_NP[dtype]).itemsize,
                                    offset=off).copy()
                t = torch.from_numpy(arr)
                if dtype in (torch.float16, torch.bfloat16):
                    t = t.view(torch.int16).view(dtype)
                elif dtype == torch.bool:
                    t = t.bool()
                r.out[bname] = t.reshape(shape)
                off += n
        assert off == len(raw), f"answer has {len(raw)} bytes, parsed {off}"
        return p

    # ---- soft fake-quant (csrc/cuda/soft_fake_quant.cuh) -------------------------------------
    def sfq_fwd(self, x, scale, outer, C, inner, consts, misalign=0) -> Result:
        qn, qp, k, ts, gs, soft, k0 = consts
        y = torch.full_like(x, float("nan"))
        return self._add("sfq_fwd", [("x", x, False, misalign), ("y", y, True, misalign),
                                     ("scale", scale.float(), False, 0)],
                         [_DTYPE_CODE[x.dtype], outer, C, inner, int(soft), int(k0)],
                         [qn, qp, k, ts, gs])

    def sfq_bwd(self, gy, x, scale, outer, C, inner, consts, gamma, need_dx=True, need_ds=True,
                misalign=0) -> Result:
        qn, qp, k, ts, gs, soft, k0 = consts
        dx = torch.full_like(x, float("nan")) if need_dx else None
        ds = torch.full((C,), float("nan")) if need_ds else None
        return self._add("sfq_bwd", [("gy", gy, False, misalign), ("x", x, False, misalign),
                                     ("dx", dx, True, misalign), ("ds", ds, True, 0),
                                     ("scale", scale.float(), False, 0)],
                         [_DTYPE_CODE[x.dtype], outer, C, inner, int(soft), int(k0)],
                         [qn, qp, k, ts, gs, gamma])

    # ---- pooling (csrc/cuda/pooling.cuh) ------------------------------------------------------
    @staticmethod
    def _pool_ints(shape, seqL, bins, mode, hpp, last):
        N, C, T, H, W = shape
        seqL, bins = list(seqL or []), list(bins or [])
        return [N, C, T, H, W, mode, int(hpp), last, len(seqL), *seqL, len(bins), *bins]

    def pool_fwd(self, x, seqL, bins, mode, hpp, need_idx) -> Result:
        """set_pool_hpp (hpp) or temporal_pool forward of x [N, C, T, H, W]; need_idx =
        (temporal arg-max, strip arg-max) outputs."""
        N, C, T, H, W = x.shape
        NO = len(seqL) if seqL else N
        B = sum(bins) if hpp else 0
        out = torch.full((NO, C, B) if hpp else (NO, C, H, W), float("nan"), dtype=x.dtype)
        targ = torch.full((NO, C, H, W), -7, dtype=torch.int32) if need_idx[0] else None
        sarg = torch.full((NO, C, B), -7, dtype=torch.int32) if need_idx[1] else None
        return self._add("pool_fwd", [("x", x, False, 0), ("out", out, True, 0),
                                      ("targ", targ, True, 0), ("sarg", sarg, True, 0)],
                         self._pool_ints(x.shape, seqL, bins, mode, hpp, _DTYPE_CODE[x.dtype]),
                         [])

    def pool_bwd(self, grad, targ, sarg, x_shape, seqL, bins, mode, hpp) -> Result:
        dx = torch.full(x_shape, float("nan"), dtype=grad.dtype)
        return self._add("pool_bwd", [("grad", grad, False, 0), ("targ", targ, False, 0),
                                      ("sarg", sarg, False, 0), ("dx", dx, True, 0)],
                         self._pool_ints(x_shape, seqL, bins, mode, hpp,
                                         _DTYPE_CODE[grad.dtype]), [])

    def pool_limit(self, x_shape, seqL, bins, hpp, smem_optin) -> Result:
        """pool_cuda_limit's reason ("" when the CUDA kernels take the call)."""
        return self._add("pool_limit", [("why", torch.zeros(256, dtype=torch.uint8), True, 0)],
                         self._pool_ints(x_shape, seqL, bins, 0, hpp, smem_optin), [])

    # ---- packed conv3d (csrc/cuda/packed_conv3d.cuh) -----------------------------------------
    def conv(self, x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits, c_in, stride, padding,
             dilation, bias, bn_scale, bn_shift, act, slope, out_mode, out_scale, out_qn,
             out_qp) -> Result:
        N, C, T, H, W = x.shape
        Co, kT, kH, kW = w_packed.shape[:4]
        osz = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip((T, H, W), (kT, kH, kW), stride, padding, dilation)]
        dt = (torch.float32 if out_mode == 0 else torch.int32 if out_mode == 2
              else torch.int8 if out_qn < 0 else torch.uint8)
        y = torch.full((N, *osz, Co), -1, dtype=dt) if dt != torch.float32 else \
            torch.full((N, *osz, Co), float("nan"))
        # x is sent with its own strides (any memory order), as the bind passes x.stride()
        storage_elems = max(1, 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride())))
        flat = torch.as_strided(x, (storage_elems,), (1,)) if x.numel() else x.reshape(-1)
        xd = {torch.float32: 0, torch.int8: 1, torch.uint8: 2, torch.bool: 2}[x.dtype]
        ints = [xd, *x.stride(), N, C, T, H, W, in_qn, in_qp, w_bits, Co, kT, kH, kW, *stride,
                *padding, *dilation, *osz, act, out_mode, out_qn, out_qp]
        r = self._add("conv", [("x", flat, False, 0), ("x_scale", x_scale.float().reshape(1),
                                                       False, 0),
                               ("w", w_packed, False, 0), ("w_scale", w_scale, False, 0),
                               ("bias", bias, False, 0), ("bn_scale", bn_scale, False, 0),
                               ("bn_shift", bn_shift, False, 0),
                               ("out_scale", None if out_scale is None
                                else out_scale.float().reshape(1), False, 0),
                               ("y", y, True, 0)], ints, [slope])
        return r

    def conv_scratch(self, x_shape, c_in, w_shape, stride, padding, dilation) -> Result:
        """packed_conv3d_scratch_bytes for this geometry (out["bytes"], one int64)."""
        N, C, T, H, W = x_shape
        Co, kT, kH, kW = w_shape[:4]
        osz = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip((T, H, W), (kT, kH, kW), stride, padding, dilation)]
        ints = [0, 0, 0, 0, 0, 0, N, C, T, H, W, -128, 127, 8, Co, kT, kH, kW, *stride,
                *padding, *dilation, *osz, 0, 2, 0, 0]
        return self._add("conv_scratch", [(n, None, False, 0) for n in range(8)]
                         + [("bytes", torch.zeros(1, dtype=torch.int64), True, 0)], ints, [0.0])

    def cvt16(self, f: torch.Tensor, bits: torch.Tensor) -> Result:
        """The emulation's __float2half_rn / __float2bfloat16_rn of f (fp32) and
        __half2float / __bfloat162float of bits (int16 patterns)."""
        n, m = f.numel(), bits.numel()
        return self._add("cvt16", [("f", f, False, 0), ("bits", bits, False, 0),
                                   ("half", torch.zeros(n, dtype=torch.int16), True, 0),
                                   ("bf16", torch.zeros(n, dtype=torch.int16), True, 0),
                                   ("from_half", torch.zeros(m), True, 0),
                                   ("from_bf16", torch.zeros(m), True, 0)], [], [])

    def reset(self) -> Result:
        return self._add("reset", [], [], [])


class EmuFailure(AssertionError):
    """The driver process failed: a sanitizer report, an abort, a crash."""

    def __init__(self, p: subprocess.CompletedProcess):
        self.proc = p
        super().__init__(f"emulation driver exited {p.returncode}\n--- stderr (tail)\n"
                         f"{p.stderr[-8000:]}\n--- stdout (tail)\n{p.stdout[-2000:]}")

