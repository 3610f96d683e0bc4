"""The trainer: model, data, optimizer, schedule and checkpoints as separate pieces.

:func:`build_trainer` wires a config into a :class:`Trainer`; the trainer itself only runs the
loop. Two hooks are meant for the later stages (QAT, soft stage with a teacher):

* ``STAGES[name].prepare(model, cfg) -> model`` runs on the fp model before the optimizer is
  built (``register_stage``); the "fp" stage returns the model unchanged.
* ``trainer.add_loss_term(name, fn, weight)``: ``fn(trainer, out, x, labels) -> (loss, info)``
  is added to the objective every step (e.g. the IDC loss against a teacher's embeddings).

A checkpoint holds model, optimizer, scheduler, AMP scaler, step, sampler state and RNG states;
batches are a pure function of the step (:mod:`qgait.train.data`), so a resumed run produces
the same loss sequence as an uninterrupted one.
"""
from __future__ import annotations

import csv
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from qgait.model_io import atomic_save, save_checkpoint  # noqa: F401 (atomic_save: re-export)
from qgait.train.losses import batch_all_triplet_loss, part_cross_entropy

LossFn = Callable[..., tuple]


# ----------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    prepare: Callable[[nn.Module, dict], nn.Module]
    setup: Callable[["Trainer", dict], None] | None = None


STAGES: dict[str, Stage] = {"fp": Stage("fp", lambda model, cfg: model)}


def register_stage(name: str, prepare: Callable[[nn.Module, dict], nn.Module],
                   setup: Callable[["Trainer", dict], None] | None = None) -> None:
    """Registers a training stage: ``prepare(model, cfg)`` turns the built model into the one
    trained (e.g. ``qgait.quantize_`` for QAT); ``setup(trainer, cfg)``, if given, runs once
    the trainer exists (to add loss terms or step hooks, e.g. IDC and the k schedule)."""
    STAGES[name] = Stage(name, prepare, setup)


# ----------------------------------------------------------------------------- environment
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device):
    """The autocast dtype for ``train.amp`` on ``device`` (None: fp32).

    "auto": bf16 on CUDA devices that support it, else fp16; on CPUs bf16 only when the CPU
    has native bf16 (measured on an AVX512-BF16 CPU: bf16 Conv3d with channels-last 3-D ran
    faster than fp32 for GaitLite3D's shapes, see the README), else fp32.
    """
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as tensors and plain numbers (a checkpoint read with
    ``weights_only=True`` holds no numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restores :func:`rng_state` (or the numpy tuple of a qgait 0.1 checkpoint)."""
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = st["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                npst["has_gauss"], npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def lr_lambda(cfg: dict, iterations: int) -> Callable[[int], float]:
    """Multiplier of the base LR at a step: linear warmup, then cosine / step / constant."""
    s = cfg["sched"]
    warm, name = int(s["warmup"]), s["name"]
    milestones, gamma, floor = list(s["milestones"]), float(s["gamma"]), float(s["min_lr_ratio"])

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if name == "cosine":
            span = max(1, iterations - warm)
            p = min(1.0, (step - warm) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        if name == "step":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0
    return f


_clock = time.perf_counter   # the loop's clock (step times, the budget); tests replace it


def budget_iterations(budget_s: float, elapsed_s: float, step: int, step_s: float,
                      cap: int) -> int:
    """The run's total iterations under a wall-time budget: the steps done plus as many more
    as ``step_s`` (a measured seconds-per-step) fits into what is left of ``budget_s`` after
    ``elapsed_s``, at most ``cap`` (``train.iterations``) and at least one more step."""
    more = int(max(0.0, budget_s - elapsed_s) // max(step_s, 1e-9))
    return int(min(cap, step + max(1, more)))


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; BatchNorm parameters and biases get no weight decay. Quantizer steps
    (``w_scale`` / ``a_scale`` of the SoftQuant layers) get their own group, without decay and
    with ``lr * quant.step_lr_mult``: an adaptive optimizer moves every parameter by ~lr per
    step, which would be a large relative change of a small step size."""
    o = cfg["optim"]
    decay, no_decay, steps = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.endswith(("w_scale", "a_scale")):
            steps.append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if steps:
        mult = float(cfg.get("quant", {}).get("step_lr_mult", 1.0))
        groups.append({"params": steps, "weight_decay": 0.0, "lr": o["lr"] * mult})
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"])
    return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Runs the training loop; owns nothing it did not get.

    Args:
        cfg: the validated config (see :mod:`qgait.train.config`).
        model: the model (already prepared for the stage, on ``device``; wrapped in DDP when
            distributed).
        batches: a :class:`~qgait.train.data.TrainBatches` (or any iterator of
            ``(step, x, labels)``) starting at ``start_step``.
        optimizer, scheduler: torch optimizer and LR scheduler (stepped once per iteration).
        device: where the model runs.
        out_dir: checkpoints and logs go here (rank 0 writes).
        rank, world_size: the DDP shard (1 process: 0, 1).
    """

    def __init__(self, cfg, model, batches, optimizer, scheduler, device, out_dir,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.cfg, self.model, self.batches = cfg, model, batches
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.out_dir = torch.device(device), Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.step = start_step
        self.amp_dtype = resolve_amp(cfg["train"]["amp"], self.device)
        cl = cfg["train"]["channels_last"]
        self.channels_last = (self.amp_dtype is not None) if cl == "auto" else bool(cl)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.loss_terms: list[tuple[str, LossFn, float]] = []
        L = cfg["loss"]
        if L["triplet_weight"]:
            self.add_loss_term("triplet", _triplet_term, L["triplet_weight"])
        if L["ce_weight"]:
            self.add_loss_term("ce", _ce_term, L["ce_weight"])
        self.step_hooks: list[Callable[["Trainer"], None]] = []
        self.history: list[dict] = []
        self._stop = False
        # train.budget_minutes: the iteration count measured once, kept in the checkpoint
        self.budget_iterations: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def add_loss_term(self, name: str, fn: LossFn, weight: float = 1.0) -> None:
        """Adds ``weight * fn(trainer, out, x, labels)[0]`` to the objective; ``fn`` returns
        ``(loss, info dict)`` and its info is logged as ``<name>_<key>``."""
        if any(n == name for n, _, _ in self.loss_terms):
            raise ValueError(f"Trainer.add_loss_term: a term named {name!r} exists already")
        self.loss_terms.append((name, fn, float(weight)))

    def add_step_hook(self, fn: Callable[["Trainer"], None]) -> None:
        """``fn(trainer)`` runs before every step (``trainer.step`` is the step about to run),
        e.g. to follow a schedule of the quantizer's temperature."""
        self.step_hooks.append(fn)

    # ---------------------------------------------------------------- one step
    def train_step(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        for hook in self.step_hooks:
            hook(self)
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.model(x)
        total = 0.0
        rec: dict = {}
        for name, fn, w in self.loss_terms:
            loss, info = fn(self, out, x, labels)
            total = total + w * loss
            rec[name] = float(loss.detach())
            for k, v in info.items():
                rec[f"{name}_{k}"] = float(v)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        rec["loss"] = float(total.detach())
        return rec

    # ---------------------------------------------------------------- loop
    def train(self, iterations: int | None = None) -> list[dict]:
        """Trains until ``iterations`` steps in total (default ``train.iterations``); saves a
        checkpoint every ``train.ckpt_every`` steps and on exit (also on Ctrl-C / SIGTERM)."""
        t = self.cfg["train"]
        if self.budget_iterations is not None:
            self._set_iterations(self.budget_iterations)
        end = t["iterations"] if iterations is None else iterations
        budget = t["budget_minutes"] if iterations is None else None
        calibrate_at = self.step + int(t["budget_calibration"])
        bar = None
        if self.is_main and t["progress"]:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=self.step, desc=f"train[{self.cfg['stage']}]",
                       dynamic_ncols=True)
        old = None
        if hasattr(signal, "SIGTERM"):
            try:
                old = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread
                old = None
        log = CSVLog(self.out_dir / "log.csv") if self.is_main else None
        tb = _tensorboard(self.out_dir) if self.is_main else None
        last = begin = _clock()
        try:
            while self.step < end and not self._stop:
                step, x, labels = next(self.batches)
                if step != self.step:
                    raise RuntimeError(f"Trainer: batch for step {step} at step {self.step}")
                rec = self.train_step(x, labels)
                self.step += 1
                now = _clock()
                rec["sec_per_iter"] = now - last
                last = now
                rec["step"] = self.step
                self.history.append(rec)
                if budget and self.budget_iterations is None and self.step >= calibrate_at:
                    end = self._resolve_budget(budget * 60.0, now - begin)
                    if bar is not None:
                        bar.total = end
                        bar.refresh()
                if log is not None:
                    log.write(rec)
                if tb is not None:
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, self.step)
                if bar is not None:
                    bar.update(1)
                    if self.step % t["log_every"] == 0 or self.step == end:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.4f}",
                                        acc=f"{rec.get('ce_accuracy', 0):.2f}")
                if t["ckpt_every"] and self.step % t["ckpt_every"] == 0 and self.step < end:
                    self.save()
                if t["keep_every"] and self.step % t["keep_every"] == 0:
                    self.save(self.out_dir / f"ckpt_{self.step:06d}.pt")
                if self.world_size > 1:
                    self._agree_on_stop()
        finally:
            self.save()
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            if tb is not None:
                tb.close()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        return self.history

    def _on_sigterm(self, signum, frame):
        self._stop = True  # finish the step, checkpoint, return

    def _agree_on_stop(self) -> None:
        # A signal may reach the ranks at different steps; a rank leaving the loop alone would
        # leave the others blocked in their next all-reduce, so all stop when any one does.
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self._stop else 0.0],
                            device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag.item() > 0)

    # ---------------------------------------------------------------- time budget
    def _resolve_budget(self, budget_s: float, elapsed_s: float) -> int:
        """Fixes the run's length from the median step time of the calibration steps (their
        first third left out: warm-up of caches and allocator). The LR schedule's warmup must
        outlast the calibration, so the steps taken so far are those of a run configured with
        that length from the start (config validation checks it)."""
        t = self.cfg["train"]
        recent = [r["sec_per_iter"] for r in self.history[-int(t["budget_calibration"]):]]
        step_s = float(np.median(recent[len(recent) // 3:]))
        n = budget_iterations(budget_s, elapsed_s, self.step, step_s, int(t["iterations"]))
        if self.world_size > 1:   # every rank must stop at the same step
            import torch.distributed as dist
            v = torch.tensor([n], dtype=torch.int64,
                             device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(v, op=dist.ReduceOp.MIN)
            n = int(v.item())
        self.budget_iterations = n
        self._set_iterations(n)
        if self.is_main:
            print(f"qgait train: {t['budget_minutes']:g} min budget, {step_s:.3f} s per step "
                  f"measured: {n} iterations", flush=True)
        return n

    def _set_iterations(self, n: int) -> None:
        self.cfg["train"]["iterations"] = int(n)
        self.scheduler.lr_lambdas = [lr_lambda(self.cfg, int(n))
                                     for _ in self.scheduler.lr_lambdas]

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sampler = getattr(self.batches, "sampler", None)
        return {
            "step": self.step,
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": sampler.state_dict() if sampler is not None else None,
            "rng": rng_state(),
            "config": self.cfg,
            "stage": self.cfg["stage"],
            "budget_iterations": self.budget_iterations,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Writes the checkpoint (rank 0 only) to ``path`` (default ``out_dir/last.pt``)."""
        if not self.is_main:
            return None
        path = Path(path) if path is not None else self.out_dir / "last.pt"
        save_checkpoint(self.state_dict(), path)
        return path

    def load_state_dict(self, ck: dict) -> None:
        self.unwrapped.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        if ck.get("budget_iterations") is not None:   # a budget run resumes at its length
            self.budget_iterations = int(ck["budget_iterations"])
            self._set_iterations(self.budget_iterations)


def _triplet_term(trainer, out, x, labels):
    return batch_all_triplet_loss(out["embeddings"], labels, trainer.cfg["loss"]["triplet_margin"])


def _ce_term(trainer, out, x, labels):
    return part_cross_entropy(out["logits"], labels, trainer.cfg["loss"]["label_smoothing"])


class CSVLog:
    """Appends one row per step; the header is the first row's keys (extra keys are dropped)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fields = None
        if path.exists() and path.stat().st_size:
            with open(path) as f:
                self._fields = next(csv.reader(f), None)
        self._f = open(path, "a", newline="")
        self._w = None

    def write(self, rec: dict) -> None:
        if self._fields is None:
            self._fields = ["step"] + [k for k in rec if k != "step"]
            csv.writer(self._f).writerow(self._fields)
        if self._w is None:
            self._w = csv.DictWriter(self._f, self._fields, extrasaction="ignore")
        self._w.writerow(rec)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the CSV log is enough
        return None
    return SummaryWriter(str(out_dir / "tb"))
