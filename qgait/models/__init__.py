"""Gait models."""
from qgait.models.gaitlite3d import BNNeckHead, GaitLite3D, SeparateFCs, conv_block  # noqa: F401
from qgait.nn.soft_quant import SoftQuantPartLinear
from qgait.quant.api import register_quantizable

register_quantizable(SeparateFCs, SoftQuantPartLinear)


def build_model(name: str = "GaitLite3D", **kwargs):
    """Builds a model by name (config key ``model.name``)."""
    if name != "GaitLite3D":
        raise ValueError(f"qgait.models: unknown model {name!r}; expected 'GaitLite3D'")
    return GaitLite3D(**kwargs)
