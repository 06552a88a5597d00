r"""Dense reference of ``dense``: the Fisher block itself, inverted by ``torch.linalg.inv``.

Blocks: with ``blocks="layer"`` the optimized parameters a module owns directly, together
(parameters of the root module alone); with ``blocks="tensor"`` every tensor alone. Rows and
columns: each member flattened row-major, concatenated in model order. Per block ``b``:

* ``statistics="per_sample"``: ``S_b = (1/R) Σ_r g_{r,b} g_{r,b}ᵀ`` over the ``R = S·N``
  per-sample gradient rows of :meth:`ReferenceStatistics.rows` (the MC Fisher with sampled
  targets, the empirical Fisher with the data's);
* ``statistics="batch"``: ``S_b = (1/S) Σ_s ḡ_{s,b} ḡ_{s,b}ᵀ`` from each draw's mean-loss
  gradient (:meth:`ReferenceStatistics.batch`);
* ``F_b = S_b`` at the first update, then ``ema·F_b + (1 − ema)·S_b``;
* the direction ``(F_b + λI)^{-1} [vec m_1; …; vec m_k]`` with :func:`torch.linalg.inv`
  (``λ`` the damping rule's value for ``F_b``: the hyperparameter, or ``α‖F_b‖_F``), a
  member without a vector counting as zero; the vector itself before the first refresh.

With ``blocks="layer"`` a module's parameters must share one param group
(:meth:`DenseReference.together`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlib.testing.reference import (
    ReferenceStatistics,
    ReferenceStructure,
    ema_update,
    register_reference,
)

F64 = torch.float64

__all__ = ["DenseReference", "dense_blocks"]


def dense_blocks(names: list[str], owners: dict[str, str], blocks: str
                 ) -> list[tuple[str, ...]]:
    """The blocks of ``names`` (model order): per owning module (root: per tensor) or per
    tensor."""
    out: dict[str, list[str]] = {}
    for name in names:
        owner = owners[name]
        key = f"module:{owner}" if blocks == "layer" and owner else f"tensor:{name}"
        out.setdefault(key, []).append(name)
    return [tuple(members) for members in out.values()]


@register_reference("dense")
class DenseReference(ReferenceStructure):
    """The block Fisher (MC, empirical or batch outer product) per layer or per tensor."""

    def __init__(self, structure, model, names):
        super().__init__(structure, model, names)
        self.statistics = structure.statistics
        self.blocks = dense_blocks(self.names, self.owners, structure.blocks)
        self.F: dict[tuple[str, ...], Tensor] = {}
        self.inv: dict[tuple[str, ...], Tensor] = {}

    def covers(self, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
        """Every optimized tensor, scalars included."""
        return True

    def together(self) -> list[tuple[str, ...]]:
        """The blocks of several tensors (a module's, with ``blocks="layer"``)."""
        return [block for block in self.blocks if len(block) > 1]

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        grads = stats.rows() if self.statistics == "per_sample" else stats.batch()
        for block in self.blocks:
            g = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in block], dim=1)
            s = sum(torch.outer(row, row) for row in g) / g.shape[0]
            self.F[block] = ema_update(self.F.get(block), s, ema)

    def refresh(self, damping: float) -> None:
        for block, f in self.F.items():
            lam = self.damp(damping, f)
            self.inv[block] = torch.linalg.inv(f + lam * torch.eye(f.shape[0], dtype=F64))

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {n: v.to(F64).clone() for n, v in vectors.items()}
        for block, inv in self.inv.items():
            present = [n for n in block if n in vectors]
            if not present:
                continue
            v = torch.cat([vectors[n].reshape(-1).to(F64) if n in vectors
                           else torch.zeros(self.shapes[n].numel(), dtype=F64)
                           for n in block])
            d, start = inv @ v, 0
            for n in block:
                size = self.shapes[n].numel()
                if n in vectors:
                    out[n] = d[start:start + size].reshape(self.shapes[n])
                start += size
        return out
