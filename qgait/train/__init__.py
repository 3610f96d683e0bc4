"""Training: losses, batches, the trainer, config handling."""
from qgait.train.build import build_trainer, load_dataset, run_training  # noqa: F401
from qgait.train.config import load_config, parse_overrides  # noqa: F401
from qgait.train.losses import batch_all_triplet_loss, part_cross_entropy  # noqa: F401
from qgait.train.trainer import STAGES, Trainer, register_stage  # noqa: F401
from qgait.pipeline import stages as _stages  # noqa: F401,E402  (registers "qat" and "soft")
