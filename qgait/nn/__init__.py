"""The nn.Modules users put in their models."""
from qgait.nn.soft_quant import SoftQuantConv2d, SoftQuantConv3d, SoftQuantLinear  # noqa: F401
