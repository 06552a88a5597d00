r"""``smw``: the damped empirical (or sampled) Fisher of a block through its per-sample Gram.

For a block (by default a layer: its weight and bias together) with per-sample gradients
``U = [g_1 … g_M]`` and mini-batch gradient ``g = U1/M``, the damped natural gradient is, by
the push-through identity ``(λI + UUᵀ/M)⁻¹U = U(λI + UᵀU/M)⁻¹``,

    (λI + UUᵀ/M)⁻¹ g = U c,      c = (K + λM I)⁻¹ 1,      K = UᵀU,

one ``M × M`` solve against the all-ones vector (FNGD eqs. 7–9 simplify to this), and ``U c``
is the layer plugins' weighted gradient ``Σ_m c_m g_m`` — per-sample gradients are never
formed for registered layers.

Scales (``scale=``):

* ``"sgd"`` (default, FNGD Section IV-D): the factor ``1/λ`` is folded into the learning rate:
  the direction is ``λ (λI + UUᵀ/M)⁻¹ g = U c`` with ``c = λ (K + λM I)⁻¹ 1``, which tends to
  ``1/M`` — plain SGD — as ``λ`` grows, so SGD learning rates apply;
* ``"natural"``: the damped natural gradient itself, ``c = (K + λM I)⁻¹ 1``.

Damping: with the ``frobenius`` rule (the default), ``λ = α‖K‖_F`` per block, ``α`` the param
group's ``damping`` (FNGD eq. 14); with ``constant``, ``λ`` is ``damping`` itself.

With **sampled targets** (``gram`` source with ``targets="sampled"``, or
``TrueFisher(per_sample=True)``) ``U`` holds the ``R = S·M`` sampled per-sample gradients and
``g`` (the data's gradient) is not ``U1/M``; the general Woodbury form is used instead:

    (λI + UUᵀ/R)⁻¹ g = (g − U a)/λ,      a = (K + λR I)⁻¹ Uᵀg,

with ``Uᵀg`` from the plugins' row inner products (:meth:`Statistics.row_dots`); the
``"sgd"`` scale drops the ``1/λ``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.errors import HyperparameterError
from curvlib.layers.base import plugin_for
from curvlib.layers.generic import GenericPlugin
from curvlib.registry import register
from curvlib.solvers import robust_solve
from curvlib.structures.base import BatchContext, Structure

__all__ = ["SMW"]

Blocks = Literal["layer", "tensor", "model"]


@register("structure", "smw")
class SMW(Structure):
    """Per-batch damped Fisher preconditioning by the Sherman–Morrison–Woodbury identity.

    Args:
        blocks: ``"layer"`` (default: each module's parameters together, ``K = K_W + K_b``),
            ``"tensor"`` (each parameter its own block) or ``"model"`` (one block, one
            coefficient vector for every covered parameter).
        scale: ``"sgd"`` (default; ``1/λ`` folded into the learning rate, coefficients
            ``≈ 1/M`` for large damping) or ``"natural"`` (the damped natural gradient).
            See the module docstring for the formulas.
        cover: ``"registered"`` (default, as the paper): parameters of modules with a
            registered layer plugin (Linear, convolutions, installed plugins); the others
            (norm layers, embeddings) get the plain gradient. ``"all"``: every parameter,
            through the generic plugin where no plugin is registered.
    """

    name = "smw"
    needs = frozenset({"gram", "weighted_grads", "row_dots"})
    preconditions = "batch"
    default_damping = "frobenius"

    def __init__(self, blocks: Blocks = "layer", scale: Literal["sgd", "natural"] = "sgd",
                 cover: Literal["registered", "all"] = "registered"):
        if blocks not in ("layer", "tensor", "model"):
            raise ValueError(f"blocks must be 'layer', 'tensor' or 'model', got {blocks!r}")
        if scale not in ("sgd", "natural"):
            raise ValueError(f"scale must be 'sgd' or 'natural', got {scale!r}")
        if cover not in ("registered", "all"):
            raise ValueError(f"cover must be 'registered' or 'all', got {cover!r}")
        self.blocks, self.scale, self.cover = blocks, scale, cover
        self._partition: tuple[Any, Any, dict[str, list[str]]] | None = None

    @classmethod
    def examples(cls) -> list[Structure]:
        """The paper's configuration, and per-tensor blocks over every parameter (the natural
        scale is left to ``tests/test_smw.py``: with ``λ = α‖UᵀU‖_F`` its steps grow as
        ``1/‖g‖``, which three steps at a fixed learning rate do not survive)."""
        return [cls(), cls(blocks="tensor", cover="all")]

    #: the push-through solve needs λ > 0
    positive_damping = True

    def fallback_reason(self, param: nn.Parameter, owner: nn.Module | None = None) -> str:
        """``cover="registered"`` leaves out modules without a registered layer plugin."""
        kind = type(owner).__name__ if owner is not None else "module"
        return (f"cover='registered' and {kind} has no registered layer plugin (use "
                f"cover='all' for the generic torch.func path)")

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """With ``cover="registered"``: parameters of modules a registered plugin handles."""
        if self.cover == "all" or owner is None:
            return True
        return not isinstance(plugin_for(owner), GenericPlugin)

    # -- blocks and coefficients ----------------------------------------------------------------

    def partition(self, context: BatchContext) -> dict[str, list[str]]:
        """Block name → covered parameter names (model order).

        The result depends only on ``context.params`` and ``context.owners``, which the
        optimizer keeps from step to step, so it is computed once for them and reused.
        """
        cached = self._partition
        if (cached is not None and cached[0] is context.params
                and cached[1] is context.owners):
            return cached[2]
        if self.blocks == "tensor":
            out = {name: [name] for name in context.params}
        elif self.blocks == "model":
            out = {"model": list(context.params)}
        else:
            out = {}
            for name in context.params:
                out.setdefault(context.owners[name], []).append(name)
        self._partition = (context.params, context.owners, out)
        return out

    def _block_grams(self, blocks: dict[str, list[str]], curvature: Any) -> Tensor:
        grams = curvature.gram()
        summed = []
        for names in blocks.values():
            k = grams[names[0]]
            for name in names[1:]:
                k = k + grams[name]
            summed.append(k)
        return torch.stack(summed)

    def _dampings(self, context: BatchContext, blocks: dict[str, list[str]],
                  grams: Tensor) -> Tensor:
        """``λ`` per block from the damping rule and each block's group ``damping``."""
        values = []
        for block, names in blocks.items():
            found = {float(context.damping[n]) for n in names}
            if len(found) > 1:
                raise HyperparameterError(
                    f"smw block {block!r} spans parameters {names} whose param groups have "
                    f"different damping values {sorted(found)}; one block has one damping: "
                    f"put the block's parameters in one group, or use blocks='tensor'")
            values.append(found.pop())
        if any(v <= 0 for v in values):
            raise ValueError(
                "smw needs a positive damping (α of λ = α‖UᵀU‖_F with the frobenius rule, "
                f"λ itself with the constant rule); got damping values {sorted(set(values))}"
            )
        distinct = set(values)
        if len(distinct) == 1:  # the common case: one param group
            lam = context.damping_rule(values[0], grams)
            return lam if lam.dtype == torch.float64 else lam.to(torch.float64)
        out = torch.empty(len(values), dtype=torch.float64, device=grams.device)
        for value in distinct:
            idx = torch.tensor([i for i, v in enumerate(values) if v == value],
                               device=grams.device)
            out[idx] = context.damping_rule(value, grams[idx]).to(out)
        return out

    def coefficients(self, context: BatchContext, curvature: Any) -> dict[str, Tensor]:
        """Block name → ``c`` (``(M,)``, float64) with data targets: ``Σ_m c_m g_m`` is the
        block's direction (see the module docstring for the two scales).

        A block whose system is not finite, or cannot be solved even in float64 with raised
        damping, gets zero coefficients (it does not move this step) and is counted in
        ``context.report["skipped"]``; its name is listed in ``context.notes["skipped"]``.
        """
        if curvature.sampled or curvature.num_samples != 1:
            raise ValueError(
                "coefficients over the data's per-sample gradients need data targets; "
                "sampled statistics use the general Woodbury form (SMW.gradient)"
            )
        blocks = self.partition(context)
        grams = self._block_grams(blocks, curvature).double()
        lam = self._dampings(context, blocks, grams)
        m = grams.shape[-1]
        ones = torch.ones(grams.shape[0], m, dtype=torch.float64, device=grams.device)
        # λ = 0 with a positive damping value: the frobenius rule saw K = 0, no gradient at
        # all, and any c gives U c = 0 (c = 1/M is stored, the large-damping limit)
        zero = lam == 0
        some_zero = bool(zero.any())
        if some_zero:
            lam = torch.where(zero, 1.0, lam)
        solved = robust_solve(context.solver, grams, lam * m, ones)
        c = solved.solution
        if self.scale == "sgd":
            c = c * lam.unsqueeze(1)
        if some_zero:
            c = torch.where(zero.unsqueeze(1), ones / m, c)
        if not solved.all_ok:
            failed = solved.failed & ~zero
            if bool(failed.any()):
                c = torch.where(failed.unsqueeze(1), torch.zeros_like(c), c)
                names = list(blocks)
                context.notes["skipped"] = [names[i]
                                            for i in failed.nonzero().flatten().tolist()]
                context.report["skipped"] = (context.report.get("skipped", 0)
                                             + int(failed.sum()))
            if bool(solved.recovered.any()):
                context.report["recovered"] = (context.report.get("recovered", 0)
                                               + int(solved.recovered.sum()))
        return dict(zip(blocks, c.unbind(0), strict=True))

    def apply(self, context: BatchContext, data: Any, coefficients: dict[str, Tensor]
              ) -> dict[str, Tensor]:
        """``Σ_m c_m g_m`` per block over the data pass's rows (the layers' weighted
        gradients; nothing per-sample is materialised for registered layers)."""
        blocks = self.partition(context)
        vectors = [coefficients[b] for b in blocks]
        first = next(iter(context.params.values()), None)
        if first is not None and len(vectors) > 1:
            # one conversion to the working dtype for all blocks (not one per layer), when
            # every covered parameter has the first one's dtype and device
            dtype = torch.promote_types(first.dtype, torch.float32)
            if vectors[0].dtype != dtype and all(
                    p.dtype == first.dtype and p.device == first.device
                    for p in context.params.values()):
                vectors = torch.stack(vectors).to(device=first.device, dtype=dtype).unbind(0)
        per_param = {n: c for c, names in zip(vectors, blocks.values(), strict=True)
                     for n in names}
        out = data.weighted_grads(per_param)
        for block in context.notes.get("skipped", ()):  # 0·inf would not be 0: zero them
            for name in blocks[block]:
                out[name] = torch.zeros_like(out[name])
        return out

    # -- the batch-structure protocol ----------------------------------------------------------

    def gradient(self, context: BatchContext, data: Any, curvature: Any) -> dict[str, Tensor]:
        """The preconditioned gradient of every covered parameter (module docstring)."""
        if curvature is None:
            raise ValueError("smw needs the curvature statistics of every step")
        if not (curvature.sampled or curvature.num_samples != 1):
            return self.apply(context, data, self.coefficients(context, curvature))
        return self._sampled(context, data, curvature)

    def _sampled(self, context: BatchContext, data: Any, curvature: Any) -> dict[str, Tensor]:
        blocks = self.partition(context)
        n = data.batch_size
        mean = torch.full((n,), 1.0 / n, dtype=torch.float64)
        g = data.weighted_grads(mean, names=list(context.params))
        dots = curvature.row_dots(g)
        grams = self._block_grams(blocks, curvature).double()
        rhs = torch.stack([sum(dots[x] for x in names) for names in blocks.values()]).double()
        lam = self._dampings(context, blocks, grams)
        zero = lam == 0  # frobenius rule and U = 0: a is irrelevant, λ = 0 is no error
        lam = torch.where(zero, 1.0, lam)
        r = grams.shape[-1]
        solved = robust_solve(context.solver, grams, lam * r, rhs)
        a = solved.solution
        failed = solved.failed & ~zero
        a = torch.where((failed | zero).unsqueeze(1), torch.zeros_like(a), a)
        per_param = {x: -a[i] for i, names in enumerate(blocks.values()) for x in names}
        correction = curvature.weighted_grads(per_param)
        out = {}
        for i, names in enumerate(blocks.values()):
            for x in names:
                d = g[x] + correction[x].to(g[x].dtype)
                if self.scale == "natural":
                    d = d / lam[i].to(d.dtype)
                out[x] = torch.zeros_like(d) if bool(failed[i]) else d
        if bool(failed.any()):
            context.report["skipped"] = context.report.get("skipped", 0) + int(failed.sum())
        return out

    def __repr__(self) -> str:
        return f"SMW(blocks={self.blocks!r}, scale={self.scale!r}, cover={self.cover!r})"
