"""The Triton kernels as a GPU compiles them, and the packed conv's triton_op glue.

* Every Triton kernel variant the launchers produce compiles offline for sm_80 and sm_90
  (tests/triton_aot.py: ``triton.compile`` with a ``GPUTarget``, no GPU needed), int8 ``tl.dot``
  lowers to tensor-core MMA, no variant spills registers (ptxas -v), and torch.compile's
  analysis of each launch runs and sees only outputs written.
* packed_conv3d's Triton op has its own fake (opcheck, torch.compile, export), is launched
  through wrap_triton, computes 1 / step in the kernel and asserts the steps on the device.
The soft fake-quant and pooling kernels' own checks are in test_soft_quant.py / test_pooling.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qgait
from qgait.ops import packed_conv3d

from conftest import device_of
from test_packed_conv3d import TINY, make_case

HERE = Path(__file__).parent
KERNELS = {"_sfq_fwd_kernel", "_sfq_bwd_kernel", "_sph_fwd_kernel", "_sph_bwd_kernel",
           "_packed_conv3d_kernel"}


# ---- offline compilation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_report():
    """tests/triton_aot.py's JSON records for sm_80 and sm_90 (a subprocess: the kernels must
    be compiled as triton.jit functions, not the interpreter's)."""
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(80)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Triton's NVIDIA backend / ptxas unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "--arch", "80", "90",
                        "--jobs", str(min(8, os.cpu_count() or 1))],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-4000:]
    listing = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "--list"], env=env,
                             capture_output=True, text=True, timeout=300)
    n_variants = len(listing.stdout.splitlines())
    return n_variants, [json.loads(line) for line in p.stdout.splitlines()
                        if line.startswith("{")]


def test_every_triton_variant_compiles_for_sm80_sm90(aot_report):
    n_variants, records = aot_report
    assert n_variants > 0 and len(records) == 2 * n_variants
    assert {r["kernel"] for r in records} == KERNELS
    failed = [(r["variant"], r["arch"], r["error"]) for r in records if not r["ok"]]
    assert not failed, failed[:3]


def test_int8_dot_lowers_to_tensor_cores(aot_report):
    conv = [r for r in aot_report[1] if r["kernel"] == "_packed_conv3d_kernel"]
    assert conv
    for r in conv:
        assert r["mma"] == ("wgmma" if r["arch"] == "sm_90" else "mma.sync"), r


def test_no_variant_spills_registers(aot_report):
    """ptxas's spill report of every variant: the packed conv's 64x64x64 tile spilled
    400-1100 bytes per thread at 4 warps; it is launched with 8."""
    spills = [(r["variant"], r["arch"], r["spill_store_bytes"], r["spill_load_bytes"])
              for r in aot_report[1] if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert all(r["spill_store_bytes"] is not None for r in aot_report[1])
    assert not spills, spills
    conv = [r for r in aot_report[1] if r["kernel"] == "_packed_conv3d_kernel"]
    assert all(r["num_warps"] == 8 for r in conv)


def test_no_approximate_division(aot_report):
    """``/`` on fp32 lowers to div.full.f32 (2 ulp) on a GPU; every division in the kernels is
    tl.div_rn (the pooling means, 1 / step, tanh), so they round as the CPU does."""
    bad = [(r["variant"], r["arch"]) for r in aot_report[1] if r["approx_div"]]
    assert not bad, bad


def test_conv_epilogue_never_contracts_to_fma(aot_report):
    """Compiled with fp fusion on (as Inductor compiles user kernels), the packed conv's
    epilogue still has no FMA: its products are mul.rn, so float outputs stay bit-exact."""
    fused = [r for r in aot_report[1] if r["variant"].endswith(".fpfusion")]
    assert len(fused) == 2 and all(r["fp_fusion"] is True for r in fused)
    assert all(r["fma_f32"] == 0 for r in fused), fused


OUTPUTS = {"_sfq_fwd_kernel": {"y_ptr"}, "_sfq_bwd_kernel": {"dx_ptr", "part_ptr"},
           "_sph_fwd_kernel": {"out_ptr", "targ_ptr", "sarg_ptr"}, "_sph_bwd_kernel": {"dx_ptr"},
           "_packed_conv3d_kernel": {"y_ptr"}}


def test_torch_compile_kernel_analysis(aot_report):
    """torch.compile's analysis of each launch (TTIR, as for a wrap_triton kernel under
    Inductor / functionalization) runs, tuple arguments included, and finds exactly outputs
    written: never an input."""
    for r in aot_report[1]:
        writes = set(r["inductor_writes"])
        assert writes and writes <= OUTPUTS[r["kernel"]], (r["variant"], writes)
    fwd = {r["variant"]: set(r["inductor_writes"]) for r in aot_report[1]
           if r["arch"] == "sm_90" and r["kernel"] == "_sph_fwd_kernel"}
    assert fwd["sph_fwd.fp32.seq.m0.idx1"] == OUTPUTS["_sph_fwd_kernel"]
    assert fwd["sph_fwd.fp32.seq.m0.idx0"] == {"out_ptr"}


# ---- packed_conv3d's triton_op ----------------------------------------------------------------
def _conv_args(device, scale=0.021, w_scale_bad=None, out_scale=0.07):
    case = TINY[0]
    x, wp, ws, kw = make_case(case, 8, "float_unsigned", device=device)
    if w_scale_bad is not None:
        ws = ws.clone()
        ws[1] = w_scale_bad
    co = case[2]
    return (x, torch.tensor(scale, device=device), 0, 255, wp, ws, 8, case[1], [1, 1, 1],
            [1, 1, 1], [1, 1, 1], torch.randn(co, device=device), None, None, 1, 0.0, 1,
            torch.tensor(out_scale, device=device), 0, 255)


@pytest.fixture
def conv_triton(triton_device):
    return torch.ops.qgait.packed_conv3d_triton.default


def test_packed_conv3d_triton_opcheck(conv_triton, triton_device):
    """Its own fake impl: torch.compile / export / opcheck no longer launch the kernel on fake
    tensors (opcheck's faketensor test failed before)."""
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if triton_device.type == "cpu":
        # AOT tracing enters the triton_op and would run the interpreter on fake tensors
        utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(conv_triton, _conv_args(triton_device), test_utils=utils)


def test_packed_conv3d_triton_torch_compile_and_export(conv_triton, triton_device):
    if triton_device.type == "cpu":
        pytest.skip("compiling through a triton_op traces its kernels, which the Triton "
                    "interpreter cannot do on fake tensors (needs a GPU)")
    args = _conv_args(triton_device)
    want = conv_triton(*args).float() * 2

    def f(x):
        return torch.ops.qgait.packed_conv3d_triton(x, *args[1:]).float() * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(args[0])
    assert torch.equal(got, want)

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (args[0],))
    assert torch.equal(ep.module()(args[0]), want)


def test_packed_conv3d_triton_launcher_does_not_divide_in_torch(conv_triton, triton_device):
    """1 / x_scale and 1 / out_scale are IEEE divisions in the kernel (a torch division in the
    launcher is what Inductor compiles to an approximate division on a GPU)."""
    from triton_probes import DispatchRecord as Record

    args = _conv_args(triton_device)
    with Record() as rec:
        got = conv_triton(*args)
    assert not rec.ops & {"div", "reciprocal", "true_divide"}, rec.ops
    ref = packed_conv3d(args[0].cpu(), args[4].cpu(), args[5].cpu(), w_bits=8, c_in=args[7],
                        x_scale=args[1].cpu(), padding=1, bias=args[11].cpu(), act="relu",
                        out="quant", out_scale=args[17].cpu(), backend="reference")
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("which", ["x_scale", "w_scale", "out_scale"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_packed_conv3d_triton_asserts_steps(conv_triton, triton_device, triton_debug, which,
                                            bad):
    """A bad step reaching the kernel (the Python check reads values only on the CPU) fails
    its device-side assert."""
    kw = {"x_scale": dict(scale=bad), "w_scale": dict(w_scale_bad=bad),
          "out_scale": dict(out_scale=bad)}[which]
    if not triton_debug:  # on a GPU an assert poisons the process's CUDA context
        code = ("import sys, torch, qgait\n"
                "sys.path.insert(0, %r)\n"
                "from test_triton import _conv_args\n"
                "torch.ops.qgait.packed_conv3d_triton(*_conv_args('cuda', **%r))\n"
                "torch.cuda.synchronize()\n") % (str(HERE), kw)
        code = code.replace("nan", "float('nan')").replace("inf", "float('inf')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300, cwd=str(HERE))
        assert r.returncode != 0 and "assert" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]
        return
    with pytest.raises(Exception, match="must be finite and > 0"):
        conv_triton(*_conv_args(triton_device, **kw))


def test_triton_device_follows_the_machine(triton_device):
    """Compiled kernels on CUDA tensors where a GPU exists, the interpreter elsewhere."""
    assert triton_device.type == device_of("triton")
    assert (triton_device.type == "cuda") == torch.cuda.is_available() or \
        os.environ.get("TRITON_INTERPRET") == "1"
    assert qgait.backends()["triton"]["available"]
