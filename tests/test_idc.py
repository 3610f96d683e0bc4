"""IDC loss: a hand-computed case, its invariances and its edge cases."""
import math

import pytest
import torch

from qgait.quant.idc import idc_loss


def test_hand_computed_example():
    # 3 sequences, 1 part, 1-D embeddings: student at 0, 1, 3; teacher at 0, 2, 4.
    e_q = torch.tensor([[0.0], [1.0], [3.0]]).unsqueeze(-1)  # [3, 1, 1]
    e_t = torch.tensor([[0.0], [2.0], [4.0]]).unsqueeze(-1)
    labels = torch.tensor([0, 1, 1])  # pairs of different labels: (0,1), (0,2) and symmetric
    # D_q over M: 1, 3 -> mean 2 -> relative 0.5, 1.5 ; D_t: 2, 4 -> mean 3 -> 2/3, 4/3
    d1, d2 = 0.5 - 2 / 3, 1.5 - 4 / 3  # both |d| < beta = 1: 0.5 d^2
    expected = (0.5 * d1 * d1 + 0.5 * d2 * d2) / 2
    got = idc_loss(e_q, e_t, labels)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_zero_when_student_equals_teacher_and_scale_invariant():
    torch.manual_seed(0)
    e = torch.randn(8, 16, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert float(idc_loss(e, e, labels)) < 1e-6
    assert float(idc_loss(5.0 * e, e, labels)) < 1e-6  # global scale of the student
    e2 = e + 0.3 * torch.randn_like(e)
    a = idc_loss(e2, e, labels)
    b = idc_loss(7.0 * e2, 0.1 * e, labels)
    assert float(a) > 1e-4
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_single_identity_contributes_zero_not_nan():
    e_q = torch.randn(4, 8, 2, requires_grad=True)
    loss = idc_loss(e_q, torch.randn(4, 8, 2), torch.zeros(4, dtype=torch.long))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(e_q.grad).all()


def idc_loss_ref64(e_q, e_t, labels, beta=1.0):
    """The module docstring's formula in float64, distances from explicit differences."""
    def dist(e):
        x = e.double().permute(2, 0, 1)  # [P, N, C]
        return torch.linalg.vector_norm(x[:, :, None] - x[:, None], dim=-1)  # grad 0 at 0
    m = (labels[:, None] != labels[None]).double()
    n = m.sum()
    d_q, d_t = dist(e_q), dist(e_t.detach())
    rel_q = d_q / ((d_q * m).sum((1, 2), keepdim=True) / n)
    rel_t = d_t / ((d_t * m).sum((1, 2), keepdim=True) / n)
    per = torch.nn.functional.smooth_l1_loss(rel_q, rel_t, beta=beta, reduction="none") * m
    return per.sum() / (n * d_q.shape[0])


def _value_and_grad(fn, e_q, e_t, labels):
    e = e_q.detach().clone().requires_grad_()
    loss = fn(e, e_t, labels)
    loss.backward()
    return loss.detach(), e.grad


def test_duplicate_embeddings_across_identities():
    """Exact duplicates of *different* identities: a zero distance inside the mask. The loss
    and its gradient are finite and equal the float64 reference (0 is a subgradient of |d|)."""
    torch.manual_seed(0)
    e = torch.randn(2, 8, 3)
    e_q = torch.cat([e, e])  # rows 0 and 2, 1 and 3 are identical ...
    labels = torch.tensor([0, 1, 1, 0])  # ... and belong to different identities
    assert (labels[0] != labels[2]) and (labels[1] != labels[3])
    e_t = torch.randn(4, 8, 3)
    loss, grad = _value_and_grad(idc_loss, e_q, e_t, labels)
    ref, ref_grad = _value_and_grad(idc_loss_ref64, e_q.double(), e_t, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_near_duplicates_across_identities_are_exact():
    """Two walkers of different identities 7.7e-3 apart with embeddings of norm ~60: the fp32
    expansion ||a||^2 + ||b||^2 - 2ab cancels to noise there (it gave a clamped 1e-6 and a zero
    gradient); the distances, the loss and its gradient must match float64."""
    torch.manual_seed(1)
    e_q = 4.0 * torch.randn(6, 256, 2)
    delta = torch.randn(256, 2)
    delta = delta / delta.norm(dim=0) * 7.7e-3  # 7.7e-3 apart in every part
    e_q[1] = e_q[0] + delta
    labels = torch.tensor([0, 1, 2, 2, 3, 3])
    e_t = e_q + 0.5 * torch.randn_like(e_q)
    # the case is hard: the expansion formula in fp32 is far off for this pair
    x = e_q.permute(2, 0, 1)
    sq = x.pow(2).sum(-1)
    d2 = sq[:, :, None] + sq[:, None] - 2 * x @ x.transpose(1, 2)
    expansion = d2.clamp_min(1e-12).sqrt()[:, 0, 1]
    assert ((expansion - 7.7e-3).abs() > 1e-3).any(), expansion
    from qgait.quant.idc import _part_distances
    d = _part_distances(e_q)[:, 0, 1]
    torch.testing.assert_close(d, torch.full_like(d, 7.7e-3), rtol=1e-3, atol=0)
    loss, grad = _value_and_grad(idc_loss, e_q, e_t, labels)
    ref, ref_grad = _value_and_grad(idc_loss_ref64, e_q.double(), e_t, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-8)
    # the pair's rows get the gradient the float64 loss gives them (not 0)
    assert ref_grad[:2].abs().max() > 1e-6
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-7)


def test_matches_float64_reference_on_random_batches():
    torch.manual_seed(2)
    for n, c, p in ((5, 3, 1), (8, 16, 4), (12, 32, 7)):
        e_q, e_t = torch.randn(n, c, p), torch.randn(n, c, p)
        labels = torch.randint(0, 3, (n,))
        for beta in (1.0, 0.05):
            loss, grad = _value_and_grad(lambda a, b, y: idc_loss(a, b, y, beta=beta),
                                         e_q, e_t, labels)
            ref, ref_grad = _value_and_grad(
                lambda a, b, y: idc_loss_ref64(a, b, y, beta=beta), e_q.double(), e_t, labels)
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient_and_bad_shapes():
    e_t = torch.randn(4, 8, 2, requires_grad=True)
    idc_loss(torch.randn(4, 8, 2, requires_grad=True), e_t, torch.tensor([0, 1, 2, 3])).backward()
    assert e_t.grad is None
    with pytest.raises(ValueError, match="idc_loss"):
        idc_loss(torch.randn(4, 8, 2), torch.randn(4, 8, 3), torch.arange(4))
    with pytest.raises(ValueError, match="idc_loss"):
        idc_loss(torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.arange(3))
