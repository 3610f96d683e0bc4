"""Running QGait's stages in sequence (``qgait pipeline``), resumable at every stage boundary.

A pipeline config is a training config (qgait/configs) whose ``pipeline`` section says which
variants to produce and how long each stage trains::

    pipeline:
      fp:   {train: {iterations: 3000}}            # overrides for stage 0
      qat:  {train: {iterations: 1000}, optim: {lr: 0.01}}
      soft: {train: {iterations: 1000}, optim: {lr: 0.005}}
      variants: [w8a8, w4a4]                         # names from VARIANTS

Every stage writes ``<out>/<variant>/<stage>/`` (fp: ``<out>/fp``); a finished stage leaves
``final.pt`` there and is skipped when the pipeline runs again; an unfinished one resumes from
its ``last.pt``. ``quant.init_from`` and ``quant.teacher`` are filled in from the stages before.
A two-stage ablation without IDC (``w4a4-noidc``) reads the straight-through stage of its
two-stage + IDC twin (``<out>/w4a4/qat``): IDC acts only in the soft stage.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qgait.errors import ConfigError
from qgait.train.config import _merge, validate


@dataclass(frozen=True)
class Variant:
    """One quantized model: its bits and the stages that make it."""

    w_bits: int
    a_bits: int
    stages: tuple[str, ...] = ("qat", "soft")  # in order; both from the fp model
    idc: bool = True
    label: str = ""


# QGait's method and its ablations; a variant's name is ``w{W}a{A}`` (two-stage + IDC) or
# ``w{W}a{A}-{method}``. Ablations train for as many steps in total as the two-stage method
# (a one-stage ablation gets both budgets).
METHODS = {
    "": (("qat", "soft"), True, "two-stage + IDC"),
    "ste": (("qat",), False, "naive STE only"),
    "soft1": (("soft",), False, "soft quantizer, one stage"),
    "noidc": (("qat", "soft"), False, "two-stage without IDC"),
}
_NAME = re.compile(r"w([2-8])a([2-8])(?:-(" + "|".join(m for m in METHODS if m) + r"))?")


def variant(name: str) -> Variant:
    """``"w4a4"`` / ``"w3a3-ste"`` / ... -> its :class:`Variant` (bits 2..8)."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ConfigError(f"qgait pipeline: unknown variant {name!r}; expected w<W>a<A> or "
                          f"w<W>a<A>-<method> with bits 2..8 and method one of "
                          f"{[k for k in METHODS if k]}, e.g. w4a4, w3a3-ste")
    w, a, method = int(m[1]), int(m[2]), m[3] or ""
    stages, idc, what = METHODS[method]
    return Variant(w, a, stages, idc, label=f"W{w}A{a} {what}")


def shared_name(v: Variant) -> str:
    """The folder whose straight-through stage every two-stage ``v`` of these bits uses."""
    return f"w{v.w_bits}a{v.a_bits}"


# The README's results table: QGait at W8A8 and W4A4, and the W4A4 ablations.
VARIANTS = {n: variant(n) for n in ("w8a8", "w4a4", "w4a4-ste", "w4a4-soft1", "w4a4-noidc")}


def stage_config(cfg: dict, stage: str, out_dir: Path, **quant) -> dict:
    """The config of one stage: base config <- pipeline.<stage> overrides <- quant fields."""
    pipe = cfg.get("pipeline") or {}
    c = copy.deepcopy(cfg)
    c = _merge(c, pipe.get(stage) or {})
    c["stage"] = stage
    c["train"]["out_dir"] = str(out_dir)
    c["quant"].update(quant)
    # the pipeline section was checked with the whole config; re-checking it on top of this
    # stage's overrides would apply them to the other stages too (an fp-only time budget then
    # "needs a warmup" in the quantized stages)
    return validate(c, _pipeline=False)


def run_stage(cfg: dict, progress: bool = True) -> Path:
    """Trains one stage to ``train.iterations`` (resuming if it was interrupted); returns
    ``final.pt``. A stage whose ``final.pt`` exists is not run again."""
    from qgait.train.build import run_training

    out = Path(cfg["train"]["out_dir"])
    final = out / "final.pt"
    if final.exists():
        print(f"qgait pipeline: {out} is done (final.pt), skipped", flush=True)
        return final
    cfg["train"]["progress"] = progress and cfg["train"]["progress"]
    trainer = run_training(cfg, resume="auto")
    if trainer.step < cfg["train"]["iterations"]:
        raise RuntimeError(f"qgait pipeline: stage {cfg['stage']} stopped at step "
                           f"{trainer.step} of {cfg['train']['iterations']}; run again to resume")
    tmp = final.with_name("final.pt.tmp")
    shutil.copyfile(out / "last.pt", tmp)
    os.replace(tmp, final)
    return final


def run_variant(cfg: dict, name: str, out: Path, fp_ckpt: Path, progress: bool = True) -> Path:
    """Stages of one variant (module docstring); returns its last stage's final checkpoint."""
    v = variant(name)
    pipe = cfg.get("pipeline") or {}
    prev = fp_ckpt
    for stage in v.stages:
        # IDC acts in the soft stage only: the straight-through stage of a two-stage variant is
        # the same run with or without it (same config, seed and start), so ``-noidc`` shares
        # it with the QGait variant instead of training it twice.
        folder = (shared_name(v) if stage == "qat" and len(v.stages) == 2 else name)
        sc = stage_config(cfg, stage, out / folder / stage, w_bits=v.w_bits, a_bits=v.a_bits,
                          init_from=str(prev), teacher=str(fp_ckpt))
        if len(v.stages) == 1 and stage != "fp":
            # one-stage ablations get the two stages' budget
            total = sum(int(_merge(cfg, pipe.get(s) or {})["train"]["iterations"])
                        for s in ("qat", "soft"))
            sc["train"]["iterations"] = total
        if stage == "soft" and not v.idc:
            sc["quant"]["idc_weight"] = 0.0
        prev = run_stage(sc, progress)
    return prev


def run_pipeline(cfg: dict, out: str | os.PathLike, variants=None, progress: bool = True,
                 fp_checkpoint: str | None = None) -> dict:
    """fp (unless ``fp_checkpoint`` is given), then each variant. Returns {name: checkpoint}."""
    out = Path(out)
    pipe = cfg.get("pipeline") or {}
    variants = list(variants or pipe.get("variants") or ["w8a8", "w4a4"])
    for v in variants:
        variant(v)  # an unknown name fails here, before any stage runs
    if fp_checkpoint:
        from qgait.model_io import ModelFileError, read_header
        fp = Path(fp_checkpoint)
        kind = read_header(fp)["kind"]   # a missing or bad file fails here, before any stage
        if kind != "fp":
            raise ModelFileError(f"{fp}: the fp checkpoint must be a full-precision model, "
                                 f"this one is {kind}")
    else:
        fp = run_stage(stage_config(cfg, "fp", out / "fp"), progress)
    done = {"fp": fp}
    for name in variants:
        done[name] = run_variant(cfg, name, out, fp, progress)
    return done
