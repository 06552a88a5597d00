r"""The ``bilinear`` layer plugin: ``torch.nn.Bilinear`` from its inputs and output gradients.

``nn.Bilinear(I1, I2, O)`` computes ``y_o = x1ᵀ W_o x2 + b_o`` with a weight ``W`` of shape
``(O, I1, I2)``. Its inputs are ``(N, *, I1)`` and ``(N, *, I2)`` with the same leading
dimensions; every extra dimension ``*`` is a *position* ``t`` whose contributions add up in
the sample's gradient, and several calls of one module in a forward pass (weight sharing)
add positions too. With ``X1 (N, T, I1)``, ``X2 (N, T, I2)`` and the output gradients
``Z (N, T, O)`` (the gradient of the summed per-sample losses):

* per-sample gradients: ``g_n[o, i, j] = Σ_t z[n,t,o] x1[n,t,i] x2[n,t,j]`` and, for the bias,
  ``Σ_t z[n,t]``;
* Gram by contraction — a three-way Khatri–Rao identity: the gradient of sample ``n`` is
  ``Σ_t z_nt ⊗ x1_nt ⊗ x2_nt`` and the inner product of Kronecker products factorises, so
  ``(UᵀU)_{mn} = Σ_{t,s} (z_mt·z_ns)(x1_mt·x1_ns)(x2_mt·x2_ns)``: three ``NT × NT`` Gram
  matrices of the rows, their Hadamard product, and a sum over position pairs. No tensor of
  the weight's size ``O·I1·I2`` is formed;
* Gram by materialisation: the per-sample gradients, then their inner products;
* weighted gradient ``Σ_n c_n g_n``: one contraction of ``c⊙Z`` with ``X1`` and ``X2``
  (what autograd's weight gradient would be for the output gradient ``c⊙Z``);
* per-sample inner products ``⟨g_n, V⟩ = Σ_t Σ_{o,i,j} z[n,t,o] V[o,i,j] x1[n,t,i] x2[n,t,j]``
  (bias: ``⟨Σ_t z_nt, v_b⟩``): one contraction, no per-sample gradient formed;
* KFAC factors: the layer is linear in the feature ``x1 ⊗ x2``, so it gets Linear's factors
  with that feature as the input (and the bias folded in as its last coordinate).

:func:`gram_costs` counts the multiply-adds of the two Gram methods and ``gram_method="auto"``
takes the cheaper one (:func:`choose_gram_method`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import curvlib
import torch
from curvlib.capture import Call
from curvlib.layers import (
    MAX_INTERMEDIATE,
    KFACFactors,
    LayerPlugin,
    LayerPluginError,
    contract,
    pick_gram_method,
    trainable_parameters,
    work_dtype,
)
from torch import Tensor, nn

__all__ = [
    "MAX_INTERMEDIATE",
    "BilinearPlugin",
    "GramMethod",
    "choose_gram_method",
    "gram_costs",
]

GramMethod = Literal["auto", "contract", "materialise"]

#: Largest intermediate (elements) a method may build before ``auto`` prefers the other one.


def gram_costs(n: int, t: int, i1: int, i2: int, o: int) -> dict[str, int]:
    r"""Multiply-adds of the two ways to the weight Gram of ``N`` samples, ``T`` positions.

    * ``contract``: three ``(NT)²`` Gram matrices (``O``, ``I1`` and ``I2`` multiply-adds per
      entry), two Hadamard products and the sum over position pairs:
      ``(NT)² (O + I1 + I2 + 2)``;
    * ``materialise``: the per-sample gradients — an outer product of the two smallest of
      ``(O, I1, I2)`` at every position, then the contraction over positions with the third,
      ``NT (O·I1·I2 + smallest pair)`` — and their ``N × N`` inner products, ``N² O·I1·I2``.
    """
    p = o * i1 * i2
    pair = min(o * i1, o * i2, i1 * i2)
    contract = (n * t) ** 2 * (o + i1 + i2 + 2)
    materialise = n * t * (p + pair) + n * n * p
    return {"contract": contract, "materialise": materialise}


def choose_gram_method(method: str, n: int, t: int, i1: int, i2: int, o: int) -> str:
    """``"contract"`` or ``"materialise"``: the forced one, or the cheaper one for ``"auto"``.

    ``auto`` compares :func:`gram_costs`; it also avoids a method whose largest intermediate
    (``(NT)²`` for contraction, ``N·O·I1·I2`` for materialisation) exceeds
    :data:`MAX_INTERMEDIATE` elements when the other one fits.
    """
    memory = {"contract": (n * t) ** 2, "materialise": n * o * i1 * i2}
    return pick_gram_method(method, gram_costs(n, t, i1, i2, o), memory)


def _call_inputs(module: nn.Module, call: Call) -> tuple[Tensor, Tensor]:
    """The two inputs of one call: ``input1`` positional, ``input2`` positional or keyword."""
    name = type(module).__name__
    if not call.inputs or not isinstance(call.inputs[0], Tensor):
        raise LayerPluginError(
            f"{name} was called without a positional first input; curvlib reads the batch "
            f"size from the first positional argument, so call it as module(input1, input2)"
        )
    x1 = call.inputs[0]
    x2 = call.inputs[1] if len(call.inputs) > 1 else call.kwargs.get("input2")
    if not isinstance(x2, Tensor):
        raise LayerPluginError(f"{name} was called without its second input (input2)")
    return x1, x2


def _weight_row_dots(z: Tensor, v: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
    """``(N,)``: ``Σ_t Σ_{o,i,j} z[n,t,o] V[o,i,j] x1[n,t,i] x2[n,t,j]``.

    ``V`` is first contracted with the position vectors of its largest dimension (about
    ``N·T·O·I1·I2`` multiply-adds, the smallest ``(N, T, ·, ·)`` intermediate), then the
    rest; the order is fixed so that no per-sample ``(N, O, I1, I2)`` gradient is formed.
    """
    o, i1, i2 = v.shape
    if o >= max(i1, i2):
        return contract("ntij,nti,ntj->n", contract("nto,oij->ntij", z, v), x1, x2)
    if i1 >= i2:
        return contract("ntoj,nto,ntj->n", contract("nti,oij->ntoj", x1, v), z, x2)
    return contract("ntoi,nto,nti->n", contract("ntj,oij->ntoi", x2, v), z, x1)


@curvlib.register("layer", "bilinear")
class BilinearPlugin(LayerPlugin):
    """Layer plugin for ``nn.Bilinear`` (and subclasses), registered as ``bilinear``.

    Args:
        gram_method: ``"auto"`` (default: the cheaper of contraction and materialisation by
            multiply-add count, see :func:`gram_costs`), ``"contract"`` (the three-way
            Khatri–Rao identity) or ``"materialise"`` (per-sample gradients, then inner
            products).
    """

    module_types = (nn.Bilinear,)

    def __init__(self, gram_method: GramMethod = "auto"):
        choose_gram_method(gram_method, 1, 1, 1, 1, 1)  # validates the name
        self.gram_method = gram_method

    def __repr__(self) -> str:
        return f"BilinearPlugin(gram_method={self.gram_method!r})"

    def check(self, module: nn.Module, calls: Sequence[Call]) -> None:
        """Both inputs present (``input1`` positional), then the base class's checks."""
        for call in calls:
            _call_inputs(module, call)
        super().check(module, calls)

    def _operands(self, module: nn.Module, call: Call,
                  dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``X1 (N, T, I1)``, ``X2 (N, T, I2)`` and ``Z (N, T, O)`` of one call."""
        x1, x2 = _call_inputs(module, call)
        z = call.grad_output
        name = type(module).__name__
        if x1.dim() < 2:
            raise LayerPluginError(
                f"{name} input of shape {tuple(x1.shape)} has no batch dimension; curvlib "
                f"needs (N, *, in1_features) and (N, *, in2_features)"
            )
        if x1.shape[:-1] != x2.shape[:-1] or z is None or z.shape[:-1] != x1.shape[:-1]:
            z_shape = None if z is None else tuple(z.shape)
            raise LayerPluginError(
                f"{name}: inputs {tuple(x1.shape)} and {tuple(x2.shape)} and output gradient "
                f"{z_shape} must agree in every dimension but the last"
            )
        if dtype is None:
            dtype = work_dtype(x1, x2, z)
        n = x1.shape[0]
        return (x1.to(dtype).reshape(n, -1, x1.shape[-1]),
                x2.to(dtype).reshape(n, -1, x2.shape[-1]),
                z.to(dtype).reshape(n, -1, z.shape[-1]))

    def _all_operands(self, module: nn.Module, calls: Sequence[Call]
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """The operands of every call, positions of later calls appended along ``T``."""
        self.check(module, calls)
        dtype = work_dtype(*(t for c in calls for t in (*_call_inputs(module, c),
                                                        c.grad_output)))
        parts = [self._operands(module, c, dtype) for c in calls]
        if len(parts) == 1:
            return parts[0]
        x1, x2, z = zip(*parts, strict=True)
        return torch.cat(x1, 1), torch.cat(x2, 1), torch.cat(z, 1)

    def per_sample_grads(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """``g_n = Σ_t z ⊗ x1 ⊗ x2`` for the weight and ``Σ_t z`` for the bias, per sample."""
        params = trainable_parameters(module)
        x1, x2, z = self._all_operands(module, calls)
        out: dict[str, Tensor] = {}
        if "weight" in params:
            out["weight"] = contract("nto,nti,ntj->noij", z, x1, x2)
        if "bias" in params:
            out["bias"] = z.sum(1)
        return out

    def gram(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """Weight Gram by the three-way Khatri–Rao contraction or by materialisation (see
        ``gram_method``); bias Gram ``Z̄Z̄ᵀ`` with ``Z̄ = Σ_t Z``."""
        params = trainable_parameters(module)
        x1, x2, z = self._all_operands(module, calls)
        out: dict[str, Tensor] = {}
        if "weight" in params:
            out["weight"] = self._weight_gram(x1, x2, z)
        if "bias" in params:
            zb = z.sum(1)
            out["bias"] = zb @ zb.T
        return out

    def _weight_gram(self, x1: Tensor, x2: Tensor, z: Tensor) -> Tensor:
        n, t, i1 = x1.shape
        i2, o = x2.shape[-1], z.shape[-1]
        if choose_gram_method(self.gram_method, n, t, i1, i2, o) == "materialise":
            u = contract("nto,nti,ntj->noij", z, x1, x2).reshape(n, -1)
            return u @ u.T
        # (UᵀU)_{mn} = Σ_{t,s} (z_mt·z_ns)(x1_mt·x1_ns)(x2_mt·x2_ns)
        k = contract("mto,nso->mtns", z, z)
        k.mul_(contract("mti,nsi->mtns", x1, x1))
        k.mul_(contract("mtj,nsj->mtns", x2, x2))
        return k.sum((1, 3))

    def weighted_grads(
        self, module: nn.Module, calls: Sequence[Call], coefficients: Tensor, *,
        params: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``Σ_n c_n g_n``: per call, one contraction of ``c⊙Z`` with ``X1`` and ``X2``
        (only the parameters named in ``params``, when given)."""
        self.check_coefficients(module, calls, coefficients)
        params = self.selected_parameters(module, params)
        if not params:
            return {}
        n = calls[0].batch_size
        out: dict[str, Tensor] = {}
        for call in calls:
            dtype = work_dtype(*_call_inputs(module, call), call.grad_output)  # c never promotes
            x1, x2, z = self._operands(module, call, dtype)
            cz = z * coefficients.to(device=z.device, dtype=dtype).reshape(n, 1, 1)
            parts = {}
            if "weight" in params:
                parts["weight"] = contract("nto,nti,ntj->oij", cz, x1, x2)
            if "bias" in params:
                parts["bias"] = cz.sum((0, 1))
            for name, value in parts.items():
                out[name] = value if name not in out else out[name] + value
        return out

    def row_dots(self, module: nn.Module, calls: Sequence[Call],
                 vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``⟨g_n, v⟩`` per sample by contraction: ``Σ_t Σ_{o,i,j} z_nto V_oij x1_nti x2_ntj``
        for the weight, ``⟨Σ_t z_nt, v_b⟩`` for the bias; calls add up."""
        self.check_vectors(module, calls, vectors)
        out: dict[str, Tensor] = {}
        if not vectors:
            return out
        for call in calls:
            dtype = work_dtype(*_call_inputs(module, call), call.grad_output)  # v never promotes
            x1, x2, z = self._operands(module, call, dtype)
            parts = {}
            if "weight" in vectors:
                v = vectors["weight"].to(device=z.device, dtype=dtype)
                parts["weight"] = _weight_row_dots(z, v, x1, x2)
            if "bias" in vectors:
                parts["bias"] = z.sum(1) @ vectors["bias"].to(device=z.device, dtype=dtype)
            for name, value in parts.items():
                out[name] = value if name not in out else out[name] + value
        return out

    def kfac_factors(
        self, module: nn.Module, calls: Sequence[Call], *, mode: str = "expand"
    ) -> KFACFactors:
        r"""Linear's Kronecker factors with the feature ``x̄ = [x1 ⊗ x2, 1]`` as the input.

        ``expand``: ``A = (1/(NT)) Σ_{n,t} x̄ x̄ᵀ``, ``B = (1/N) Σ_{n,t} z zᵀ``; ``reduce``:
        ``A = (1/N) Σ_n x̄_n x̄_nᵀ`` with ``x̄_n = mean_t x̄`` and ``B = (1/N) Σ_n z̄_n z̄_nᵀ``
        with ``z̄_n = Σ_t z``. For one sample at one position ``B ⊗ A = g gᵀ`` exactly. The
        input factor is ``(I1·I2 + 1)²``: affordable for the small ``I1·I2`` such layers
        usually have.
        """
        if mode not in ("expand", "reduce"):
            raise ValueError(f"KFAC mode must be 'expand' or 'reduce', got {mode!r}")
        params = trainable_parameters(module)
        if not params:
            raise LayerPluginError(f"{type(module).__name__} has no trainable parameters")
        x1, x2, z = self._all_operands(module, calls)
        n, t = x1.shape[:2]
        parts = []
        if "weight" in params:
            parts.append((x1.unsqueeze(-1) * x2.unsqueeze(-2)).reshape(n, t, -1))
        if "bias" in params:
            parts.append(x1.new_ones(n, t, 1))
        xb = torch.cat(parts, -1)
        if mode == "expand":
            a = contract("ntd,nte->de", xb, xb) / (n * t)
            b = contract("nto,ntp->op", z, z) / n
        else:
            xm, zs = xb.mean(1), z.sum(1)
            a = xm.T @ xm / n
            b = zs.T @ zs / n
        return KFACFactors(a.unsqueeze(0), b.unsqueeze(0), "weight" in params,
                           "bias" in params, tuple(module.weight.shape), mode)

