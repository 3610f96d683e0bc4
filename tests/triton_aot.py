"""Offline compilation of every Triton kernel variant for sm_80 / sm_90, as a GPU would compile
it (``triton.compile`` with a ``GPUTarget``: TTIR -> TTGIR -> LLVM -> PTX -> ptxas). Needs no GPU.

The variants are the launches qgait's own launchers make: each launcher is called on ``meta``
tensors (which take the GPU code path: GPU tile sizes, launch options) with ``wrap_triton``
replaced by a recorder, so the argument lists, constexprs and options compiled here are exactly
those of a real launch. ptxas's ``-v`` report gives each variant's registers and spill bytes.

Run by tests/test_triton.py in a subprocess (the kernels must be ``triton.jit`` functions, not
the interpreter's); by hand::

    python tests/triton_aot.py --arch 80 90 [--jobs 2] [--only packed_conv3d]

prints one JSON object per variant: kernel, variant, arch, ok, error, registers, spill bytes,
tensor-core instruction, and the pointers torch.compile's kernel analysis finds written.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py: unset TRITON_INTERPRET (it compiles for a GPU)")

import torch  # noqa: E402

META = torch.device("meta")


# ---- recording the launchers' launches --------------------------------------------------------
class _Recorder:
    """Stands in for torch.library.wrap_triton: records (kernel, args, kwargs) per launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append((kernel, args, kwargs))
                return launch
        return _Grid()


def _record(fn, *args, **kwargs):
    import torch.library

    rec = _Recorder()
    orig = torch.library.wrap_triton
    torch.library.wrap_triton = rec
    try:
        fn(*args, **kwargs)
    finally:
        torch.library.wrap_triton = orig
    return rec.launches


def _t(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


def launches():
    """[(variant name, kernel, args, kwargs)] of every variant the launchers produce."""
    from qgait.kernels import packed_conv3d as pc
    from qgait.kernels import pooling as po
    from qgait.kernels import soft_quant as sq

    out = []

    def add(name, fn, *args):
        for kernel, a, kw in _record(fn, *args):
            out.append((name, kernel, a, kw))

    # Every value of every constexpr and every pointer dtype appears in some variant (a
    # covering set, not the cross product: a packed conv variant takes ptxas seconds).
    # soft fake-quant: each (soft, k = 0) path forward and backward at fp32 on 32 x 32 tiles,
    # the gradient needs one at a time, each dtype, the two other tile shapes (per tensor
    # 1 x 1024, last axis 1024 x 1)
    layouts = {"tile32x32": ((8, 64, 27), 1, (64,)), "tile1x1024": ((4096,), -1, ()),
               "tile1024x1": ((4096, 16), 1, (16,))}
    dts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    combos = [("fp32", "tile32x32", soft, k) for soft in (False, True) for k in (0.0, 2.0)]
    combos += [(d, "tile32x32", False, 2.0) for d in ("fp16", "bf16")]
    combos += [("fp32", lay, False, 2.0) for lay in ("tile1x1024", "tile1024x1")]
    for j, (dt, lay, soft, k) in enumerate(combos):
        shape, axis, sshape = layouts[lay]
        x, s = _t(shape, dts[dt]), _t(sshape)
        tag = f"{dt}.{lay}.{'soft' if soft else 'hard'}.k{k:g}"
        add(f"sfq_fwd.{tag}", sq.forward, x, s, axis, -8, 7, k, soft)
        needs = [(True, True)] + ([(True, False), (False, True)] if j == 0 else [])
        for ndx, nds in needs:
            add(f"sfq_bwd.{tag}.dx{int(ndx)}ds{int(nds)}", sq.backward, _t(shape, dts[dt]), x,
                s, axis, -8, 7, k, soft, 0.1, ndx, nds)

    # pooling: every mode x index need with seqL at fp32, without seqL once, T = 1 (no frame
    # indices), temporal pooling alone, fp16 / bf16 once
    bins = [16, 8, 4, 2, 1]
    for dt in ("fp32", "fp16", "bf16"):
        for seqL in ([3, 1, 4], []):
            x = _t((1 if seqL else 2, 4, 8, 16, 11), dts[dt])
            n = len(seqL) or 2
            sq_tag = "seq" if seqL else "noseq"
            for mode in (0, 1, 2):
                for need in (True, False):
                    if (dt != "fp32" or not seqL) and (mode or not need):
                        continue
                    if dt != "fp32" and not seqL:
                        continue
                    tag = f"{dt}.{sq_tag}.m{mode}.idx{int(need)}"
                    add(f"sph_fwd.{tag}", po.set_pool_hpp_fwd, x, seqL, bins, mode, need)
                    if not need:
                        continue  # the backward is the same with or without the need
                    add(f"sph_bwd.{tag}", po.set_pool_hpp_bwd, _t((n, 4, 31), dts[dt]),
                        _t((n, 4, 16, 11), torch.int32), _t((n, 4, 31), torch.int32),
                        list(x.shape), seqL, bins, mode)
            if dt == "fp32":
                add(f"tp_fwd.{dt}.{sq_tag}", po.temporal_pool_fwd, x, seqL, True)
                add(f"tp_bwd.{dt}.{sq_tag}", po.temporal_pool_bwd, _t((n, 4, 16, 11)),
                    _t((n, 4, 16, 11), torch.int32), list(x.shape), seqL)
    x1 = _t((2, 4, 1, 16, 11))
    add("sph_fwd.fp32.T1", po.set_pool_hpp_fwd, x1, [], [16, 1], 0, True)
    add("sph_bwd.fp32.T1", po.set_pool_hpp_bwd, _t((2, 4, 17)), _t((0,), torch.int32),
        _t((2, 4, 17), torch.int32), list(x1.shape), [], [16, 1], 0)

    # packed conv3d, 64 x 64 x 64 GPU tiles: (input, weight bits, output, BN, activation) so
    # that each input kind (fp32 / uint8 / int8 pointer), int8 / int4 weights, fp32 / uint8 /
    # int8 / int32 outputs, BN on / off and each activation occur
    ws = _t((64,))
    xdt = {"fp32": torch.float32, "u8": torch.uint8, "s8": torch.int8}
    for xkind, bits, out_mode, oq, bn, act in [
            ("fp32", 8, 0, (0, 0), True, 2), ("fp32", 4, 1, (0, 255), False, 1),
            ("u8", 4, 2, (0, 0), False, 0), ("s8", 8, 1, (-128, 127), True, 0)]:
        x = _t((2, 32, 4, 16, 11), xdt[xkind])
        grid_in = (-128, 127) if xkind == "s8" else (0, 255)
        wp = _t((64, 3, 3, 3, 32 if bits == 8 else 16), torch.int8 if bits == 8 else torch.uint8)
        tag = f"x{xkind}.w{bits}.out{out_mode}{'s' if oq[0] < 0 else ''}.bn{int(bn)}.act{act}"
        add(f"conv.{tag}", pc.forward, x, _t(()), *grid_in, wp, ws, bits, 32, [1, 1, 1],
            [1, 1, 1], [1, 1, 1], _t((64,)), _t((64,)) if bn else None,
            _t((64,)) if bn else None, act, 0.1, out_mode, _t(()) if out_mode == 1 else None,
            *oq)
    # the first conv variant again with fp fusion on, as Inductor compiles user kernels: its
    # epilogue must still have no FMA
    name, kernel, a, kw = next(v for v in out if v[0].startswith("conv."))
    out.append((name + ".fpfusion", kernel, a, {**kw, "enable_fp_fusion": True}))
    return out


# ---- compiling one variant --------------------------------------------------------------------
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
       torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _TY[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    if isinstance(v, tuple):
        return tuple(_arg_type(e) for e in v)
    raise TypeError(f"no Triton type for {type(v).__name__}")


def compile_one(kernel, args, kwargs, arch):
    """Compiles one recorded launch for sm_<arch>; returns (cubin-compiled kernel, options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bound = inspect.signature(kernel.fn).bind_partial(*args, **{
        k: v for k, v in kwargs.items() if k in kernel.arg_names})
    signature, constexprs = {}, {}
    for p in kernel.params:
        v = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        else:
            signature[p.name] = _arg_type(v)
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    options.setdefault("num_warps", 4)
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), options


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of a PTX kernel from Triton's bundled ptxas (-v)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        p = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", src, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True)
    log = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None}


def inductor_writes(kernel, args, kwargs, arch) -> list[str]:
    """The pointer arguments torch.compile's analysis of the kernel (its TTIR, as Inductor and
    functionalization compute it for a wrap_triton launch) finds written, with a stand-in driver
    for sm_<arch>: shows that tracing the launch works (tuple arguments included)."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    import triton
    from triton.backends.compiler import GPUTarget

    class _Driver:  # what generate_ttir asks of the active driver
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

    bound = inspect.signature(kernel.fn).bind_partial(*args, **{
        k: v for k, v in kwargs.items() if k in kernel.arg_names})
    kw = {k: torch.empty(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v
          for k, v in bound.arguments.items()}
    drivers = triton.runtime.driver
    old = drivers._active  # None here: no GPU driver is active (reset_active would look for one)
    drivers.set_active(_Driver())
    try:
        if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
            acc = tkw.identify_accessed_tensors(kernel, kw, {})
            names = [d.name for d in acc.read_writes.writes]
        else:  # torch 2.11 and older (a GPU image's torch): the mutation analysis alone
            n_params = len(inspect.signature(tkw.identify_mutated_tensors).parameters)
            names = tkw.identify_mutated_tensors(kernel, kw, *([{}] if n_params == 3 else []))
    finally:
        drivers._active = old
    return sorted(names)


_CACHE: dict = {}


def _job(item):
    i, arch, only, override = item
    if only not in _CACHE:  # recorded once per worker process
        _CACHE[only] = [v for v in launches() if only in v[0]]
    name, kernel, args, kwargs = _CACHE[only][i]
    kwargs = {**kwargs, **override}
    rec = {"kernel": kernel.fn.__name__, "variant": name, "arch": f"sm_{arch}",
           "num_warps": kwargs.get("num_warps", 4)}
    try:
        compiled, options = compile_one(kernel, args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None
        rec.update(ok=True, error=None, mma=mma, **ptxas_report(ptx, arch))
        # fp32 division / FMA instructions in the PTX: div.full / div.approx are the 2-ulp
        # divisions ``/`` lowers to; fma.rn.f32 a contraction (the options decide)
        rec["approx_div"] = len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx))
        rec["fma_f32"] = len(re.findall(r"\bfma\.rn\.f32", ptx))
        rec["fp_fusion"] = options.get("enable_fp_fusion", True)
        rec["inductor_writes"] = inductor_writes(kernel, args, kwargs, arch)
    except Exception as e:  # noqa: BLE001 - reported per variant
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="variants whose name contains this")
    ap.add_argument("--num-warps", type=int, default=None, help="override (a spill study)")
    ap.add_argument("--fp-fusion", action="store_true",
                    help="compile with enable_fp_fusion=True, as Inductor compiles user kernels")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    a = ap.parse_args(argv)
    todo = [v for v in launches() if a.only in v[0]]
    if a.list:
        for name, kernel, _, _ in todo:
            print(kernel.fn.__name__, name)
        return 0
    override = {} if a.num_warps is None else {"num_warps": a.num_warps}
    if a.fp_fusion:
        override["enable_fp_fusion"] = True
    items = [(i, arch, a.only, override) for arch in a.arch for i in range(len(todo))]
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        for rec in ex.map(_job, items):
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
