r"""Dense reference of ``tensor_normal`` (TNT), from the paper's definitions.

For a tensor ``W`` seen with shape ``dims = (d_1, …, d_k)`` (order-4 convolution weights as
``(out, in, kh·kw)``, ``(out, in·kh·kw)`` or as they are, per the structure's ``reshape``):

* mode statistic ``S_i = (1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` of each draw's mean-loss gradient
  (``statistics="batch"``), or ``S_i = (1/(R·N)) Σ_r mat_i(g_r) mat_i(g_r)ᵀ`` over the
  ``R = S·N`` per-sample rows (``statistics="per_sample"``, the same scale as the batch
  statistic for zero-mean sampled gradients); ``mat_i`` puts mode ``i`` in the rows and the
  other indices, in order, in the columns;
* ``H_i = S_i`` at the first update, then ``ema·H_i + (1 − ema)·S_i``;
* eq. (5): ``Ũ_i = H_i / (c_0^{k−1} ∏_{j≠i} d_j)``, ``c_0 = (tr H / ∏_j d_j)^{1/k}``,
  ``tr H`` the mean of the factored modes' traces (equal in exact arithmetic); a zero trace
  gives ``Ũ_i = 0`` (the limit of eq. (5));
* ``(Ũ_i + ε_i I)^{-1}`` by :func:`torch.linalg.inv`, one per factored mode (modes longer than
  ``max_dim``: the identity), ``ε_i`` the damping rule's value for the *normalised* factor
  ``Ũ_i`` (``constant``: the hyperparameter; ``frobenius``: ``α‖Ũ_i‖_F``), and
  ``vec(p) = kron_i(inverse_i) vec(m)`` (row-major ``vec``) by :func:`torch.kron`.

The helpers are public so that other tests (the optimizer's end-to-end TNT reference) use
the same formulas instead of restating them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlib.testing.reference import (
    ReferenceStatistics,
    ReferenceStructure,
    ema_update,
    register_reference,
)

F64 = torch.float64

__all__ = ["TensorNormalReference", "kron_apply", "mode_statistic", "normalised",
           "tnt_dims", "unfold"]


def tnt_dims(shape: tuple[int, ...], reshape: str = "out_in_kernel") -> tuple[int, ...]:
    """The shape TNT factorises for a tensor of ``shape`` under ``reshape``."""
    shape = tuple(shape)
    if len(shape) == 4 and reshape == "out_in_kernel":
        return (shape[0], shape[1], shape[2] * shape[3])
    if len(shape) == 4 and reshape == "out_rest":
        return (shape[0], shape[1] * shape[2] * shape[3])
    return shape


def unfold(g: Tensor, i: int) -> Tensor:
    """``mat_i(g)``: ``d_i`` rows, the other indices (in order) as columns."""
    return g.movedim(i, 0).reshape(g.shape[i], -1)


def mode_statistic(draws: Tensor, i: int) -> Tensor:
    """``(1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` for draws ``(S, d_1, …, d_k)``, by a loop."""
    total = sum(unfold(g, i) @ unfold(g, i).T for g in draws)
    return total / draws.shape[0]


def normalised(hs: list[Tensor | None], dims: tuple[int, ...]) -> list[Tensor | None]:
    """Eq. (5) for the factors ``hs`` (``None`` for an unfactored mode)."""
    k = len(dims)
    trace = torch.stack([torch.trace(h) for h in hs if h is not None]).mean()
    c0 = (trace / math.prod(dims)) ** (1.0 / k)
    out = []
    for i, h in enumerate(hs):
        if h is None:
            out.append(None)
            continue
        others = math.prod(d for j, d in enumerate(dims) if j != i)
        out.append(h / (c0 ** (k - 1) * others) if c0 > 0 else torch.zeros_like(h))
    return out


def kron_apply(inverses: list[Tensor | None], m: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``kron_i(inverse_i) vec(m)`` (``None``: the identity), shaped like ``m``."""
    kron = torch.ones(1, 1, dtype=F64)
    for inv, d in zip(inverses, dims, strict=True):
        kron = torch.kron(kron, torch.eye(d, dtype=F64) if inv is None else inv)
    return (kron @ m.reshape(-1).to(F64)).reshape(m.shape)


@register_reference("tensor_normal")
class TensorNormalReference(ReferenceStructure):
    """TNT's Kronecker factors per tensor of order ≥ 1 (see the module docstring)."""

    def __init__(self, structure, model, names):
        super().__init__(structure, model, names)
        self.reshape = structure.reshape
        self.max_dim = structure.max_dim
        self.statistics = structure.statistics
        self.dims = {n: tnt_dims(s, self.reshape) for n, s in self.shapes.items()}
        self.H: dict[str, list[Tensor | None]] = {}
        self.inv: dict[str, list[Tensor | None]] = {}

    def _factored(self, name: str) -> list[bool]:
        return [self.max_dim is None or d <= self.max_dim for d in self.dims[name]]

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        grads = stats.batch() if self.statistics == "batch" else stats.rows()
        for name in self.names:
            if len(self.shapes[name]) == 0:
                continue
            dims = self.dims[name]
            g = grads[name].reshape(-1, *dims)
            # per-sample rows: (1/R) Σ_r …, then 1/N for the batch statistic's scale
            scale = 1.0 if self.statistics == "batch" else 1.0 / stats.batch_size
            new = [mode_statistic(g, i) * scale if on else None
                   for i, on in enumerate(self._factored(name))]
            old = self.H.get(name)
            self.H[name] = [None if s is None else
                            ema_update(None if old is None else old[i], s, ema)
                            for i, s in enumerate(new)]

    def refresh(self, damping: float) -> None:
        for name, hs in self.H.items():
            if all(h is None for h in hs):
                continue
            us = normalised(hs, self.dims[name])
            self.inv[name] = [None if u is None else
                              torch.linalg.inv(u + self.damp(damping, u)
                                               * torch.eye(u.shape[0], dtype=F64))
                              for u in us]

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, v in vectors.items():
            if name in self.inv:
                out[name] = kron_apply(self.inv[name], v.reshape(self.dims[name]),
                                       self.dims[name]).reshape(v.shape)
            else:
                out[name] = v.to(F64).clone()
        return out
