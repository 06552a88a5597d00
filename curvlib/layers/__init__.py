"""Layer plugins (kind ``layer``): per-layer fast paths from recorded ``X`` and ``Z``.

Built in: ``linear`` (``nn.Linear``), ``conv1d``, ``conv2d``, ``conv3d``, and ``generic``
(any module whose samples are independent, through ``torch.func``). :func:`plugin_for`
finds a module's plugin through its class's MRO. Plugin authors can reuse :func:`contract`
(opt_einsum, planned once per shape) and :func:`pick_gram_method` (the contraction vs
materialisation rule). See ``docs/layers.md``.
"""

from curvlib.layers._patch import MAX_INTERMEDIATE, contract, pick_gram_method
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
    "MAX_INTERMEDIATE",
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
    "contract",
    "pick_gram_method",
    "plugin_for",
    "registered_layer_types",
    "trainable_parameters",
    "work_dtype",
]
