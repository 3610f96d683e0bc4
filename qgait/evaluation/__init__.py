"""Evaluation: CASIA-B rank-1 tables and generic retrieval metrics for any ``embed_fn``."""
from qgait.evaluation.evaluate import evaluate, extract, model_embed_fn  # noqa: F401
from qgait.evaluation.metrics import (casia_b_rank1, format_casia_b, part_distance,  # noqa: F401
                                      retrieval_metrics)
