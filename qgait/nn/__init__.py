"""The nn.Modules users put in their models."""
from qgait.nn.pooling import HorizontalPyramidPool, SetPoolHPP, TemporalPool  # noqa: F401
from qgait.nn.soft_quant import (SoftQuantConv2d, SoftQuantConv3d, SoftQuantLinear,  # noqa: F401
                                 SoftQuantPartLinear)
