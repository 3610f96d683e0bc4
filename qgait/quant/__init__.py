"""Quantization API: configs, model preparation (fake quant) and conversion."""
from qgait.quant.api import QuantConfig, quantize_, set_quant_mode  # noqa: F401
from qgait.quant.idc import idc_loss  # noqa: F401,E402
