r"""Layer plugins for ``nn.Linear`` and the shared base of position-summed layers.

``nn.Linear`` maps ``(N, *, D)`` to ``(N, *, O)``; every extra dimension ``*`` is a
position ``t`` whose contributions sum in the sample's gradient (a sequence, a set of
tokens): ``g_n = Σ_t z_{nt} x_{nt}ᵀ``. Several calls of one module in a forward pass add
positions. The Gram uses FNGD's Khatri–Rao identity ``(ZZᵀ) ∗ (XXᵀ)`` (extended exactly to
positions) or materialisation, whichever costs fewer multiply-adds (:mod:`._patch`); the
weighted gradient is ``(c⊙Z)ᵀX``, one matrix product; the per-sample inner products
``⟨g_n, V⟩ = Σ_t z_ntᵀ V x_nt`` (:meth:`PatchPlugin.row_dots`) are one contraction, about
``N·T·O·D`` multiply-adds, without forming any ``g_n``.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from curvlib.capture import Call
from curvlib.layers import _patch
from curvlib.layers._patch import GramMethod
from curvlib.layers.base import (
    KFACFactors,
    LayerPlugin,
    LayerPluginError,
    trainable_parameters,
    work_dtype,
)
from curvlib.registry import register

__all__ = ["LinearPlugin", "PatchPlugin"]


class PatchPlugin(LayerPlugin):
    """Base of plugins for layers ``y[n,t,g] = W_g x[n,t,g] + b_g`` (Linear, convolutions).

    Subclasses implement :meth:`patches`, :meth:`weight_gradient` and
    :meth:`bias_grad_per_sample`; everything else follows (:meth:`weight_row_dots` has a
    default from the patches that a subclass may replace by something cheaper).
    ``gram_method`` is ``"auto"`` (the cheaper of contraction and materialisation),
    ``"contract"`` or ``"materialise"``.
    """

    def __init__(self, gram_method: GramMethod = "auto"):
        _patch.choose_gram_method(gram_method, 1, 1, 1, 1, 1)  # validates the name
        self.gram_method = gram_method

    def groups(self, module: nn.Module) -> int:
        """Number of weight groups ``G``."""
        return 1

    @abc.abstractmethod
    def patches(self, module: nn.Module, call: Call) -> tuple[Tensor, Tensor]:
        """``X (N, T, G, D)`` and ``Z (N, T, G, O/G)`` of one call, in the working dtype."""

    def _all_patches(self, module: nn.Module, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
        self.check(module, calls)
        pairs = [self.patches(module, c) for c in calls]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 1)

    def per_sample_grads(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """``Σ_t z xᵀ`` for the weight and ``Σ_t z`` for the bias, per sample."""
        params = trainable_parameters(module)
        x, z = self._all_patches(module, calls)
        n = x.shape[0]
        out = {}
        if "weight" in params:
            out["weight"] = _patch.per_sample_weight(x, z).reshape(n, *module.weight.shape)
        if "bias" in params:
            out["bias"] = z.sum(1).reshape(n, -1)
        return out

    def gram(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """Weight Gram by contraction or materialisation (see ``gram_method``); bias ``Z̄Z̄ᵀ``."""
        params = trainable_parameters(module)
        x, z = self._all_patches(module, calls)
        out = {}
        n, t, g, d = x.shape
        if ("weight" in params and "bias" in params and t == 1
                and _patch.choose_gram_method(self.gram_method, n, t, g, d, z.shape[-1])
                == "contract"):
            # one position: the bias Gram Σ_g z_m·z_n is the weight contraction's Z factor
            zz, xx = _patch.one_position_grams(x, z)
            if g == 1:
                out["weight"], out["bias"] = zz * xx, zz
            else:
                out["weight"], out["bias"] = (zz * xx).sum(-1), zz.sum(-1)
            return out
        if "weight" in params:
            out["weight"] = _patch.weight_gram(x, z, self.gram_method)
        if "bias" in params:
            zb = z.sum(1).reshape(z.shape[0], -1)
            out["bias"] = zb @ zb.T
        return out

    def weighted_grads(
        self, module: nn.Module, calls: Sequence[Call], coefficients: Tensor, *,
        params: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``Σ_n c_n g_n``: the layer's own weight-gradient operation applied to ``c⊙Z``.

        With ``params`` only the named parts are computed (``{"bias"}`` skips the weight
        gradient entirely, ``{"weight"}`` the bias sum).
        """
        self.check_coefficients(module, calls, coefficients)
        params = self.selected_parameters(module, params)
        weight, bias = "weight" in params, "bias" in params
        out: dict[str, Tensor] = {}
        for call in calls:
            dtype = work_dtype(call.input, call.grad_output)  # c never promotes
            c = coefficients
            if c.dtype != dtype or c.device != call.grad_output.device:
                c = c.to(device=call.grad_output.device, dtype=dtype)
            w, b = self.weighted_call(module, call, c, weight, bias)
            if w is not None:
                out["weight"] = w if "weight" not in out else out["weight"] + w
            if b is not None:
                out["bias"] = b if "bias" not in out else out["bias"] + b
        return out

    def weighted_call(self, module: nn.Module, call: Call, c: Tensor, weight: bool,
                      bias: bool) -> tuple[Tensor | None, Tensor | None]:
        """Weight and bias parts of ``Σ_n c_n g_n`` for one call.

        ``g_n`` is bilinear in ``(x_n, z_n)``, so the weight part is the layer's weight
        gradient with either the inputs or the output gradients scaled by ``c``; the smaller
        of the two is scaled (one temporary of that size). The bias part is
        ``Σ_n c_n Σ_t z_nt``.
        """
        z, x = call.grad_output, call.input
        if z.dtype != c.dtype:
            z = z.to(c.dtype)
        if x.dtype != c.dtype:
            x = x.to(c.dtype)
        w = b = None
        if weight:
            if x.numel() <= z.numel():
                w = self.weight_gradient(module, _scale(x, c), z)
            else:
                w = self.weight_gradient(module, x, _scale(z, c))
        if bias:
            b = c @ self.bias_grad_per_sample(module, z)
        return w, b

    def row_dots(self, module: nn.Module, calls: Sequence[Call],
                 vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``⟨g_n, v⟩`` per sample without per-sample gradients: the bias part is
        ``⟨Σ_t z_nt, v_b⟩``, the weight part :meth:`weight_row_dots` (``Σ_t z_ntᵀ V x_nt``);
        several calls add up."""
        self.check_vectors(module, calls, vectors)
        out: dict[str, Tensor] = {}
        if not vectors:
            return out
        for call in calls:
            dtype = work_dtype(call.input, call.grad_output)  # v never promotes
            z = call.grad_output
            parts = {}
            if "weight" in vectors:
                v = vectors["weight"].to(device=z.device, dtype=dtype)
                parts["weight"] = self.weight_row_dots(module, call, v)
            if "bias" in vectors:
                v = vectors["bias"].to(device=z.device, dtype=dtype)
                parts["bias"] = self.bias_grad_per_sample(module, z.to(dtype)) @ v
            for name, value in parts.items():
                out[name] = value if name not in out else out[name] + value
        return out

    def weight_row_dots(self, module: nn.Module, call: Call, v: Tensor) -> Tensor:
        """``(N,)``: ``Σ_{t,g} z[n,t,g]ᵀ V_g x[n,t,g]`` for one call and a weight-shaped ``v``
        (already in the working dtype).

        The default contracts the patches with ``v``, about ``N·T·O·D`` multiply-adds: first
        ``V x`` or ``zᵀ V``, whichever leaves the smaller ``(N, T, G, ·)`` intermediate, then
        the inner products with the other side. The order is fixed so that the per-sample
        gradient ``(N, G, O, D)`` is never formed (a flop-optimal planner may form it when it
        is small). For Linear the patches are a reshape of the input; convolutions replace
        this with one forward convolution with weight ``v``.
        """
        x, z = self.patches(module, call)
        g, d, o = x.shape[2], x.shape[3], z.shape[3]
        w = v.reshape(g, o, d)
        if o <= d:
            return _patch.contract("ntgo,ntgo->n", _patch.contract("god,ntgd->ntgo", w, x), z)
        return _patch.contract("ntgd,ntgd->n", _patch.contract("ntgo,god->ntgd", z, w), x)

    @abc.abstractmethod
    def weight_gradient(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        """The layer's ordinary weight gradient for inputs ``x`` and output gradient ``z``."""

    @abc.abstractmethod
    def bias_grad_per_sample(self, module: nn.Module, z: Tensor) -> Tensor:
        """``(N, O)``: the output gradient summed over positions, per sample."""

    def mode_statistics(self, module: nn.Module, calls: Sequence[Call],
                        dims: dict[str, tuple[int, ...]],
                        modes: dict[str, list[int]] | None = None
                        ) -> dict[str, list[Tensor | None]]:
        """Rank-one fast path: with one position and one group ``g_n = z_n x_nᵀ``, so the
        modes of a matrix weight are ``(1/N) Σ_n ‖x_n‖² z_n z_nᵀ`` and
        ``(1/N) Σ_n ‖z_n‖² x_n x_nᵀ``, and a bias's ``(1/N) Σ_n z̄_n z̄_nᵀ``; anything else is
        materialised (the base class)."""
        params = trainable_parameters(module)
        x, z = self._all_patches(module, calls)
        n, t, g = x.shape[:3]
        weight = getattr(module, "weight", None)

        def want(name: str, i: int) -> bool:
            return modes is None or i in modes.get(name, range(len(dims[name])))

        fast: dict[str, list[Tensor | None]] = {}
        if ("weight" in params and "weight" in dims and t == 1 and g == 1
                and weight is not None and tuple(dims["weight"]) == tuple(weight.shape)
                and weight.dim() == 2):
            x1, z1 = x[:, 0, 0], z[:, 0, 0]
            fast["weight"] = [
                (z1 * x1.square().sum(1, keepdim=True)).T @ z1 / n
                if want("weight", 0) else None,
                (x1 * z1.square().sum(1, keepdim=True)).T @ x1 / n
                if want("weight", 1) else None,
            ]
        if "bias" in params and "bias" in dims and len(dims["bias"]) == 1:
            zb = z.sum(1).reshape(n, -1)
            fast["bias"] = [zb.T @ zb / n if want("bias", 0) else None]
        rest = {k: v for k, v in dims.items() if k not in fast and k in params}
        if rest:
            fast.update(super().mode_statistics(module, calls, rest, modes))
        return fast

    def kfac_factors(
        self, module: nn.Module, calls: Sequence[Call], *, mode: str = "expand"
    ) -> KFACFactors:
        """Input and output-gradient covariances, the bias folded into the input factor.

        ``expand`` treats every position as a sample of the factors (KFC for
        convolutions; KFAC-expand for sequences): ``A = (1/(NT)) Σ_{n,t} x̄ x̄ᵀ`` and
        ``B = (1/N) Σ_{n,t} z zᵀ``. ``reduce`` averages inputs and sums output gradients
        over positions first. With ``T = 1`` both are the classic KFAC factors, and for one
        sample ``B ⊗ A`` is exactly that sample's ``g gᵀ``.
        """
        params = trainable_parameters(module)
        weight = getattr(module, "weight", None)
        if weight is None or not params:
            raise LayerPluginError(
                f"{type(module).__name__} has no trainable weight or bias: nothing to "
                f"factorise"
            )
        x, z = self._all_patches(module, calls)
        a, b = _patch.kfac(
            x, z, fold_bias="bias" in params, has_weight="weight" in params, mode=mode
        )
        return KFACFactors(a, b, "weight" in params, "bias" in params,
                           tuple(weight.shape), mode)


@register("layer", "linear")
class LinearPlugin(PatchPlugin):
    """``nn.Linear`` (and subclasses): inputs ``(N, *, D)``, positions ``*`` summed."""

    module_types = (nn.Linear,)

    def patches(self, module: nn.Module, call: Call) -> tuple[Tensor, Tensor]:
        """Inputs and output gradients as ``(N, T, 1, D)`` and ``(N, T, 1, O)``."""
        x, z = call.input, call.grad_output
        if x.dim() < 2:
            raise LayerPluginError(
                f"Linear input of shape {tuple(x.shape)} has no batch dimension; curvlib "
                f"needs (N, *, in_features)"
            )
        dtype = work_dtype(x, z)
        n = x.shape[0]
        return (x.to(dtype).reshape(n, -1, 1, x.shape[-1]),
                z.to(dtype).reshape(n, -1, 1, z.shape[-1]))

    def gram(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """As :meth:`PatchPlugin.gram`; one call with 2-D ``X`` and ``Z`` (the usual case)
        takes the Khatri–Rao form directly when it is the chosen method:
        ``K_W = (ZZᵀ)∗(XXᵀ)``, ``K_b = ZZᵀ``."""
        if len(calls) == 1:
            call = calls[0]
            x, z = call.input, call.grad_output
            if (z is not None and x.dim() == 2 and z.dim() == 2 and x.dtype == z.dtype
                    and x.dtype in (torch.float32, torch.float64)
                    and module.weight is not None and module.weight.requires_grad
                    and module.bias is not None and module.bias.requires_grad
                    and _patch.choose_gram_method(self.gram_method, x.shape[0], 1, 1,
                                                  x.shape[1], z.shape[1]) == "contract"):
                zz = torch.mm(z, z.T)
                return {"weight": zz * torch.mm(x, x.T), "bias": zz}
        return super().gram(module, calls)

    def weight_gradient(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        """``Zᵀ X`` over all samples and positions."""
        return z.reshape(-1, z.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def weighted_call(self, module: nn.Module, call: Call, c: Tensor, weight: bool,
                      bias: bool) -> tuple[Tensor | None, Tensor | None]:
        """As :meth:`PatchPlugin.weighted_call`; with one position (2-D ``X`` and ``Z``, the
        usual case) the products are taken directly: ``Zᵀ(c⊙X)`` or ``(c⊙Z)ᵀX``, whichever
        scales the smaller matrix, and ``Zᵀc``."""
        z, x = call.grad_output, call.input
        if x.dim() != 2 or z.dim() != 2 or x.dtype != c.dtype or z.dtype != c.dtype:
            return super().weighted_call(module, call, c, weight, bias)
        w = b = None
        if weight:
            if x.shape[1] <= z.shape[1]:
                w = torch.mm(z.T, x * c.unsqueeze(1))
            else:
                w = torch.mm((z * c.unsqueeze(1)).T, x)
        if bias:
            b = torch.mv(z.T, c)
        return w, b

    def bias_grad_per_sample(self, module: nn.Module, z: Tensor) -> Tensor:
        """``Σ_t z_nt`` (``Z`` itself, no copy, with one position)."""
        if z.dim() == 2:
            return z
        return z.reshape(z.shape[0], -1, z.shape[-1]).sum(1)


def _scale(t: Tensor, c: Tensor) -> Tensor:
    """``c_n · t_n`` for every sample ``n`` (dimension 0)."""
    return t * c.reshape(-1, *([1] * (t.dim() - 1)))
