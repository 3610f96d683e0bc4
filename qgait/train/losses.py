"""Training losses: per-part batch-all triplet and label-smoothed cross-entropy.

Both follow OpenGait's conventions, which the published CASIA-B numbers were trained with:

* triplet: for every part separately, every (anchor, positive, negative) of the batch with
  hinge ``max(0, margin + d(a, p) - d(a, n))`` on Euclidean distances; the loss of a part is
  the sum over triplets divided by the number of *non-zero* triplets (so the easy triplets
  that already satisfy the margin do not dilute the gradient as training progresses); the
  parts' losses are averaged.
* cross-entropy: per part on the BNNeck logits, with label smoothing, averaged over parts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-part Euclidean distances: ``x [P, N, C], y [P, M, C] -> [P, N, M]``.

    Uses ``|x|^2 + |y|^2 - 2 x.y`` (one bmm), clamped at 0 before the square root; a tiny
    epsilon keeps the gradient finite for identical vectors.
    """
    y = x if y is None else y
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1).unsqueeze(1)
    d2 = x2 + y2 - 2 * torch.bmm(x, y.transpose(1, 2))
    return torch.sqrt(F.relu(d2) + 1e-12)


def batch_all_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2):
    """Batch-all triplet loss over parts.

    Args:
        emb: ``[N, C, P]`` embeddings.
        labels: int ``[N]``.
        margin: hinge margin.

    Returns:
        ``(loss, info)``: the scalar loss (mean over parts of sum / #non-zero triplets) and a
        dict with ``triplet_nonzero`` (fraction of non-zero triplets) and ``mean_dist``.
    """
    x = emb.float().permute(2, 0, 1)                    # [P, N, C]
    d = pairwise_distance(x)                            # [P, N, N]
    same = labels[:, None] == labels[None, :]           # [N, N]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    # [P, N(anchor), N(pos), N(neg)]: hinge for every triplet, masked to valid ones.
    valid = (pos[:, :, None] & neg[:, None, :]).unsqueeze(0)
    hinge = F.relu(margin + d[:, :, :, None] - d[:, :, None, :]) * valid
    nonzero = (hinge > 0).sum(dim=(1, 2, 3)).float()    # [P]
    per_part = hinge.sum(dim=(1, 2, 3)) / nonzero.clamp(min=1.0)
    n_valid = valid.sum().clamp(min=1).float()
    info = {"triplet_nonzero": (nonzero.mean() / n_valid).detach(),
            "mean_dist": d.mean().detach()}
    return per_part.mean(), info


def part_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                       label_smoothing: float = 0.1):
    """Cross-entropy per part, averaged: ``logits [N, classes, P]``, ``labels [N]``.

    Returns ``(loss, info)`` with the part-averaged top-1 training accuracy in ``info``.
    """
    P = logits.shape[-1]
    target = labels[:, None].expand(-1, P)              # [N, P]
    loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    acc = (logits.argmax(1) == target).float().mean().detach()
    return loss, {"accuracy": acc}
