"""Triton kernels of qgait, installed as ``qgait.kernels``. Each module holds kernels and thin
launchers only; the ops, references and autograd live in ``qgait/ops/<op>.py``."""
