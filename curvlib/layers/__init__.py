"""Layer plugins (kind ``layer``): per-layer fast paths from recorded ``X`` and ``Z``.

Built in: ``linear`` (``nn.Linear``), ``conv1d``, ``conv2d``, ``conv3d``, and ``generic``
(any module whose samples are independent, through ``torch.func``). :func:`plugin_for`
finds a module's plugin through its class's MRO. See ``docs/layers.md``.
"""

from curvlib.layers.base import (
    KFACFactors,
    LayerPlugin,
    LayerPluginError,
    plugin_for,
    registered_layer_types,
    trainable_parameters,
    work_dtype,
)
from curvlib.layers.conv import Conv1dPlugin, Conv2dPlugin, Conv3dPlugin, ConvPlugin
from curvlib.layers.generic import GenericPlugin, SampleInteractionError
from curvlib.layers.linear import LinearPlugin, PatchPlugin

__all__ = [
    "Conv1dPlugin",
    "Conv2dPlugin",
    "Conv3dPlugin",
    "ConvPlugin",
    "GenericPlugin",
    "KFACFactors",
    "LayerPlugin",
    "LayerPluginError",
    "LinearPlugin",
    "PatchPlugin",
    "SampleInteractionError",
    "plugin_for",
    "registered_layer_types",
    "trainable_parameters",
    "work_dtype",
]
