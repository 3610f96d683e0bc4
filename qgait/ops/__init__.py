"""qgait's ops (functional) and the modules users put in their models."""
from qgait.ops.soft_quant import quant_grid, soft_fake_quant, soft_fake_quant_ref  # noqa: F401
from qgait.ops.pooling import (horizontal_pyramid_pool, horizontal_pyramid_pool_ref,  # noqa: F401
                               set_pool_hpp, set_pool_hpp_ref, temporal_pool, temporal_pool_ref)
from qgait.nn.soft_quant import SoftQuantConv2d, SoftQuantConv3d, SoftQuantLinear  # noqa: F401,E402
from qgait.nn.pooling import HorizontalPyramidPool, SetPoolHPP, TemporalPool  # noqa: F401,E402
from qgait.ops.packed_conv3d import PackedConv3d, packed_conv3d, packed_conv3d_ref  # noqa: F401,E402
