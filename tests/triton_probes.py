"""Small Triton kernels that run one device helper of qgait's kernels on chosen inputs, so tests
can reach what a whole launch cannot (exact bit patterns, program ids near 2^31). Imported only
by tests that have Triton."""
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from qgait.kernels import soft_quant as _sq


@triton.jit
def bf16_round_bits(u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[i] = the kernels' fp32 -> bf16 rounding of the fp32 whose bits are u[i] (int32)."""
    o = tl.arange(0, BLOCK)
    u = tl.load(u_ptr + o, mask=o < n, other=0)
    tl.store(y_ptr + o, _sq._bf16_rne(u.to(tl.float32, bitcast=True)), mask=o < n)


@triton.jit
def tile_offsets(out_ptr, pid, nb, rows, inner, BR: tl.constexpr, BI: tl.constexpr):
    """out[BR * BI] = the element offsets of program ``pid``'s tile (int32, as a program id
    is), -1 where masked."""
    row, col, offs, mask = _sq._tile(pid, nb, rows, inner, BR, BI)
    o = tl.arange(0, BR)[:, None] * BI + tl.arange(0, BI)[None, :]
    tl.store(out_ptr + o, tl.where(mask, offs, -1))


class DispatchRecord(TorchDispatchMode):
    """Records the names of the torch ops run inside it (``.ops``): what a launcher computes in
    torch rather than in its kernel."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
