"""Evaluation: CASIA-B rank-1 tables and generic retrieval metrics for any ``embed_fn``."""
from qgait.evaluation.evaluate import evaluate, extract, model_embed_fn  # noqa: F401
from qgait.evaluation.bootstrap import paired_bootstrap  # noqa: F401
from qgait.evaluation.metrics import (casia_b_hits, casia_b_rank1, casia_b_tables,  # noqa: F401
                                      format_casia_b, part_distance, retrieval_metrics)
