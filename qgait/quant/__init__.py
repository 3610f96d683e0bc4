"""Quantization API: configs, model preparation (fake quant) and conversion."""
from qgait.quant.api import QuantConfig, quantize_, set_quant_mode  # noqa: F401
