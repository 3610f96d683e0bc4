"""qgait's nn.Modules."""
from qgait.nn.pooling import HorizontalPyramidPool, SetPoolHPP, TemporalPool  # noqa: F401
