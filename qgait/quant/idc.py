"""IDC: inter-class distance-guided calibration (QGait's stage-2 loss).

For a batch with embeddings of the quantized student ``e_q`` and of the frozen full-precision
teacher ``e_t`` ([N, C, P]: N sequences, C channels, P parts), per part p:

    D_q[p] = ||e_q[i, :, p] - e_q[j, :, p]||_2,   D_t[p] likewise          ([P, N, N])
    M      = {(i, j): label_i != label_j}          (pairs of different identities)
    L_idc  = mean over p and (i, j) in M of SmoothL1( D_q[p] / mean_M(D_q[p])
                                                     - D_t[p] / mean_M(D_t[p]) )

Normalising by the mean over M compares *relative* inter-class distances, so the loss is
invariant to a global scale of either embedding (quantization changes scales freely; what must
survive is which walkers are far apart). A batch with a single identity has no such pair and
contributes exactly 0 (with a graph, so ``backward`` still works), never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _part_distances(e: torch.Tensor) -> torch.Tensor:
    """[N, C, P] -> [P, N, N] Euclidean distances, from the differences of the rows.

    Not ``||a||^2 + ||b||^2 - 2 a.b``: in fp32 that cancels catastrophically for near-duplicate
    embeddings (two walkers of different identities at distance 7.7e-3, norms ~60, came out as
    a clamp's 1e-6 with zero gradient). ``cdist`` without the matmul path subtracts first, so
    the distance is exact to fp32 rounding of the difference; its gradient at distance 0 (the
    diagonal, exact duplicates) is 0, not NaN. The cost is O(P N^2 C) like the matmul (N ~ 64,
    C ~ 256 here)."""
    x = e.permute(2, 0, 1).float()  # [P, N, C]
    return torch.cdist(x, x, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def idc_loss(e_q: torch.Tensor, e_t: torch.Tensor, labels: torch.Tensor, beta: float = 1.0,
             eps: float = 1e-12) -> torch.Tensor:
    """IDC loss (module docstring). Args: e_q, e_t [N, C, P] (or [N, C]); labels [N].

    Returns a scalar; the teacher's embeddings are detached.
    """
    if e_q.shape != e_t.shape:
        raise ValueError(f"idc_loss: student {tuple(e_q.shape)} and teacher "
                         f"{tuple(e_t.shape)} embeddings differ in shape")
    if e_q.dim() == 2:
        e_q, e_t = e_q.unsqueeze(-1), e_t.unsqueeze(-1)
    if e_q.dim() != 3 or labels.dim() != 1 or labels.shape[0] != e_q.shape[0]:
        raise ValueError(f"idc_loss: expected embeddings [N, C, P] and labels [N], got "
                         f"{tuple(e_q.shape)} and {tuple(labels.shape)}")
    mask = labels.unsqueeze(0) != labels.unsqueeze(1)  # [N, N]
    n_pairs = mask.sum()
    d_q = _part_distances(e_q)
    with torch.no_grad():
        d_t = _part_distances(e_t.detach())
    m = mask.unsqueeze(0).to(d_q.dtype)  # [1, N, N]
    denom = n_pairs.clamp_min(1).to(d_q.dtype)
    mean_q = (d_q * m).sum(dim=(1, 2), keepdim=True) / denom
    mean_t = (d_t * m).sum(dim=(1, 2), keepdim=True) / denom
    rel_q = d_q / mean_q.clamp_min(eps)
    rel_t = d_t / mean_t.clamp_min(eps)
    per = F.smooth_l1_loss(rel_q, rel_t, beta=beta, reduction="none") * m
    # No different-identity pair: 0 from the graph (not NaN, and backward still works).
    return per.sum() / (denom * d_q.shape[0])
