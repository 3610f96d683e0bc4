"""Benchmark configuration: `pytest bench/ --benchmark-only`. Each benchmark records the
machine and versions in extra_info; ratios between providers are computed in the same run by
bench/_report.py's hook and printed at the end (never asserted)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")
