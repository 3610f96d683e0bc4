"""Quantization API: configs, model preparation (fake quant) and conversion."""
from qgait.quant.api import QuantConfig, quantize_, register_quantizable, set_quant_mode  # noqa: F401
from qgait.quant.idc import idc_loss  # noqa: F401,E402
from qgait.quant.packing import pack_weight, quantize_weight, unpack_weight  # noqa: F401,E402
from qgait.quant.convert import convert, model_nbytes  # noqa: F401,E402
