"""GaitLite3D: a small 3-D convolutional silhouette gait model sized for CPU training.

Layout (``c = round(16 * width)``, input ``[N, 1, T, 64, 44]`` binary silhouettes)::

    stem    Conv3d(1 -> c, 3x3x3, stride (1, 2, 2))         -> [N, c,  T, 32, 22]
    stage1  Conv3d(c -> 2c, 3x3x3), Conv3d(2c -> 2c, 1x3x3)  -> [N, 2c, T, 32, 22]
    pool    MaxPool3d((1, 2, 2))                             -> [N, 2c, T, 16, 11]
    stage2  Conv3d(2c -> 4c, 3x3x3), Conv3d(4c -> 4c, 1x3x3) -> [N, 4c, T, 16, 11]
    stage3  Conv3d(4c -> 8c, 1x3x3)                          -> [N, 8c, T, 16, 11]
    head    qgait.ops.set_pool_hpp (temporal max + horizontal pyramid, bins (16, 8, 4, 2, 1))
            -> [N', 8c, 31] -> SeparateFCs -> embeddings [N', E, 31]
            -> BNNeck (BatchNorm1d over E*P) -> cosine classifier per part -> logits

The stem halves the resolution straight away: a binary silhouette carries little detail at
the pixel level, and at 32x22 every later layer costs a quarter of the full-resolution MACs,
which is what makes training on a 2-core CPU feasible. Temporal 3x3x3 kernels sit where the
map is small; the 1x3x3 kernels add spatial depth cheaply.

Every conv block is exactly ``nn.Sequential(nn.Conv3d, nn.BatchNorm3d, nn.LeakyReLU)`` so that a
later ``convert()`` can fold BN + activation into a packed conv, and every conv is a plain
``nn.Conv3d`` so that ``qgait.quantize_`` can swap it. The per-part FCs are one
:class:`SeparateFCs` module holding ``weight [P, C_in, C_out]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from qgait.nn.soft_quant import part_matmul
from qgait.ops import set_pool_hpp

DEFAULT_BINS = (16, 8, 4, 2, 1)


def conv_block(cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)) -> nn.Sequential:
    """``Conv3d -> BatchNorm3d -> LeakyReLU``; 'same' padding, no conv bias (BN has one)."""
    pad = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
        nn.BatchNorm3d(cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class SeparateFCs(nn.Module):
    """One linear map per part: ``[N, C_in, P] -> [N, C_out, P]``, ``weight [P, C_in, C_out]``."""

    def __init__(self, parts: int, in_channels: int, out_channels: int):
        super().__init__()
        self.parts, self.in_channels, self.out_channels = parts, in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(parts, in_channels, out_channels))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return part_matmul(x, self.weight)   # [N, Cin, P] -> [N, Cout, P]

    def extra_repr(self) -> str:
        return f"parts={self.parts}, in={self.in_channels}, out={self.out_channels}"


class BNNeckHead(nn.Module):
    """BNNeck + per-part cosine classifier (OpenGait's SeparateBNNecks convention).

    ``[N, E, P] -> (bnneck [N, E, P], logits [N, classes, P])``. One BatchNorm1d over all
    ``E * P`` features; logits are ``scale * cos(feature, class weight)`` per part, so the
    cross-entropy sees well-scaled inputs from the first iteration.
    """

    def __init__(self, parts: int, channels: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.parts, self.scale = parts, scale
        self.bn = nn.BatchNorm1d(channels * parts)
        self.weight = nn.Parameter(torch.empty(parts, channels, num_classes))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor):
        N, E, P = x.shape
        feat = self.bn(x.reshape(N, E * P)).reshape(N, E, P)
        f = F.normalize(feat.permute(2, 0, 1), dim=-1)             # [P, N, E]
        w = F.normalize(self.weight, dim=1).to(f.dtype)            # [P, E, classes]
        logits = torch.bmm(f, w).permute(1, 2, 0) * self.scale     # [N, classes, P]
        return feat, logits


class GaitLite3D(nn.Module):
    """Small 3-D CNN gait model: silhouettes in, per-part embeddings (and training logits) out.

    Args:
        num_classes: training identities (the classifier's width); 0 drops the classifier.
        width: channel multiplier; ``c = round(16 * width)`` stem channels.
        embed_dim: embedding channels per part (default ``8c``).
        bins: horizontal pyramid bins; ``P = sum(bins)`` parts.
        scale: cosine-classifier logit scale.
        height, width_px: expected input size (only used by :meth:`summary`).

    ``forward(x, seqL=None)``:
        x: ``[N, 1, T, 64, 44]`` float (0/1). With ``seqL`` (list of frame counts, N = 1,
        ``sum(seqL) = T``) the sequences packed along T are embedded separately: each runs
        through the trunk alone (so temporal kernels never see a neighbour's frames) and the
        pooling splits them again.
        Returns ``{"embeddings": [N', E, P], "logits": [N', classes, P], "bnneck": [N', E, P]}``
        with ``N' = N`` or ``len(seqL)``; ``logits`` is None when ``num_classes == 0``.
    """

    def __init__(self, num_classes: int, width: float = 1.0, embed_dim: int | None = None,
                 bins: Sequence[int] = DEFAULT_BINS, scale: float = 16.0,
                 height: int = 64, width_px: int = 44):
        super().__init__()
        # build_model's arguments, for model files (qgait.model_io): rebuilt from these
        self.arch = {"name": "GaitLite3D", "num_classes": int(num_classes), "width": float(width),
                     "embed_dim": None if embed_dim is None else int(embed_dim),
                     "bins": [int(b) for b in bins], "scale": float(scale),
                     "height": int(height), "width_px": int(width_px)}
        c = max(4, int(round(16 * width)))
        self.num_classes, self.bins = num_classes, tuple(bins)
        self.input_hw = (height, width_px)
        self.stem = conv_block(1, c, (3, 3, 3), stride=(1, 2, 2))
        self.stage1 = nn.Sequential(conv_block(c, 2 * c), conv_block(2 * c, 2 * c, (1, 3, 3)))
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.stage2 = nn.Sequential(conv_block(2 * c, 4 * c), conv_block(4 * c, 4 * c, (1, 3, 3)))
        self.stage3 = nn.Sequential(conv_block(4 * c, 8 * c, (1, 3, 3)))
        self.out_channels = 8 * c
        self.parts = sum(self.bins)
        self.embed_dim = embed_dim or 8 * c
        self.fc = SeparateFCs(self.parts, self.out_channels, self.embed_dim)
        self.head = (BNNeckHead(self.parts, self.embed_dim, num_classes, scale)
                     if num_classes else None)

    def drop_classifier(self) -> "GaitLite3D":
        """Removes the training-only classifier (as ``num_classes=0``): what an embedding needs
        and what a shipped model file holds. Embeddings are unchanged; returns ``self``."""
        self.head, self.num_classes = None, 0
        self.arch["num_classes"] = 0
        return self

    # The children trunk() runs one after another, each output feeding the next: convert() reads
    # it to keep the packed convolutions integer from the stem to stage3 (pool1 included).
    sequential_children = ("stem", "stage1", "pool1", "stage2", "stage3")

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, T, H, W] -> [N, 8c, T, H/4, W/4]`` feature maps (before pooling)."""
        conv = self.stem[0]
        kt = getattr(conv, "kernel_size", (1,))[0]   # (export wrappers have none: no padding)
        if x.shape[2] < kt:
            # A clip shorter than the temporal kernel (1-2 frames: CASIA-B has a few) has its
            # temporal zero padding made explicit, and the extra output frames dropped: the
            # same numbers, but torch 2.13's CPU bf16 channels-last Conv3d with one input
            # channel reads uninitialised memory for the padding of a 1-frame input (its
            # output is garbage, different on every call), which is what evaluation runs.
            p = kt // 2
            T = x.shape[2]
            h = conv(F.pad(x, (0, 0, 0, 0, p, p)))[:, :, p:p + T]
            h = self.stem[1:](h)
        else:
            h = self.stem(x)
        return self.stage3(self.stage2(self.pool1(self.stage1(h))))

    def forward(self, x: torch.Tensor, seqL: Sequence[int] | None = None) -> dict:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError("GaitLite3D: expected x of shape [N, 1, T, H, W], "
                             f"got {tuple(x.shape)}")
        if seqL is not None:
            seqL = [int(s) for s in seqL]
            if x.shape[0] != 1 or sum(seqL) != x.shape[2] or min(seqL) < 1:
                raise ValueError(f"GaitLite3D: seqL {seqL} must be positive and sum to T="
                                 f"{x.shape[2]} with N=1, got x {tuple(x.shape)}")
        if seqL is not None and len(seqL) > 1:
            feats = torch.cat([self.trunk(p) for p in torch.split(x, seqL, dim=2)], dim=2)
        else:
            feats = self.trunk(x)
        pooled = set_pool_hpp(feats, seqL, self.bins)                    # [N', C, P]
        emb = self.fc(pooled)                                            # [N', E, P]
        out = {"embeddings": emb, "logits": None, "bnneck": emb}
        if self.head is not None:
            out["bnneck"], out["logits"] = self.head(emb)
        return out

    # ------------------------------------------------------------------ reporting
    def macs_per_frame(self) -> int:
        """Multiply-accumulates of the conv trunk per input frame (the head is per sequence)."""
        H, W = self.input_hw
        macs, h, w = 0, H, W
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                h = (h + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
                w = (w + 2 * m.padding[2] - m.kernel_size[2]) // m.stride[2] + 1
                k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
                macs += h * w * k * m.in_channels * m.out_channels // m.groups
            elif isinstance(m, nn.MaxPool3d):
                h, w = h // 2, w // 2
        return macs

    def summary(self, file=None) -> str:
        """Parameters per top-level module and conv MACs per frame; printed and returned."""
        lines = [f"GaitLite3D(num_classes={self.num_classes}, channels {self.out_channels}, "
                 f"parts {self.parts}, embed {self.embed_dim})"]
        total = 0
        for name, mod in self.named_children():
            n = sum(p.numel() for p in mod.parameters())
            total += n
            lines.append(f"  {name:<8s} {n:>10,d} params")
        head_macs = self.parts * self.out_channels * self.embed_dim
        lines.append(f"  total    {total:>10,d} params")
        lines.append(f"  conv MACs per frame {self.macs_per_frame() / 1e6:.2f} M "
                     f"(+ {head_macs / 1e6:.2f} M per sequence in the part FCs), input "
                     f"{self.input_hw[0]}x{self.input_hw[1]}")
        text = "\n".join(lines)
        print(text, file=file)
        return text
