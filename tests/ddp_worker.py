"""Worker for test_train.py::test_ddp_two_cpu_processes (run under torchrun)."""
import sys
from pathlib import Path

import torch

from gait_fakes import FakeGaitDataset
from qgait.train import load_config, run_training

out = Path(sys.argv[1])
cfg = load_config(None, {"data": {"P": 2, "K": 2, "frames": 4, "prefetch": 0},
                         "model": {"width": 0.25}, "optim": {"name": "adamw", "lr": 0.003},
                         "train": {"iterations": 3, "out_dir": str(out / "run"), "amp": "none",
                                   "progress": False, "ckpt_every": 0}})
ds = FakeGaitDataset(n_subjects=4, conds=["nm-01", "nm-02"], views=["000"], frames=6)
trainer = run_training(cfg, dataset=ds)
rank = trainer.rank
assert trainer.world_size == 2, trainer.world_size
torch.save({k: v.detach().clone() for k, v in trainer.unwrapped.state_dict(keep_vars=False).items()},
           out / f"weights_rank{rank}.pt")
seen = [trainer.batches.sampler.batch(s) for s in range(3)]
torch.save(seen, out / f"batches_rank{rank}.pt")
