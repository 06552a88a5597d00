"""References of ``smw`` and ``coefficient_sharing``: the damped Fisher of each block solved
densely (``P_b × P_b``), and stored push-through coefficients from the definition.

Each block is damped with the ``damping`` of its param group (a block spanning groups needs
one value: :meth:`ReferenceSMW.shared_damping`), through the damping rule's reference applied
to the block's per-sample Gram ``VVᵀ``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlib.testing.reference import ReferenceStatistics, ReferenceStructure, register_reference

_REGISTERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def _flat(rows: dict[str, Tensor], names: list[str]) -> Tensor:
    """``(R, P_b)``: the rows of the block's parameters, concatenated in order."""
    return torch.cat([rows[n].reshape(rows[n].shape[0], -1) for n in names], dim=1)


def _unflat(vector: Tensor, names: list[str], shapes: dict[str, torch.Size]
            ) -> dict[str, Tensor]:
    out, start = {}, 0
    for n in names:
        size = int(torch.Size(shapes[n]).numel())
        out[n] = vector[start:start + size].reshape(shapes[n])
        start += size
    return out


@register_reference("smw")
class ReferenceSMW(ReferenceStructure):
    """``λ(F + λI)⁻¹g`` (scale ``sgd``) or ``(F + λI)⁻¹g`` (``natural``) per block, with
    ``F = VᵀV/R`` over the source's ``R`` per-sample rows ``V`` (the data's rows with data
    targets) and ``g`` the data's mean gradient; ``λ`` the damping rule's value for the Gram
    ``VVᵀ`` with the block's ``α`` (frobenius: ``α‖VVᵀ‖_F``; constant: ``α`` itself)."""

    preconditions = "batch"

    def covers(self, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
        if getattr(self.structure, "cover", "registered") == "all":
            return True
        return isinstance(owner, _REGISTERED)

    def partition(self, covered: list[str], blocks: str) -> dict[str, list[str]]:
        if blocks == "tensor":
            return {n: [n] for n in covered}
        if blocks == "model":
            return {"model": list(covered)}
        out: dict[str, list[str]] = {}
        for n in covered:
            out.setdefault(self.owners[n], []).append(n)
        return out

    def _covered(self) -> list[str]:
        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        return [n for n in self.names if self.covers(n, params[n], modules[self.owners[n]])]

    def shared_damping(self) -> list[tuple[str, ...]]:
        """Each block: one ``λ``, so one ``damping`` value, whatever the param groups."""
        inner = getattr(self.structure, "inner", self.structure)
        return [tuple(names) for names in self.partition(self._covered(), inner.blocks).values()
                if len(names) > 1]

    @staticmethod
    def _alpha(damping: float | dict[str, float], names: list[str]) -> float:
        """The block's damping hyperparameter (one value, or one per parameter name)."""
        if not isinstance(damping, dict):
            return float(damping)
        values = {float(damping[n]) for n in names}
        if len(values) != 1:
            raise ValueError(f"block {names} spans dampings {sorted(values)}")
        return values.pop()

    def _lambda(self, rows: Tensor, alpha: float) -> Tensor:
        return self.damp(alpha, rows @ rows.T).to(rows.dtype)

    def precondition(self, step, data, curvature, damping):
        inner = getattr(self.structure, "inner", self.structure)
        covered = self._covered()
        g_rows = data.rows()
        stats = curvature()
        v_rows = stats.rows()
        out = {}
        for names in self.partition(covered, inner.blocks).values():
            u = _flat(g_rows, names)
            g = u.mean(0)
            v = _flat(v_rows, names)
            lam = self._lambda(v, self._alpha(damping, names))
            if lam == 0:  # the frobenius rule with V = 0: no curvature, and g = 0 too
                d = g
            else:
                f = v.T @ v / v.shape[0]
                eye = torch.eye(f.shape[0], dtype=f.dtype)
                d = torch.linalg.solve(f + lam * eye, g)
                if inner.scale == "sgd":
                    d = lam * d
            out.update(_unflat(d, names, self.shapes))
        return out


@register_reference("coefficient_sharing")
class ReferenceSharing(ReferenceSMW):
    """Position keys ``t mod steps_per_epoch``: at a key's first use, ``smw``'s direction, and
    the coefficients ``c = λ(K + λM I)⁻¹1`` (``K = UUᵀ`` over the data's rows, ``(K + λM
    I)⁻¹1`` for the natural scale) are stored; at later uses the direction is ``Σ_m c_m g_m``
    with the stored ``c`` and that batch's per-sample gradients (refresh never again)."""

    def __init__(self, structure: Any, model: nn.Module, names: list[str]):
        super().__init__(structure, model, names)
        if structure.key != "position" or structure.steps_per_epoch is None \
                or structure.refresh_every is not None:
            raise LookupError("the sharing reference restates position keys with "
                              "steps_per_epoch and no refresh; see tests/test_fngd.py for the "
                              "other options")
        self.stored: dict[int, dict[str, Tensor]] = {}

    def precondition(self, step: int, data: ReferenceStatistics, curvature, damping):
        inner = self.structure.inner
        key = step % self.structure.steps_per_epoch
        blocks = self.partition(self._covered(), inner.blocks)
        rows = data.rows()
        if key not in self.stored:
            out = super().precondition(step, data, curvature, damping)
            coefficients = {}
            for block, names in blocks.items():
                u = _flat(rows, names)
                k = u @ u.T
                m = k.shape[0]
                lam = self._lambda(u, self._alpha(damping, names))
                if lam == 0:
                    coefficients[block] = torch.full((m,), 1.0 / m, dtype=k.dtype)
                    continue
                c = torch.linalg.solve(k + lam * m * torch.eye(m, dtype=k.dtype),
                                       torch.ones(m, dtype=k.dtype))
                coefficients[block] = lam * c if inner.scale == "sgd" else c
            self.stored[key] = coefficients
            return out
        out = {}
        for block, names in blocks.items():
            d = self.stored[key][block] @ _flat(rows, names)
            out.update(_unflat(d, names, self.shapes))
        return out
