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


def test_gradients_finite_with_duplicate_embeddings():
    e = torch.randn(4, 8, 3)
    e_q = torch.cat([e[:2], e[:2]]).requires_grad_()  # identical rows: zero distances
    loss = idc_loss(e_q, torch.randn(4, 8, 3), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e_q.grad).all()


def test_teacher_gets_no_gradient_and_bad_shapes():
    e_t = torch.randn(4, 8, 2, requires_grad=True)
    idc_loss(torch.randn(4, 8, 2, requires_grad=True), e_t, torch.tensor([0, 1, 2, 3])).backward()
    assert e_t.grad is None
    with pytest.raises(ValueError, match="idc_loss"):
        idc_loss(torch.randn(4, 8, 2), torch.randn(4, 8, 3), torch.arange(4))
    with pytest.raises(ValueError, match="idc_loss"):
        idc_loss(torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.arange(3))
