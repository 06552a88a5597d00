r"""Adam-like diagonal second moments (kind ``structure``, name ``diagonal``).

Per parameter tensor the structure keeps ``v``, of the parameter's shape, an exponential
moving average of squared gradients (``v ← ema·v + (1 − ema)·s``; the first update, without
a warm start, sets ``v = s``, so no bias correction is needed; a warm start sets the
arithmetic mean). The statistic ``s`` is, elementwise,

* ``statistics="batch"`` (default, as Adam): ``s = (1/S) Σ_s G_s²`` over the ``S`` draws'
  batch gradients ``G_s`` (each the gradient of that draw's mean loss);
* ``statistics="per_sample"``: ``s = (1/R) Σ_r g_r²`` over the ``R = S·N`` per-sample gradient
  rows ``g_r = ∂ℓ_n/∂θ`` (not divided by ``N``) — the diagonal of the empirical Fisher
  (data targets) or of the Monte-Carlo Fisher (sampled targets).

The direction for the momentum ``m`` is

    d = m / (v^power + ε),

``power = 0.5`` being Adam's ``m / (√v + ε)`` and ``power = 1`` the diagonal natural gradient
``diag(v + ε)⁻¹ m``. ``ε`` sits outside the root (Adam's placement). The damped reciprocal
``1/(v^power + ε)`` is formed when the optimizer refreshes its inverses (every
``inverse_every`` steps, and at every statistics step while ``t < inverse_every``), like every
other structure's inverses; ``inverse_every=1`` recomputes it every step, as Adam does.

Damping. The diagonal matrix ``diag(v^power)`` is a set of ``1 × 1`` blocks, and the damping
rule gets one per coordinate: with the ``constant`` rule (the default) ``ε`` is the ``damping``
hyperparameter everywhere; the ``frobenius`` rule gives ``ε = α·v^power`` per coordinate. A
coordinate whose reciprocal is not finite (``v^power + ε = 0``, possible only with ``ε = 0``)
keeps its previous value (``1`` before any), and the tensor is reported as ``kept``.

No solver is used (:meth:`Diagonal.solver_powers` is empty), so the structure works with any
solver. The structure covers every parameter, scalars included. State is float32 or wider
whatever the parameter dtype, on the parameter's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.registry import register
from curvlib.structures.base import Structure, fold

__all__ = ["Diagonal"]


@register("structure", "diagonal")
class Diagonal(Structure):
    """Diagonal second moments ``v`` and the direction ``m / (v^power + ε)``.

    Args:
        statistics: ``"batch"`` (default: squares of each draw's batch gradient, as Adam) or
            ``"per_sample"`` (mean square of the per-sample gradients: the Fisher's diagonal;
            needs a source with ``per_sample_grads`` — ``empirical``, ``gram`` or
            ``TrueFisher(per_sample=True)``).
        power: the exponent applied to ``v`` (any positive number): ``0.5`` (default) is
            Adam-like, ``1`` the diagonal natural gradient.
    """

    name = "diagonal"
    needs = frozenset({"batch_grads"})

    def __init__(self, statistics: Literal["batch", "per_sample"] = "batch",
                 power: float = 0.5):
        if statistics not in ("batch", "per_sample"):
            raise ValueError(f"statistics must be 'batch' or 'per_sample', got {statistics!r}")
        if isinstance(power, bool) or not isinstance(power, int | float) or not power > 0 \
                or power == float("inf"):
            raise ValueError(
                f"power must be a positive number (0.5: Adam-like, 1: diagonal natural "
                f"gradient), got {power!r}")
        self.statistics = statistics
        self.power = float(power)
        self.needs = frozenset({"batch_grads" if statistics == "batch" else "per_sample_grads"})

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """Every parameter, scalars included."""
        return True

    def solver_powers(self, params: list[nn.Parameter]) -> set[float]:
        """None: the reciprocal is elementwise."""
        return set()

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """Zero ``v`` and a reciprocal of ones (the identity), float32 or wider."""
        dtype = torch.promote_types(param.dtype, torch.float32)
        return {
            "diag_updates": torch.zeros((), dtype=torch.float64),
            "diag_v": torch.zeros(param.shape, dtype=dtype, device=param.device),
            "diag_inv": torch.ones(param.shape, dtype=dtype, device=param.device),
        }

    def update(self, items, stats, *, ema: float, average: bool = False) -> None:
        """Fold the mean squared gradients into ``v``.

        ``average=True`` keeps the running arithmetic mean (warm start); otherwise an EMA with
        weight ``ema`` on the past, the first update setting ``v = s``. A non-finite gradient
        leaves that parameter's ``v`` unchanged (counted in ``diag_skipped``).
        """
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        grads = stats.batch_grads() if self.statistics == "batch" else stats.per_sample_grads()
        for name, _, state in items:
            if name not in grads:
                continue
            g = grads[name]
            v = state["diag_v"]
            g = g.to(torch.promote_types(g.dtype, v.dtype))
            s = g.square().mean(0)
            if not bool(torch.isfinite(s.sum())):  # a sum of squares: finite iff every entry
                state["diag_skipped"] = state.get("diag_skipped", torch.zeros(())) + 1
                continue
            count = state["diag_updates"]
            fold(v, s, count, ema=ema, average=average)
            state["diag_updates"] = count + 1

    def refresh(self, items, *, solver: Any, damping: Callable[[Tensor], Tensor]
                ) -> dict[str, int]:
        """``1/(v^power + ε)`` per coordinate (``solver`` is not used); parameters without
        statistics keep the identity."""
        report = {"factors": 0, "recovered": 0, "kept": 0}
        for _, _, state in items:
            if state["diag_updates"] == 0:
                continue
            v, inv = state["diag_v"], state["diag_inv"]
            root = v.clamp_min(0).pow(self.power)
            eps = damping(root.reshape(-1, 1, 1)).reshape(v.shape)
            new = (root.to(torch.float64) + eps).reciprocal().to(v.dtype)
            bad = ~torch.isfinite(new)
            if bool(bad.any()):
                new = torch.where(bad, inv, new)
                report["kept"] += 1
            inv.copy_(new)
            report["factors"] += 1
        return report

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """``m ⊙ 1/(v^power + ε)`` (the vector itself before any statistics)."""
        inv = state["diag_inv"]
        return (vector.to(inv.dtype) * inv).to(vector.dtype)

    def directions(self, items, vectors: list[Tensor]) -> list[Tensor]:
        """All directions of a param group by one multi-tensor multiply."""
        if not items:
            return []
        invs = [state["diag_inv"] for _, _, state in items]
        if all(v.dtype == i.dtype and v.device == i.device
               for v, i in zip(vectors, invs, strict=True)):
            return torch._foreach_mul(vectors, invs)
        return super().directions(items, vectors)

    def curvature_blocks(self, items) -> dict[tuple[str, ...], Tensor]:
        """Per tensor ``diag(v)`` in float64, undamped (the second moments; the direction
        applies ``(v^power + ε)⁻¹``, so for ``power = 0.5`` the matrix inverted is
        ``diag(√v)``, the square root of this block). Tensors without statistics yet are
        left out."""
        return {(name,): torch.diag(state["diag_v"].reshape(-1).to(torch.float64))
                for name, _, state in items if state["diag_updates"] > 0}

    @classmethod
    def examples(cls) -> list[Structure]:
        """Adam-like (batch, power 0.5) and the diagonal natural gradient from per-sample
        gradients (power 1)."""
        return [cls(), cls(statistics="per_sample", power=1.0)]

    def __repr__(self) -> str:
        return f"Diagonal(statistics={self.statistics!r}, power={self.power})"
