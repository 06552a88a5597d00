r"""Layer plugins for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

A convolution with ``G`` groups computes at every output pixel ``t``
``y[n, t, g] = W_g x[n, t, g] + b_g``, where ``x[n, t, g]`` is group ``g``'s input patch
(``(I/G)·∏kernel`` values) and ``W_g`` the ``(O/G) × (I/G)·∏kernel`` slice of the weight.
The per-sample gradient sums over pixels, ``U = Σ_t Z_t ⊙ X_t`` (FNGD eq. 13), so the Gram is
either the contraction over pixel pairs or the inner products of the materialised gradients,
whichever costs fewer multiply-adds (:mod:`._patch`). Patches come from ``F.unfold`` (1-D and
2-D) or from a convolution with a one-hot kernel (3-D). Stride, padding (numbers, ``"same"``,
``"valid"``, every ``padding_mode``), dilation, groups and bias are supported.

The weighted gradient ``Σ_n c_n g_n`` never unfolds: it is the convolution's own weight
gradient (``convolution_backward``, what autograd runs) of the scaled output gradient
``c⊙Z``, or, equivalently and cheaper when the input is smaller, of ``Z`` with the scaled
input ``c⊙X``. The per-sample inner products ``⟨g_n, V⟩`` never unfold either: the layer is
linear in its weight, so ``⟨g_n, V⟩ = Σ_t z_nt · conv(x_n; weight=V, bias=None)_t``, one
forward convolution of the (padded) input with weight ``V``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlib.capture import Call
from curvlib.layers.base import LayerPluginError, work_dtype
from curvlib.layers.linear import PatchPlugin
from curvlib.registry import register

__all__ = ["Conv1dPlugin", "Conv2dPlugin", "Conv3dPlugin", "ConvPlugin", "unfold"]



def _explicit_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, for numbers, ``'same'`` and ``'valid'``."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def padded_input(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input the convolution really sees, and the padding left for the op to apply.

    Zero padding given as numbers stays with the op; ``'same'``/``'valid'`` and the
    ``reflect``/``replicate``/``circular`` modes are applied here with ``F.pad``.
    """
    if not isinstance(module.padding, str) and module.padding_mode == "zeros":
        return x, tuple(module.padding)
    pads = _explicit_padding(module)
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(flat):
        x = F.pad(x, flat, mode=mode)
    return x, (0,) * len(pads)


def unfold(x: Tensor, kernel_size: tuple[int, ...], *, stride: tuple[int, ...],
           padding: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Input patches ``(N, C·∏kernel, S)`` of an ``N × C × spatial`` input, any dimension 1–3.

    Column ``s`` holds the patch that output pixel ``s`` (row-major) sees, ordered channel
    first, then kernel positions row-major — the order of a flattened ``(C, *kernel)``
    weight slice.
    """
    dim = len(kernel_size)
    if dim == 2:
        return F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    if dim == 1:
        return F.unfold(x.unsqueeze(2), (1, kernel_size[0]), dilation=(1, dilation[0]),
                        padding=(0, padding[0]), stride=(1, stride[0]))
    if dim == 3:
        c = x.shape[1]
        k = math.prod(kernel_size)
        eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *kernel_size)
        patches = F.conv3d(x, eye.repeat(c, 1, 1, 1, 1), stride=stride, padding=padding,
                           dilation=dilation, groups=c)
        return patches.reshape(x.shape[0], c * k, -1)
    raise LayerPluginError(f"unfold supports 1 to 3 spatial dimensions, got {dim}")


class ConvPlugin(PatchPlugin):
    """Shared implementation of the 1-D, 2-D and 3-D convolution plugins."""

    dim: int = 2

    def groups(self, module: nn.Module) -> int:
        """The convolution's ``groups``."""
        return int(module.groups)

    def _check_conv(self, module: nn.Module) -> None:
        if getattr(module, "transposed", False):
            raise LayerPluginError(
                f"{type(module).__name__} is a transposed convolution; the convolution "
                f"plugins handle nn.Conv1d/2d/3d only (the generic plugin handles others)"
            )

    def _recorded(self, module: nn.Module, call: Call) -> tuple[Tensor, Tensor]:
        """The call's ``X`` and ``Z``, after checking the module and the input's batch dim."""
        self._check_conv(module)
        x, z = call.input, call.grad_output
        if x.dim() != self.dim + 2:
            raise LayerPluginError(
                f"{type(module).__name__} input of shape {tuple(x.shape)}: curvlib needs a "
                f"batch dimension, (N, C, {', '.join('*' * self.dim)})"
            )
        return x, z

    def patches(self, module: nn.Module, call: Call) -> tuple[Tensor, Tensor]:
        """Patches ``(N, S, G, (I/G)·∏k)`` and output gradients ``(N, S, G, O/G)``."""
        x, z = self._recorded(module, call)
        dtype = work_dtype(x, z)
        x, padding = padded_input(module, x.to(dtype))
        cols = unfold(x, tuple(module.kernel_size), stride=tuple(module.stride),
                      padding=padding, dilation=tuple(module.dilation))
        n, g = x.shape[0], self.groups(module)
        xs = cols.reshape(n, g, -1, cols.shape[-1]).permute(0, 3, 1, 2)
        zs = z.to(dtype).reshape(n, g, z.shape[1] // g, -1).permute(0, 3, 1, 2)
        if xs.shape[1] != zs.shape[1]:
            raise LayerPluginError(
                f"{type(module).__name__}: {xs.shape[1]} input patches but {zs.shape[1]} "
                f"output positions; was the module's forward changed?"
            )
        return xs, zs

    def weight_gradient(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        """The convolution's own weight gradient (``convolution_backward``; no unfolding)."""
        self._check_conv(module)
        x, padding = padded_input(module, x)
        w = module.weight.detach()
        _, gw, _ = torch.ops.aten.convolution_backward(
            z, x, w.to(z.dtype), None, list(module.stride), list(padding),
            list(module.dilation), False, [0] * self.dim, module.groups, [False, True, False],
        )
        return gw

    def weight_row_dots(self, module: nn.Module, call: Call, v: Tensor) -> Tensor:
        """``(N,)``: ``Σ_t z_nt · conv(x_n; weight=v)_t``, one forward convolution of the
        padded input with weight ``v`` (no bias), times ``Z``, summed per sample."""
        x, z = self._recorded(module, call)
        x, padding = padded_input(module, x.to(v.dtype))
        y = torch.convolution(x, v, None, list(module.stride), list(padding),
                              list(module.dilation), False, [0] * self.dim, module.groups)
        if y.shape != z.shape:
            raise LayerPluginError(
                f"{type(module).__name__}: the convolution gives an output of shape "
                f"{tuple(y.shape)} but the output gradient has shape {tuple(z.shape)}; was the "
                f"module's forward changed?"
            )
        n = y.shape[0]
        return (y.reshape(n, -1) * z.to(v.dtype).reshape(n, -1)).sum(1)

    def bias_grad_per_sample(self, module: nn.Module, z: Tensor) -> Tensor:
        """``(N, O)``: the output gradient summed over pixels."""
        return z.sum(list(range(2, z.dim())))


@register("layer", "conv1d")
class Conv1dPlugin(ConvPlugin):
    """``nn.Conv1d`` (and subclasses)."""

    module_types = (nn.Conv1d,)
    dim = 1


@register("layer", "conv2d")
class Conv2dPlugin(ConvPlugin):
    """``nn.Conv2d`` (and subclasses)."""

    module_types = (nn.Conv2d,)
    dim = 2


@register("layer", "conv3d")
class Conv3dPlugin(ConvPlugin):
    """``nn.Conv3d`` (and subclasses)."""

    module_types = (nn.Conv3d,)
    dim = 3
