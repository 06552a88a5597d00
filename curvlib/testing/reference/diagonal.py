r"""Dense float64 reference of the ``diagonal`` structure, from its definition.

Per parameter (scalars included): ``s = (1/S) Σ_s G_s²`` from each draw's batch gradient
(``statistics="batch"``) or ``s = (1/R) Σ_r g_r²`` from the ``R = S·N`` per-sample rows
(``"per_sample"``), elementwise; ``v`` their EMA (first update sets); the direction
``m / (v^power + ε)`` elementwise, the reciprocal taken at refresh, with ``ε_i`` the damping
rule's value for the ``1 × 1`` block ``[v_i^power]`` (the hyperparameter, or ``α v_i^power``);
a coordinate whose reciprocal is not finite keeps its previous one (``1`` before any).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlib.testing.reference import (
    F64,
    ReferenceStatistics,
    ReferenceStructure,
    ema_update,
    register_reference,
)

__all__ = ["DiagonalReference"]


@register_reference("diagonal")
class DiagonalReference(ReferenceStructure):
    """Elementwise second moments and ``m / (v^power + λ)``."""

    def __init__(self, structure, model, names):
        super().__init__(structure, model, names)
        self.v: dict[str, Tensor] = {}
        self.scale: dict[str, Tensor] = {}

    def covers(self, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
        """Every parameter, scalars included."""
        return True

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        grads = stats.batch() if self.structure.statistics == "batch" else stats.rows()
        for name in self.names:
            g = grads[name].to(F64)
            s = (g * g).sum(0) / g.shape[0]
            self.v[name] = ema_update(self.v.get(name), s, ema)

    def refresh(self, damping: float) -> None:
        for name, v in self.v.items():
            root = (v.clamp_min(0) ** self.structure.power).reshape(-1)
            eps = torch.stack([self.damp(damping, r.reshape(1, 1)) for r in root])
            new = (1.0 / (root + eps)).reshape(v.shape)
            old = self.scale.get(name, torch.ones_like(new))
            self.scale[name] = torch.where(torch.isfinite(new), new, old)

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, vector in vectors.items():
            m = vector.to(F64)
            scale = self.scale.get(name)
            out[name] = m.clone() if scale is None else m * scale
        return out
