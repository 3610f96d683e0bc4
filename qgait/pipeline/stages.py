"""QGait's training stages, registered with the trainer (``qgait train --stage qat|soft``).

* ``qat`` (stage 1): the fp model is quantized with ``quantize_`` (weights per output channel,
  signed; activations per tensor; the binary input left alone; ``quant.keep_8bit`` layers at
  W8A8, the rest at ``W{w_bits}A{a_bits}``), steps are initialised from the first batch (weight
  steps by ``quant.w_init``: LSQ's rule or least squared rounding error; activation steps by
  ``quant.a_init``: least squared error, the batch's largest magnitude or a percentile), and it
  trains with the straight-through quantizer (k = 0) and the task losses.
* ``soft`` (stage 2): the same quantized model, its temperature following a linear schedule
  ``k0 -> k1`` over the stage, trained with the task losses plus ``idc_weight * L_idc`` against
  the frozen full-precision teacher (``quant.teacher``; idc_weight = 0 turns IDC off).

``quant.init_from`` names the checkpoint a stage starts from: an fp checkpoint (weights are
loaded before quantizing, steps initialised from data) or a quantized one (loaded as is, its
learned steps carried over).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from qgait.quant.api import QuantConfig, quantize_, set_quant_mode
from qgait.quant.idc import idc_loss
from qgait.train.trainer import register_stage


def _matches(fqn: str, prefixes) -> bool:
    return any(fqn == p or fqn.startswith(p + ".") for p in prefixes)


def quantize_model(model: nn.Module, q: dict) -> nn.Module:
    """Applies the stage's quantization config (see module docstring) in place."""
    binary, keep = list(q["binary_input"]), list(q["keep_8bit"])
    w8 = lambda fqn: 8 if _matches(fqn, keep) else q["w_bits"]  # noqa: E731
    init = {"w_init": q.get("w_init", "lsq"), "a_init": q.get("a_init", "mse")}
    for fqn, _ in list(model.named_modules()):
        if fqn in binary:
            quantize_(model, QuantConfig(w_bits=w8(fqn), a_bits=None, **init),
                      filter_fn=lambda m, f, name=fqn: f == name)
    quantize_(model, QuantConfig(w_bits=8, a_bits=8, **init),
              filter_fn=lambda m, f: _matches(f, keep))
    quantize_(model, QuantConfig(w_bits=q["w_bits"], a_bits=q["a_bits"], **init))
    return model


def prepare_quantized(model: nn.Module, cfg: dict) -> nn.Module:
    from qgait.model_io import load_weights
    q = cfg["quant"]
    sd, kind = load_weights(q["init_from"]) if q.get("init_from") else (None, None)
    if sd is not None:
        _check_classifier(model, sd, q["init_from"], cfg)
    if kind == "fp":
        model.load_state_dict(sd)
        sd = None
    quantize_model(model, q)
    if sd is not None:
        model.load_state_dict(sd)
    if cfg["stage"] == "soft":
        set_quant_mode(model, k=q["k0"], mode=q["mode"])
    else:
        set_quant_mode(model, k=0.0, mode="hard")
    return model


def _check_classifier(model: nn.Module, sd: dict, src, cfg: dict) -> None:
    """One line, before any weight is copied, when the starting checkpoint was trained on a
    different number of identities than this stage's training split."""
    from qgait.model_io import ModelFileError
    w, mine = sd.get("head.weight"), getattr(getattr(model, "head", None), "weight", None)
    if w is None or mine is None or w.shape[-1] == mine.shape[-1]:
        return
    ids = cfg["data"].get("train_ids")
    raise ModelFileError(f"{src}: trained on {w.shape[-1]} identities, but this stage's training "
                         f"split (data.train_ids {ids}) has {mine.shape[-1]}; train both "
                         "stages on the same subjects (the same --data.train_ids)")


def k_at(step: int, iterations: int, k0: float, k1: float) -> float:
    """Linear temperature schedule over the stage's steps."""
    if iterations <= 1:
        return float(k1)
    return float(k0 + (k1 - k0) * min(1.0, step / (iterations - 1)))


def load_teacher(path, device) -> nn.Module:
    """The frozen full-precision teacher (eval mode, no gradients) from an fp checkpoint."""
    from qgait.model_io import ModelFileError, load_model

    teacher, info = load_model(path)
    if info["kind"] != "fp":
        raise ModelFileError(f"{path}: quant.teacher must be a full-precision (stage fp) model "
                             f"or checkpoint, this one is {info['kind']}")
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def setup_soft(trainer, cfg: dict) -> None:
    q = cfg["quant"]
    iters = cfg["train"]["iterations"]
    model = trainer.unwrapped

    def schedule(tr):
        set_quant_mode(model, k=k_at(tr.step, iters, q["k0"], q["k1"]))
    trainer.add_step_hook(schedule)
    if q["idc_weight"] > 0:
        if not q.get("teacher"):
            raise ValueError("stage soft with quant.idc_weight > 0 needs quant.teacher "
                             "(the fp checkpoint)")
        teacher = load_teacher(q["teacher"], trainer.device)
        trainer.teacher = teacher

        def idc_term(tr, out, x, labels):
            with torch.no_grad():
                t_emb = teacher(x)["embeddings"]
            loss = idc_loss(out["embeddings"], t_emb, labels, beta=q["idc_beta"])
            return loss, {}
        trainer.add_loss_term("idc", idc_term, q["idc_weight"])


def checkpoint_prepare(cfg: dict) -> dict:
    """A copy of ``cfg`` for rebuilding a saved model: its weights come from the checkpoint."""
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("quant", {})["init_from"] = None
    return cfg


register_stage("qat", prepare_quantized)
register_stage("soft", prepare_quantized, setup_soft)
