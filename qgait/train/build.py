"""Wiring a config into a :class:`~qgait.train.trainer.Trainer` (``qgait train``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qgait.data.augment import SilhouetteAugment
from qgait.models import build_model
from qgait.train.data import TrainBatches
from qgait.train.trainer import (STAGES, Trainer, build_optimizer, lr_lambda, seed_everything)


def setup_distributed():
    """``(rank, world_size, device)`` from torchrun's environment; initialises the process
    group (nccl on CUDA, gloo on CPU) when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("qgait train: WORLD_SIZE > 1 but torch.distributed is unavailable")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve_root(cfg: dict) -> Path:
    """The data root; generates the synthetic tree there first if asked and missing."""
    d = cfg["data"]
    root = Path(os.path.expanduser(str(d["root"])))
    empty = not root.exists() or not any(root.rglob("*.pkl*"))
    if empty and d.get("synthetic"):
        from qgait.data import synthetic
        root.mkdir(parents=True, exist_ok=True)
        synthetic.generate(str(root), **d["synthetic"])
    return root


def load_dataset(cfg: dict, split: str = "train", progress: bool = True):
    """The OpenGaitDataset of ``data.train_ids`` or ``data.test_ids``; a missing or empty
    tree is a :class:`~qgait.data.DataError` saying how to point at the data."""
    from qgait.data import DataError, OpenGaitDataset
    key = "train_ids" if split == "train" else "test_ids"
    ids = cfg["data"][key]
    root = resolve_root(cfg)
    try:
        return OpenGaitDataset(root, id_range=tuple(ids) if ids else None, progress=progress)
    except DataError as e:
        if "no sequences" not in str(e) and "not a directory" not in str(e):
            raise
        raise DataError(f"{e}; the {split} data is read from "
                        f"<root>/<subject>/<condition>/<view>/*.pkl: pass --data ROOT (or set "
                        f"data.root) and check data.{key} = {ids}") from e


def build_trainer(cfg: dict, dataset=None, resume: str | os.PathLike | None = None,
                  device=None, rank: int = 0, world_size: int = 1) -> Trainer:
    """Model -> stage preparation -> optimizer/scheduler -> batches -> Trainer (-> resume).

    Args:
        cfg: a validated config.
        dataset: the training dataset (default: loaded from ``cfg["data"]``).
        resume: a checkpoint path (or "auto": ``out_dir/last.pt`` if it exists).
        device, rank, world_size: where and which shard (default: single CPU/GPU process).
    """
    from qgait.model_io import load_checkpoint, load_weights, read_header
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = cfg["train"]["threads"]
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(cfg["train"]["out_dir"])
    if resume == "auto":
        resume = out_dir / "last.pt" if (out_dir / "last.pt").exists() else None
    # every model file the run reads is checked before anything else happens (the data tree
    # is loaded, or generated, next): a bad path fails at once
    ck = load_checkpoint(resume, map_location=device) if resume is not None else None
    init = cfg["train"]["init_from"]
    init_sd = load_weights(init)[0] if init and resume is None else None
    q = cfg.get("quant") or {}
    for key in ("init_from", "teacher"):
        if cfg["stage"] != "fp" and q.get(key):
            read_header(q[key])
    seed_everything(cfg["seed"])
    if dataset is None:
        dataset = load_dataset(cfg, "train", progress=rank == 0)
    m = cfg["model"]
    model = build_model(m["name"], num_classes=len(dataset.subjects), width=m["width"],
                        embed_dim=m["embed_dim"], bins=tuple(m["bins"]), scale=m["scale"])
    if init_sd is not None:
        # Weights only (fresh optimizer, schedule and step), loaded into the model as built,
        # i.e. before the stage's preparation: an fp checkpoint starts a QAT run.
        model.load_state_dict(init_sd)
    model = STAGES[cfg["stage"]].prepare(model, cfg).to(device)
    if ck is not None:
        model.load_state_dict(ck["model"])
    trained = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg["train"]["iterations"]))
    start = int(ck["step"]) if ck is not None else 0
    d = cfg["data"]
    batches = TrainBatches(dataset, d["P"], d["K"], d["frames"], d["sampling"], seed=cfg["seed"],
                           rank=rank, world_size=world_size, start_step=start,
                           prefetch=d["prefetch"],
                           augment=SilhouetteAugment.from_config(d["augment"]))
    if ck is not None and ck.get("sampler"):
        batches.sampler.load_state_dict(ck["sampler"])
    trainer = Trainer(cfg, trained, batches, opt, sched, device, out_dir, rank, world_size,
                      start_step=start)
    if ck is not None:
        trainer.load_state_dict(ck)
    stage = STAGES[cfg["stage"]]
    if stage.setup is not None:
        stage.setup(trainer, cfg)
    return trainer


def run_training(cfg: dict, resume=None, dataset=None) -> Trainer:
    """``qgait train``: sets up (distributed) training, trains, writes ``config.json``."""
    from qgait.model_io import atomic_write_text
    rank, world, device = setup_distributed()
    out_dir = Path(cfg["train"]["out_dir"])
    # the trainer first (model files, data): a mistake there leaves the output folder alone
    trainer = build_trainer(cfg, dataset, resume, device, rank, world)
    if rank == 0:
        atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2))
        trainer.unwrapped.summary()
        print(f"qgait train: stage {cfg['stage']}, {world} process(es) on {device}, amp "
              f"{trainer.amp_dtype}, channels_last {trainer.channels_last}, from step "
              f"{trainer.step} to {cfg['train']['iterations']}, out {out_dir}", flush=True)
    try:
        trainer.train()
    finally:
        trainer.batches.close()
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    return trainer
