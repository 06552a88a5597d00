r"""Dense float64 reference of the ``shampoo`` structure, from its definition.

Per covered tensor with (reshaped) dims ``d_1 … d_k``: mode statistics
``S_i = (1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` from each draw's batch gradient (``mat_i`` by
``movedim``/``reshape``), ``H_i`` their EMA (first update sets), preconditioners
``P_i = V diag((max(λ, 0) + ε)^{-1/p}) Vᵀ`` from ``torch.linalg.eigh(H_i) = V diag(λ) Vᵀ``
(``P_i = I`` for modes longer than ``max_dim``; ``ε`` the damping rule's value for ``H_i``:
the hyperparameter, or ``α‖H_i‖_F``), and the direction
``(P_1 ⊗ … ⊗ P_k) vec(m)`` by the dense Kronecker product (row-major ``vec``).
``p`` is the structure's ``root`` or twice the order of the reshaped tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlib.testing.reference import (
    F64,
    ReferenceStatistics,
    ReferenceStructure,
    ema_update,
    register_reference,
)
from curvlib.testing.reference.tensor_normal import tnt_dims, unfold

__all__ = ["ShampooReference", "inverse_root"]


def inverse_root(h: Tensor, eps: float, p: float) -> Tensor:
    """``(H + εI)^{-1/p}`` by ``eigh`` (negative round-off eigenvalues clipped to 0)."""
    values, vectors = torch.linalg.eigh((h + h.T) / 2)
    return vectors @ torch.diag((values.clamp_min(0) + eps) ** (-1.0 / p)) @ vectors.T


@register_reference("shampoo")
class ShampooReference(ReferenceStructure):
    """Shampoo's per-mode inverse roots applied as a dense Kronecker product."""

    def __init__(self, structure, model, names):
        super().__init__(structure, model, names)
        self.h: dict[str, list[Tensor | None]] = {}
        self.p: dict[str, list[Tensor | None]] = {}

    def _dims(self, name: str) -> tuple[int, ...]:
        return tnt_dims(tuple(self.shapes[name]), self.structure.reshape)

    def _power(self, name: str) -> float:
        root = self.structure.root
        return float(root) if root is not None else 2.0 * len(self._dims(name))

    def _factored(self, d: int) -> bool:
        return self.structure.max_dim is None or d <= self.structure.max_dim

    def _covered(self) -> list[str]:
        return [n for n in self.names if len(self.shapes[n]) >= 1]

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        batch = stats.batch()
        for name in self._covered():
            dims = self._dims(name)
            g = batch[name].to(F64).reshape(-1, *dims)
            old = self.h.get(name)
            new: list[Tensor | None] = []
            for i, d in enumerate(dims):
                if not self._factored(d):
                    new.append(None)
                    continue
                s = sum(unfold(g[j], i) @ unfold(g[j], i).T for j in range(g.shape[0]))
                s = s / g.shape[0]
                new.append(ema_update(None if old is None else old[i], s, ema))
            self.h[name] = new

    def refresh(self, damping: float) -> None:
        for name, hs in self.h.items():
            p = self._power(name)
            self.p[name] = [None if h is None else inverse_root(h, self.damp(damping, h), p)
                            for h in hs]

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        covered = set(self._covered())
        for name, vector in vectors.items():
            if name not in covered:
                continue
            m = vector.to(F64)
            roots = self.p.get(name)
            if roots is None:
                out[name] = m.clone()
                continue
            kron = torch.ones(1, 1, dtype=F64)
            for r, d in zip(roots, self._dims(name), strict=True):
                kron = torch.kron(kron, torch.eye(d, dtype=F64) if r is None else r)
            out[name] = (kron @ m.reshape(-1)).reshape(m.shape)
        return out
