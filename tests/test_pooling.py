"""Tests of qgait.ops.pooling: every backend against the reference and against OpenGait's
semantics (written here independently: view to strips, mean + max)."""
import pytest
import torch

import qgait
from qgait.ops import pooling as P
from qgait.ops.pooling import (horizontal_pyramid_pool, set_pool_hpp, set_pool_hpp_ref,
                               temporal_pool)

from conftest import backend_params


# ---- OpenGait semantics, written independently of qgait's reference -------------------------
def opengait_hpp(x, bins):
    """HorizontalPoolingPyramid: x [n, c, h, w] -> [n, c, sum(bins)] (bins divide h)."""
    n, c = x.shape[:2]
    feats = []
    for b in bins:
        z = x.view(n, c, b, -1)
        z = z.mean(-1) + z.max(-1)[0]
        feats.append(z)
    return torch.cat(feats, -1)


def opengait_set_pool(x, seqL=None):
    """PackSequenceWrapper(torch.max) over dim 2."""
    if seqL is None:
        return torch.max(x, dim=2)[0]
    starts = [sum(seqL[:i]) for i in range(len(seqL))]
    rets = [torch.max(x.narrow(2, s, l), dim=2)[0] for s, l in zip(starts, seqL)]
    return torch.cat(rets)


def rand_x(shape, dtype=torch.float32, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(shape, generator=g)
    elif kind == "binary":  # silhouette-like feature maps: many exact ties
        x = (torch.rand(shape, generator=g) > 0.5).float()
    elif kind == "const":
        x = torch.full(shape, 0.25)
    else:  # few distinct values: ties everywhere, but not all equal
        x = torch.randint(0, 3, shape, generator=g).float()
    return x.to(dtype)


# ---- the reference itself -------------------------------------------------------------------
@pytest.mark.parametrize("bins", [(16, 8, 4, 2, 1), (16,), (1, 2, 4, 8, 16)])
@pytest.mark.parametrize("seqL", [None, [3, 1, 4]])
def test_reference_matches_opengait(bins, seqL):
    x = rand_x((1 if seqL else 2, 5, 8, 16, 7))
    want = opengait_hpp(opengait_set_pool(x, seqL), bins)
    got = set_pool_hpp_ref(x, seqL, bins)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_gradcheck_float64():
    x = rand_x((1, 2, 5, 6, 3), torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda t: set_pool_hpp_ref(t, [2, 3], (3, 2, 4)), (x,))


def test_strip_bounds_adaptive():
    assert P.strip_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert P.strip_bounds(10, 3) == [(0, 4), (3, 7), (6, 10)]
    assert P.strip_bounds(10, 3) == [(i * 10 // 3, -(-(i + 1) * 10 // 3)) for i in range(3)]
