r"""Shampoo's per-mode inverse-root preconditioner (kind ``structure``, name ``shampoo``).

For a parameter tensor ``W`` of shape ``d_1 × … × d_k`` (after the reshape policy), Shampoo
(Gupta, Koren & Singer, 2018) keeps one statistic per mode,

    S_i = (1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ,

from the ``S`` draws' batch gradients ``G_s`` (``mat_i`` unfolds mode ``i`` into rows), as an
exponential moving average ``H_i ← ema·H_i + (1 − ema)·S_i`` (the first update, without a warm
start, sets ``H_i = S_i``; a warm start sets the arithmetic mean). Unlike TNT nothing is
normalised. The preconditioner of mode ``i`` is the damped inverse ``p``-th root

    P_i = (H_i + εI)^{-1/p},      p = 2k by default (``root`` sets it),

and the direction for the momentum ``m`` is the mode product
``m ×_1 P_1 ×_2 … ×_k P_k``, i.e. ``vec(d) = (P_1 ⊗ … ⊗ P_k) vec(m)`` with row-major ``vec``.

``k`` is the order of the (reshaped) tensor, *including* modes longer than ``max_dim``, which
get no factor (``P_i = I``): a factored mode's root does not change when another mode is left
unfactored. ``ε`` comes from the damping rule, one per ``H_i`` (the ``constant`` rule: the
``damping`` hyperparameter).

The implied curvature. Without damping the preconditioner is ``C^{-1/2}`` for
``C = ⊗_i H_i^{2/p}`` (for ``p = 2k``: ``⊗_i H_i^{1/k}``), the Kronecker stand-in for the
second-moment matrix ``E[vec(G) vec(G)ᵀ]`` that full-matrix AdaGrad would take the inverse
square root of; the Shampoo paper's analysis compares ``⊗_i H_i^{1/k}`` with that matrix.
:meth:`Shampoo.curvature_blocks` returns ``C``, so it can be compared with the exact block
of the same scale.

Inverse roots go through the solver, batched per ``(size, p)``: ``eigh`` (any ``p``) and
``newton`` (integer ``p``) compute them; ``cholesky`` (inverses only) is refused when the
optimizer is assembled. State is float32 or wider whatever the parameter dtype, on the
parameter's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.registry import register
from curvlib.solvers import Solver, robust_inverse
from curvlib.structures.base import Structure, fold
from curvlib.structures.tensor_normal import mode_product, mode_statistics, reshaped_dims

__all__ = ["Shampoo", "mode_product"]

Reshape = Literal["out_in_kernel", "out_rest", "as_is"]


@register("structure", "shampoo")
class Shampoo(Structure):
    """Shampoo: per-mode statistics ``H_i`` and preconditioners ``(H_i + εI)^{-1/p}``.

    Args:
        reshape: how order-4 (convolution) weights ``(out, in, kh, kw)`` are seen:
            ``"as_is"`` (default: one mode per dimension, as in the Shampoo paper),
            ``"out_in_kernel"`` (``out × in × kh·kw``) or ``"out_rest"``
            (``out × in·kh·kw``). Other tensors are taken as they are.
        max_dim: modes longer than this get no factor (the identity); ``None`` (default)
            factors every mode.
        root: the power ``p`` of every preconditioner ``(H_i + εI)^{-1/p}`` (any positive
            number; the ``newton`` solver needs an integer). ``None`` (default): ``p = 2k``
            with ``k`` the order of the reshaped tensor, as in the paper.
    """

    name = "shampoo"
    needs = frozenset({"batch_grads"})

    def __init__(self, reshape: Reshape = "as_is", max_dim: int | None = None,
                 root: float | None = None):
        if reshape not in ("out_in_kernel", "out_rest", "as_is"):
            raise ValueError(
                f"reshape must be 'out_in_kernel', 'out_rest' or 'as_is', got {reshape!r}")
        if max_dim is not None and (isinstance(max_dim, bool) or not isinstance(max_dim, int)
                                    or max_dim < 1):
            raise ValueError(f"max_dim must be a positive integer or None, got {max_dim!r}")
        if root is not None:
            if isinstance(root, bool) or not isinstance(root, int | float) or not root > 0 \
                    or root == float("inf"):
                raise ValueError(
                    f"root must be a positive number (the p of (H + εI)^(-1/p)) or None for "
                    f"p = 2·order, got {root!r}")
            root = float(root)
        self.reshape = reshape
        self.max_dim = max_dim
        self.root = root

    # -- shapes and powers ----------------------------------------------------------------------

    def dims(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The tensor shape Shampoo factorises for a parameter of ``shape``
        (:func:`~curvlib.structures.tensor_normal.reshaped_dims`)."""
        return reshaped_dims(shape, self.reshape)

    def power(self, shape: torch.Size | tuple[int, ...]) -> float:
        """``p`` for a parameter of ``shape``: ``root`` if set, else twice the order of the
        reshaped tensor (unfactored modes count)."""
        return self.root if self.root is not None else 2.0 * len(self.dims(shape))

    def _factored(self, dims: tuple[int, ...]) -> list[bool]:
        return [self.max_dim is None or d <= self.max_dim for d in dims]

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """Every tensor of order ≥ 1 (scalars fall back to the optimizer's default)."""
        return param.dim() >= 1

    def solver_powers(self, params: list[nn.Parameter]) -> set[float]:
        """The ``p`` of every covered parameter with at least one factored mode."""
        return {self.power(p.shape) for p in params
                if self.covers(p) and any(self._factored(self.dims(p.shape)))}

    # -- state ------------------------------------------------------------------------------------

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """Zero statistics ``H_i`` and identity preconditioners, float32 or wider, on the
        parameter's device."""
        dims = self.dims(param.shape)
        dtype = torch.promote_types(param.dtype, torch.float32)
        state: dict[str, Any] = {"shampoo_updates": torch.zeros((), dtype=torch.float64)}
        for i, (d, on) in enumerate(zip(dims, self._factored(dims), strict=True)):
            if on:
                state[f"shampoo_H{i}"] = torch.zeros(d, d, dtype=dtype, device=param.device)
                state[f"shampoo_P{i}"] = torch.eye(d, dtype=dtype, device=param.device)
        return state

    def update(self, items, stats, *, ema: float, average: bool = False) -> None:
        """Fold the draws' batch gradients into the mode statistics.

        ``average=True`` keeps the running arithmetic mean (warm start); otherwise an EMA with
        weight ``ema`` on the past, the first update setting ``H_i = S_i``. A non-finite
        gradient leaves that parameter's statistics unchanged (counted in
        ``shampoo_skipped``).
        """
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        batch = stats.batch_grads()
        for name, param, state in items:
            if name not in batch:
                continue
            dims = self.dims(param.shape)
            modes = [i for i, f in enumerate(self._factored(dims)) if f]
            if not modes:
                continue
            g = batch[name]
            g = g.to(torch.promote_types(g.dtype, torch.float32))
            new = mode_statistics(g.reshape(g.shape[0], *dims), modes)
            # |S_ab| ≤ √(S_aa S_bb): finite traces mean finite statistics
            if not bool(torch.isfinite(torch.stack([s.diagonal().sum() for s in new])).all()):
                state["shampoo_skipped"] = state.get("shampoo_skipped", torch.zeros(())) + 1
                continue
            count = state["shampoo_updates"]
            for i, s in zip(modes, new, strict=True):
                fold(state[f"shampoo_H{i}"], s, count, ema=ema, average=average)
            state["shampoo_updates"] = count + 1

    def refresh(self, items, *, solver: Solver, damping: Callable[[Tensor], Tensor]
                ) -> dict[str, int]:
        """``P_i = (H_i + εI)^{-1/p}`` for every factor, one solver call per
        ``(size, p, dtype, device)``; parameters without statistics keep the identity."""
        groups: dict[tuple, list[tuple[dict, int]]] = {}
        for _, param, state in items:
            if state["shampoo_updates"] == 0:
                continue
            dims = self.dims(param.shape)
            p = self.power(param.shape)
            for i, on in enumerate(self._factored(dims)):
                if on:
                    h = state[f"shampoo_H{i}"]
                    groups.setdefault((h.shape[0], p, h.dtype, h.device), []).append((state, i))
        report = {"factors": 0, "recovered": 0, "kept": 0}
        for (_, p, _, _), entries in groups.items():
            mats = torch.stack([st[f"shampoo_H{i}"] for st, i in entries])

            def previous(entries=entries) -> Tensor:
                return torch.stack([st[f"shampoo_P{i}"] for st, i in entries])

            result = robust_inverse(solver, mats, damping(mats), p, previous)
            for j, (st, i) in enumerate(entries):
                st[f"shampoo_P{i}"].copy_(result.inverse[j])
            report["factors"] += len(entries)
            report["recovered"] += int(result.recovered.sum())
            report["kept"] += int(result.kept.sum())
        return report

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """``m ×_1 P_1 ×_2 … ×_k P_k`` (the identity before any statistics)."""
        dims = self.dims(param.shape)
        roots = [state.get(f"shampoo_P{i}") for i in range(len(dims))]
        dtype = next((t.dtype for t in roots if t is not None), vector.dtype)
        out = mode_product(vector.to(dtype).reshape(dims), roots)
        return out.reshape(param.shape).to(vector.dtype)

    def curvature_blocks(self, items) -> dict[tuple[str, ...], Tensor]:
        """Per tensor, ``C = ⊗_i H_i^{2/p}`` in float64, undamped: without damping the
        direction is ``C^{-1/2} vec(m)``. A mode without a factor (longer than ``max_dim``)
        enters as the identity, as it does in the direction. Rows and columns are the tensor
        flattened row-major; tensors without statistics yet are left out."""
        out: dict[tuple[str, ...], Tensor] = {}
        for name, param, state in items:
            if state["shampoo_updates"] == 0:
                continue
            dims = self.dims(param.shape)
            p = self.power(param.shape)
            block = torch.ones(1, 1, dtype=torch.float64, device=param.device)
            for i, d in enumerate(dims):
                h = state.get(f"shampoo_H{i}")
                if h is None:
                    factor = torch.eye(d, dtype=torch.float64, device=param.device)
                else:
                    h = h.to(torch.float64)
                    values, vectors = torch.linalg.eigh((h + h.T) / 2)
                    factor = (vectors * values.clamp_min(0).pow(2.0 / p)) @ vectors.T
                block = torch.kron(block, factor)
            out[(name,)] = block
        return out

    @classmethod
    def examples(cls) -> list[Structure]:
        """The default (``p = 2k``) and ``root=2`` (``(H + εI)^{-1/2}`` per mode)."""
        return [cls(), cls(root=2)]

    def __repr__(self) -> str:
        return f"Shampoo(reshape={self.reshape!r}, max_dim={self.max_dim}, root={self.root})"
