r"""Dense float64 reference of the ``diagonal`` structure, from its definition.

Per parameter (scalars included): ``s = (1/S) Σ_s G_s²`` from each draw's batch gradient
(``statistics="batch"``) or ``s = (1/R) Σ_r g_r²`` from the ``R = S·N`` per-sample rows
(``"per_sample"``), elementwise; ``v`` their EMA (first update sets); the direction
``m / (v^power + λ)`` elementwise, with ``λ`` the damping hyperparameter and the reciprocal
taken at refresh.
"""

from __future__ import annotations

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
            self.scale[name] = 1.0 / (v.clamp_min(0) ** self.structure.power + damping)

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, vector in vectors.items():
            m = vector.to(F64)
            scale = self.scale.get(name)
            out[name] = m.clone() if scale is None else m * scale
        return out
