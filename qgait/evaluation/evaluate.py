"""Embedding a test set with any ``embed_fn`` and scoring it (``qgait eval``)."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from qgait.evaluation.metrics import (CASIA_B_GALLERY, CASIA_B_PROBES, casia_b_rank1,
                                      part_distance, retrieval_metrics)

EmbedFn = Callable[[torch.Tensor, list], torch.Tensor]


def model_embed_fn(model: torch.nn.Module, device="cpu", amp_dtype=None,
                   channels_last: bool = False) -> EmbedFn:
    """``embed_fn(x [1, 1, sumT, H, W], seqL) -> [len(seqL), C, P]`` float32 from a model whose
    forward returns ``{"embeddings": ...}`` (fp, fake-quant and packed models alike)."""
    device = torch.device(device)
    model.eval()

    @torch.inference_mode()
    def fn(x, seqL):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = model(x, seqL)
        return out["embeddings"].float().cpu()
    return fn


def extract(embed_fn: EmbedFn, dataset, indices: Sequence[int] | None = None,
            max_frames: int = 720, progress: bool = True) -> torch.Tensor:
    """Embeddings ``[len(indices), C, P]`` (dataset order when ``indices`` is None)."""
    from qgait.data import iter_test_batches
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    pos = {i: j for j, i in enumerate(indices)}
    out = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(indices), desc="embedding", unit="seq", leave=False)
    for x, seqL, idx in iter_test_batches(dataset, indices, max_frames=max_frames):
        e = embed_fn(x, seqL)
        if out is None:
            out = torch.empty((len(indices),) + tuple(e.shape[1:]), dtype=torch.float32)
        out[[pos[i] for i in idx]] = e.float()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def evaluate(embed_fn: EmbedFn, dataset, protocol: str = "casia-b", max_frames: int = 720,
             progress: bool = True, min_frames: int = 0) -> dict:
    """Embeds ``dataset`` and scores it.

    Args:
        embed_fn: see :func:`model_embed_fn`.
        dataset: an OpenGaitDataset of the test subjects (``.seqs`` with subject / condition /
            view).
        protocol: "casia-b" (the rank-1 tables + generic metrics of all probes against the
            whole nm-01..04 gallery) or "generic" (every sequence as probe against every other
            sequence: leave-one-out retrieval).
        min_frames: when > 0, the results are also computed without the sequences shorter
            than this (as probes and as gallery), under ``"filtered"``, listing what was
            left out. (The shared CASIA-B copy has a few 1-4 frame sequences, e.g. subject
            068 at 054; one such near-empty embedding can become every probe's nearest
            neighbour for its gallery view.)

    Returns:
        A JSON-serialisable dict: ``casia_b`` (see :func:`casia_b_rank1`) when applicable,
        ``generic`` (see :func:`retrieval_metrics`), ``n_sequences`` and ``seconds``.
    """
    if protocol not in ("casia-b", "generic"):
        raise ValueError(f"evaluate: unknown protocol {protocol!r}; expected casia-b or generic")
    t0 = time.perf_counter()
    feats = extract(embed_fn, dataset, max_frames=max_frames, progress=progress)
    subj = np.array([q.subject for q in dataset.seqs])
    cond = np.array([q.condition for q in dataset.seqs])
    view = np.array([q.view for q in dataset.seqs])
    res = score(feats, subj, cond, view, protocol)
    res.update({"protocol": protocol, "n_sequences": len(dataset.seqs),
                "embedding_shape": list(feats.shape[1:])})
    if min_frames > 0:
        keep = np.array([dataset.n_frames(i) >= min_frames for i in range(len(dataset))])
        short = [f"{q.subject}/{q.condition}/{q.view} ({dataset.n_frames(i)} frames)"
                 for i, q in enumerate(dataset.seqs) if not keep[i]]
        filt = score(feats[torch.from_numpy(keep)], subj[keep], cond[keep], view[keep], protocol)
        res["filtered"] = {"min_frames": min_frames, "excluded": short, **filt}
    res["seconds"] = time.perf_counter() - t0
    return res


def score(feats: torch.Tensor, subj, cond, view, protocol: str = "casia-b") -> dict:
    """The metrics of :func:`evaluate` from embeddings ``[N, C, P]`` and per-sequence labels."""
    res: dict = {}
    if protocol == "casia-b":
        res["casia_b"] = casia_b_rank1(feats, subj, cond, view)
        probes = np.isin(cond, sum(CASIA_B_PROBES.values(), ()))
        gal = np.isin(cond, CASIA_B_GALLERY)
        d = part_distance(feats[probes], feats[gal])
        res["generic"] = retrieval_metrics(d, subj[probes], subj[gal])
    elif protocol == "generic":
        d = part_distance(feats, feats)
        self_pairs = np.eye(len(subj), dtype=bool)  # a sequence is not its own match
        res["generic"] = retrieval_metrics(d, subj, subj, exclude=self_pairs)
    return res
