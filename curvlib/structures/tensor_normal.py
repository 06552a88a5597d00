r"""The tensor-normal Kronecker structure of TNT (kind ``structure``, name ``tensor_normal``).

For a parameter tensor ``W`` of shape ``d_1 × … × d_k`` (after the reshape policy), TNT
models the sampled gradient ``G`` as tensor-normal, so that its Fisher block is
``U_1 ⊗ … ⊗ U_k``. Per mode ``i`` the statistic is ``S_i = mat_i(G) mat_i(G)ᵀ``
(``mat_i`` unfolds mode ``i`` into rows), averaged over the ``S`` draws and kept as an
exponential moving average ``H_i ← ema·H_i + (1 − ema)·S_i`` (the first update, without a warm
start, sets ``H_i = S_i``; a warm start sets ``H_i`` to the arithmetic mean over a pass of
data). The factors are normalised by the paper's eq. (5),

    Ũ_i = H_i / (c_0^{k−1} ∏_{j≠i} d_j),    c_0 = (tr H / ∏_j d_j)^{1/k},

so that every ``Ũ_i`` has mean eigenvalue ``c_0`` and ``∏_i tr Ũ_i = tr H`` (``tr H`` is the
same for every mode in exact arithmetic; the mean over the modes is used). The damping ``ε``
is added to each normalised factor and the solver inverts ``Ũ_i + εI``; the direction is the
mode product ``p = m ×_1 (Ũ_1 + εI)^{-1} ×_2 … ×_k (Ũ_k + εI)^{-1}``, i.e.
``vec(p) = ((Ũ_1 + εI)^{-1} ⊗ … ⊗ (Ũ_k + εI)^{-1}) vec(m)`` with row-major ``vec``.

Options:

* ``reshape``: how order-4 convolution weights ``(out, in, kh, kw)`` are seen:
  ``"out_in_kernel"`` (default, three factors: output channels, input channels, kernel),
  ``"out_rest"`` (two factors: ``out × in·kh·kw``) or ``"as_is"`` (one factor per dimension).
  Other tensors are taken as they are (a bias is order 1 with one full factor).
* ``max_dim``: modes longer than this get no factor (identity), as Shampoo does for very large
  dimensions; ``None`` (default) factors every mode.
* ``statistics``: ``"batch"`` (default, the paper) builds ``S_i`` from the batch-averaged
  gradient ``Ḡ``; ``"per_sample"`` (beyond the paper) from the per-sample gradients,
  ``S_i = (1/(R·N)) Σ_r mat_i(g_r) mat_i(g_r)ᵀ`` over the ``R = S·N`` rows — the same scale as
  ``E[mat_i(Ḡ) mat_i(Ḡ)ᵀ]`` when the sampled gradients have zero mean (so ``ε`` means the
  same), but from ``N`` times as many outer products. It needs a source with per-sample
  gradients (``TrueFisher(per_sample=True)``); Linear layers compute it without
  materialising them (``Σ_n ‖x_n‖² z_n z_nᵀ`` and ``Σ_n ‖z_n‖² x_n x_nᵀ``).

All contractions are opt_einsum expressions planned once per shape; the factors are kept in
float32 or wider whatever the parameter dtype; factors of equal size across all parameters of
a param group are inverted in one batched solver call.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.layers._patch import contract
from curvlib.registry import register
from curvlib.solvers import Solver, robust_inverse
from curvlib.structures.base import Structure, fold

__all__ = [
    "TensorNormal",
    "mode_product",
    "mode_statistics",
    "normalisation_scales",
    "normalise",
    "reshaped_dims",
]

Reshape = Literal["out_in_kernel", "out_rest", "as_is"]
_LETTERS = string.ascii_lowercase


def reshaped_dims(shape: torch.Size | tuple[int, ...], reshape: Reshape) -> tuple[int, ...]:
    """The tensor shape a per-mode structure factorises for a parameter of ``shape``: order-4
    (convolution) weights ``(out, in, kh, kw)`` become ``(out, in, kh·kw)``
    (``"out_in_kernel"``) or ``(out, in·kh·kw)`` (``"out_rest"``), or stay (``"as_is"``);
    other tensors are taken as they are."""
    shape = tuple(shape)
    if len(shape) == 4 and reshape != "as_is":
        out, inp, kh, kw = shape
        return (out, inp, kh * kw) if reshape == "out_in_kernel" else (out, inp * kh * kw)
    return shape


def mode_statistics(g: Tensor, modes: list[int] | None = None) -> list[Tensor]:
    """``(1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` for each mode ``i`` in ``modes`` (default: all),
    for draws ``g`` of shape ``(S, d_1, …, d_k)``.

    One draw of a vector is an outer product and of a matrix two ``mm`` calls (``G Gᵀ`` and
    ``Gᵀ G``, no copy); other cases are planned opt_einsum contractions.
    """
    s, k = g.shape[0], g.dim() - 1
    letters = _LETTERS[:k]
    out = []
    for i in range(k) if modes is None else modes:
        if s == 1 and k == 1:
            out.append(torch.outer(g[0], g[0]))
        elif s == 1 and k == 2:
            m = g[0]
            out.append(m @ m.T if i == 0 else m.T @ m)
        else:
            left = "z" + letters
            right = "z" + letters[:i] + letters[i].upper() + letters[i + 1:]
            out.append(contract(f"{left},{right}->{letters[i]}{letters[i].upper()}", g, g) / s)
    return out


def mode_product(m: Tensor, factors: list[Tensor | None]) -> Tensor:
    """``m ×_1 F_1 ×_2 … ×_k F_k`` for ``m`` of order ``k`` (``None``: the identity).

    ``mv``/``mm`` for vectors and matrices, one planned opt_einsum contraction otherwise;
    ``vec`` of the result is ``(F_1 ⊗ … ⊗ F_k) vec(m)`` (row-major).
    """
    k = m.dim()
    if k == 1:
        return m if factors[0] is None else factors[0] @ m
    if k == 2:
        out = m if factors[0] is None else factors[0] @ m
        return out if factors[1] is None else out @ factors[1].T
    letters = _LETTERS[:k]
    operands = [m]
    result = list(letters)
    terms = [letters]
    for i, f in enumerate(factors):
        if f is None:
            continue
        result[i] = letters[i].upper()
        terms.append(letters[i].upper() + letters[i])
        operands.append(f)
    if len(operands) == 1:
        return m
    return contract(",".join(terms) + "->" + "".join(result), *operands)


def normalisation_scales(factors: list[Tensor | None], dims: tuple[int, ...]
                         ) -> list[Tensor | None]:
    """The scalars ``1 / (c_0^{k−1} ∏_{j≠i} d_j)`` of eq. (5) (``None`` where no factor)."""
    k = len(dims)
    traces = [torch.diagonal(f).sum() for f in factors if f is not None]
    total = torch.stack(traces).mean()
    c0 = (total / math.prod(dims)).clamp_min(0).pow(1.0 / k)
    out = []
    for i, f in enumerate(factors):
        if f is None:
            out.append(None)
            continue
        others = math.prod(d for j, d in enumerate(dims) if j != i)
        out.append(1.0 / (c0.pow(k - 1) * others).clamp_min(torch.finfo(f.dtype).tiny))
    return out


def normalise(factors: list[Tensor | None], dims: tuple[int, ...]) -> list[Tensor | None]:
    """TNT's eq. (5): ``Ũ_i = H_i / (c_0^{k−1} ∏_{j≠i} d_j)`` with ``c_0`` from the traces.

    ``factors`` holds ``H_i`` for every mode of ``dims`` (``None`` for a mode without a
    factor, whose trace is not needed).
    """
    scales = normalisation_scales(factors, dims)
    return [None if f is None else f * c for f, c in zip(factors, scales, strict=True)]


@register("structure", "tensor_normal")
class TensorNormal(Structure):
    """TNT's tensor-normal Kronecker factors, one set per parameter tensor (see the module)."""

    name = "tensor_normal"
    needs = frozenset({"batch_grads"})

    def __init__(self, reshape: Reshape = "out_in_kernel", max_dim: int | None = None,
                 statistics: Literal["batch", "per_sample"] = "batch"):
        if statistics not in ("batch", "per_sample"):
            raise ValueError(f"statistics must be 'batch' or 'per_sample', got {statistics!r}")
        self.statistics = statistics
        self.needs = frozenset({"batch_grads" if statistics == "batch" else "per_sample_grads"})
        if reshape not in ("out_in_kernel", "out_rest", "as_is"):
            raise ValueError(
                f"reshape must be 'out_in_kernel', 'out_rest' or 'as_is', got {reshape!r}")
        if max_dim is not None and max_dim < 1:
            raise ValueError(f"max_dim must be positive or None, got {max_dim}")
        self.reshape = reshape
        self.max_dim = max_dim

    def dims(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The tensor shape TNT factorises for a parameter of ``shape``
        (:func:`reshaped_dims`)."""
        return reshaped_dims(shape, self.reshape)

    @classmethod
    def examples(cls) -> list[Structure]:
        """The paper's configuration, and two factors per conv weight from per-sample
        statistics."""
        return [cls(), cls(reshape="out_rest", statistics="per_sample")]

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """Every tensor of order ≥ 1 (scalars fall back to the optimizer's default)."""
        return param.dim() >= 1

    def _factored(self, dims: tuple[int, ...]) -> list[bool]:
        return [self.max_dim is None or d <= self.max_dim for d in dims]

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """Zero statistics ``H_i`` and identity inverses, in float32 or wider."""
        dims = self.dims(param.shape)
        dtype = torch.promote_types(param.dtype, torch.float32)
        state: dict[str, Any] = {"tnt_updates": torch.zeros((), dtype=torch.float64)}
        for i, (d, on) in enumerate(zip(dims, self._factored(dims), strict=True)):
            if on:
                state[f"tnt_H{i}"] = torch.zeros(d, d, dtype=dtype, device=param.device)
                state[f"tnt_inv{i}"] = torch.eye(d, dtype=dtype, device=param.device)
        return state

    def update(self, items, stats, *, ema: float, average: bool = False) -> None:
        """Fold the batch-averaged sampled gradients into the mode statistics.

        ``average=True`` keeps a running arithmetic mean (the warm start); otherwise an
        EMA with weight ``ema`` on the past, except that the first update sets ``H_i = S_i``.
        A non-finite gradient leaves that parameter's statistics unchanged.
        """
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if self.statistics == "per_sample":
            wanted = {name: self.dims(param.shape) for name, param, _ in items}
            factored = {name: [i for i, f in enumerate(self._factored(d)) if f]
                        for name, d in wanted.items()}
            per_sample = stats.mode_statistics(wanted, factored)
            scale = 1.0 / stats.batch_size
        else:
            batch = stats.batch_grads()
        for name, param, state in items:
            dims = self.dims(param.shape)
            modes = [i for i, f in enumerate(self._factored(dims)) if f]
            if self.statistics == "per_sample":
                if name not in per_sample:
                    continue
                new = [per_sample[name][i] * scale for i in modes]
            else:
                if name not in batch:
                    continue
                g = batch[name]
                g = g.to(torch.promote_types(g.dtype, torch.float32))
                new = mode_statistics(g.reshape(g.shape[0], *dims), modes)
            # |S_ab| ≤ √(S_aa S_bb): finite traces mean finite statistics (one sync, O(Σ d_i))
            if new and not bool(torch.isfinite(torch.stack([m.diagonal().sum()
                                                             for m in new])).all()):
                state["tnt_skipped"] = state.get("tnt_skipped", torch.zeros(())) + 1
                continue
            count = state["tnt_updates"]
            for i, s in zip(modes, new, strict=True):
                fold(state[f"tnt_H{i}"], s, count, ema=ema, average=average)
            state["tnt_updates"] = count + 1

    def refresh(self, items, *, solver: Solver, damping: Callable[[Tensor], Tensor]
                ) -> dict[str, int]:
        """Normalise every factor, add the damping, invert equal sizes in one batched call."""
        groups: dict[tuple[int, torch.dtype, torch.device],
                     list[tuple[dict, int, Tensor, Tensor]]] = {}
        for _, param, state in items:
            if state["tnt_updates"] == 0:
                continue  # no statistics yet: keep the identity
            dims = self.dims(param.shape)
            on = self._factored(dims)
            if not any(on):
                continue  # every mode longer than max_dim: nothing to invert
            hs = [state[f"tnt_H{i}"] if f else None for i, f in enumerate(on)]
            for i, (h, c) in enumerate(zip(hs, normalisation_scales(hs, dims), strict=True)):
                if h is not None:
                    groups.setdefault((h.shape[0], h.dtype, h.device), []).append(
                        (state, i, h, c))
        report = {"factors": 0, "recovered": 0, "kept": 0}
        for entries in groups.values():
            mats = torch.stack([h for _, _, h, _ in entries])  # one copy, normalised in place
            mats.mul_(torch.stack([c for _, _, _, c in entries]).reshape(-1, 1, 1))

            def previous(entries=entries) -> Tensor:
                return torch.stack([st[f"tnt_inv{i}"] for st, i, _, _ in entries])

            result = robust_inverse(solver, mats, damping(mats), 1.0, previous)
            for j, (st, i, _, _) in enumerate(entries):
                st[f"tnt_inv{i}"].copy_(result.inverse[j])
            report["factors"] += len(entries)
            report["recovered"] += int(result.recovered.sum())
            report["kept"] += int(result.kept.sum())
        return report

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """``m ×_1 inv_1 ×_2 … ×_k inv_k``: ``mv``/``mm`` for vectors and matrices, one
        planned opt_einsum contraction for higher orders."""
        dims = self.dims(param.shape)
        inverses = [state.get(f"tnt_inv{i}") for i in range(len(dims))]
        dtype = next((t.dtype for t in inverses if t is not None), vector.dtype)
        out = mode_product(vector.to(dtype).reshape(dims), inverses)
        return out.reshape(param.shape).to(vector.dtype)

    def curvature_blocks(self, items) -> dict[tuple[str, ...], Tensor]:
        r"""Per tensor, the undamped Kronecker block ``Ũ_1 ⊗ … ⊗ Ũ_k`` (eq. (5)), float64.

        Rows and columns are the tensor flattened row-major (its reshape to ``dims`` does
        not change that order). A mode without a factor (longer than ``max_dim``) enters as
        ``c_0 I``: it is what eq. (5) makes of that mode's statistic replaced by its isotropic
        part ``(tr H / d_i) I`` — the one choice that keeps every factor's mean eigenvalue
        ``c_0`` and ``tr(⊗_i Ũ_i) = tr H`` — while the direction uses the identity there
        (the mode is left unpreconditioned, as Shampoo does). Tensors without statistics yet,
        or with every mode unfactored (no trace is kept), are left out.
        """
        out: dict[tuple[str, ...], Tensor] = {}
        for name, param, state in items:
            if "tnt_updates" not in state or state["tnt_updates"] == 0:
                continue
            dims = self.dims(param.shape)
            on = self._factored(dims)
            if not any(on):
                continue
            hs = [state[f"tnt_H{i}"].to(torch.float64) if f else None
                  for i, f in enumerate(on)]
            us = normalise(hs, dims)
            trace = torch.stack([torch.diagonal(h).sum() for h in hs if h is not None]).mean()
            c0 = (trace / math.prod(dims)).clamp_min(0).pow(1.0 / len(dims))
            block = torch.ones(1, 1, dtype=torch.float64, device=param.device)
            for u, d in zip(us, dims, strict=True):
                if u is None:
                    u = c0 * torch.eye(d, dtype=torch.float64, device=param.device)
                block = torch.kron(block, u)
            out[(name,)] = block
        return out

    def __repr__(self) -> str:
        return (f"TensorNormal(reshape={self.reshape!r}, max_dim={self.max_dim}, "
                f"statistics={self.statistics!r})")
