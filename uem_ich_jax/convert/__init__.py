"""Loading timm ConvNeXt-V2 and upstream UEM-ICH PyTorch weights into the Flax models."""

from uem_ich_jax.convert.torch_weights import LAYOUTS
from uem_ich_jax.convert.torch_weights import WeightLoadError
from uem_ich_jax.convert.torch_weights import detect_layout
from uem_ich_jax.convert.torch_weights import load_state_dict
from uem_ich_jax.convert.torch_weights import load_weights
from uem_ich_jax.convert.torch_weights import parameter_map
from uem_ich_jax.convert.torch_weights import read_state_dict

__all__ = [
    "LAYOUTS",
    "WeightLoadError",
    "detect_layout",
    "load_state_dict",
    "load_weights",
    "parameter_map",
    "read_state_dict",
]
