r"""Recipes: methods as one-line assemblies of registered components.

The founding methods:

* :func:`TNT` — Tensor Normal Training (Ren & Goldfarb, 2021): source ``true_fisher``
  (one target sampled per example from the model, batch-averaged gradient, a second backward
  pass), structure ``tensor_normal``, solver ``cholesky``, constant damping per factor;
  :func:`EmpiricalTNT` is the paper's ablation with the data's targets (source
  ``empirical``).
* :func:`FNGD` — inverse-free Fast Natural Gradient Descent (Ou et al.): source ``gram``
  (per-sample gradients with the data's targets), structure ``coefficient_sharing`` around
  ``smw``, solver ``cholesky``, damping ``frobenius`` (``λ = α‖UᵀU‖_F``).

The baselines the papers compare with:

* :func:`KFAC` — structure ``kfac`` with ``TrueFisher(per_sample=True)`` (or the empirical
  Fisher: EF-KFAC);
* :func:`Shampoo` — structure ``shampoo`` on the data's gradients, ``eigh`` inverse roots;
* :func:`NaturalGradient` — the damped natural gradient of the sampled (true) Fisher per layer,
  by Sherman–Morrison–Woodbury (``smw`` with ``GramSource(targets="sampled")``).

Every recipe returns a :class:`~curvlib.optim.CurvatureOptimizer`; the training loop is
``loss = opt.backward(outputs, targets); opt.step()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvlib.optim import CurvatureOptimizer, assemble
from curvlib.sources import Empirical, GramSource, TrueFisher
from curvlib.structures.kfac import KFAC as KFACStructure
from curvlib.structures.shampoo import Shampoo as ShampooStructure
from curvlib.structures.sharing import CoefficientSharing
from curvlib.structures.smw import SMW
from curvlib.structures.tensor_normal import TensorNormal

__all__ = ["FNGD", "KFAC", "TNT", "EmpiricalTNT", "NaturalGradient", "Shampoo"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _schedule(model: nn.Module, stat_every: int | None, inverse_every: int | None
              ) -> dict[str, int]:
    """``stat_every``/``inverse_every``, each defaulting to TNT's: (10, 100) for models with
    convolutions, (1, 20) otherwise."""
    has_conv = any(isinstance(m, _CONV) for m in model.modules())
    t1, t2 = (10, 100) if has_conv else (1, 20)
    return {"stat_every": t1 if stat_every is None else stat_every,
            "inverse_every": t2 if inverse_every is None else inverse_every}


def TNT(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    damping: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema: float = 0.9,
    stat_every: int | None = None,
    inverse_every: int | None = None,
    num_samples: int = 1,
    reshape: str = "out_in_kernel",
    solver: Any = "cholesky",
    generator: torch.Generator | None = None,
    params: Any = None,
) -> CurvatureOptimizer:
    """TNT with the defaults of its authors' code.

    ``stat_every``/``inverse_every`` default to ``(10, 100)`` for models with convolutions
    (the paper's CNN runs) and ``(1, 20)`` otherwise (its autoencoders). ``lr`` and
    ``damping`` have no universal values: tune them (the paper grid-searched both). Everything
    else follows the paper: EMA 0.9 of the mode statistics, normalisation by eq. (5), damping
    added to each normalised factor, Cholesky inverses, momentum 0.9 formed before
    preconditioning, decoupled weight decay.
    """
    return assemble(
        model, likelihood,
        source=TrueFisher(num_samples=num_samples),
        structure=TensorNormal(reshape=reshape),
        solver=solver,
        params=params,
        generator=generator,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, ema=ema,
        **_schedule(model, stat_every, inverse_every),
    )


def FNGD(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    alpha: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    steps_per_epoch: int | None = None,
    key: str = "position",
    refresh_every: int | None = None,
    size_mismatch: str = "recompute",
    blocks: str = "layer",
    scale: str = "sgd",
    cover: str = "registered",
    solver: Any = "cholesky",
    generator: torch.Generator | None = None,
    params: Any = None,
) -> CurvatureOptimizer:
    """FNGD: per-layer SMW natural gradient whose coefficients are computed in the first
    epoch and shared afterwards.

    The training loop is TNT's: ``loss = opt.backward(outputs, targets); opt.step()``.
    Pass ``steps_per_epoch=len(loader)`` so that each batch is keyed by its position in the
    epoch (or pass ``key=`` to ``opt.backward``; or ``key="sample"`` and ``sample_ids=``).

    Args:
        lr: learning rate. With ``scale="sgd"`` (default, the paper's convention) the
            direction is ``λ·(λI + UUᵀ/M)⁻¹g``, whose coefficients tend to ``1/M`` for large
            ``alpha``: SGD learning rates apply.
        alpha: ``λ = α‖UᵀU‖_F`` per layer (FNGD eq. 14).
        momentum, weight_decay: SGD-style heavy-ball momentum on the preconditioned
            gradient and decoupled weight decay.
        steps_per_epoch, key, refresh_every, size_mismatch: the sharing options of
            :class:`~curvlib.structures.sharing.CoefficientSharing`.
        blocks, scale, cover: the options of :class:`~curvlib.structures.smw.SMW`;
            ``cover="registered"`` (default) gives parameters outside registered layers
            (norm layers, embeddings) the plain gradient, as the paper does.
    """
    structure = CoefficientSharing(
        SMW(blocks=blocks, scale=scale, cover=cover), steps_per_epoch=steps_per_epoch,
        key=key, refresh_every=refresh_every, size_mismatch=size_mismatch)
    return assemble(
        model, likelihood, source=GramSource(targets="data"), structure=structure,
        solver=solver, damping_rule="frobenius", params=params, generator=generator,
        lr=lr, damping=alpha, momentum=momentum, weight_decay=weight_decay)


def EmpiricalTNT(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    damping: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema: float = 0.9,
    stat_every: int | None = None,
    inverse_every: int | None = None,
    reshape: str = "out_in_kernel",
    solver: Any = "cholesky",
    params: Any = None,
) -> CurvatureOptimizer:
    """The TNT paper's ablation: TNT with the empirical Fisher.

    As :func:`TNT`, but the mode statistics come from the mini-batch gradient with the data's
    own targets (source ``empirical``) instead of targets sampled from the model.
    """
    return assemble(
        model, likelihood, source=Empirical(), structure=TensorNormal(reshape=reshape),
        solver=solver, params=params,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, ema=ema,
        **_schedule(model, stat_every, inverse_every),
    )


def KFAC(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    damping: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema: float = 0.95,
    stat_every: int | None = None,
    inverse_every: int | None = None,
    num_samples: int = 1,
    empirical: bool = False,
    pi_damping: bool = False,
    mode: str = "expand",
    solver: Any = "cholesky",
    generator: torch.Generator | None = None,
    params: Any = None,
) -> CurvatureOptimizer:
    """KFAC (Martens & Grosse, 2015) from the layer plugins' Kronecker factors.

    Source ``TrueFisher(per_sample=True, num_samples=...)`` (targets sampled from the model),
    or the data's targets with ``empirical=True`` (EF-KFAC); structure ``kfac`` with
    ``√damping`` added to each factor (``pi_damping=True`` splits it by π); Cholesky inverses.
    ``stat_every``/``inverse_every`` default to TNT's, so that the two compare at the same
    frequencies. Parameters outside layers with Kronecker factors (norm layers, embeddings)
    get SGD with momentum.
    """
    source = Empirical() if empirical else TrueFisher(num_samples=num_samples, per_sample=True)
    return assemble(
        model, likelihood, source=source,
        structure=KFACStructure(mode=mode, pi_damping=pi_damping),
        solver=solver, params=params, generator=generator,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, ema=ema,
        **_schedule(model, stat_every, inverse_every),
    )


def Shampoo(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    damping: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema: float = 0.95,
    stat_every: int | None = None,
    inverse_every: int | None = None,
    root: int | None = None,
    reshape: str = "as_is",
    max_dim: int | None = None,
    source: Any = "empirical",
    solver: Any = "eigh",
    generator: torch.Generator | None = None,
    params: Any = None,
) -> CurvatureOptimizer:
    """Shampoo (Gupta et al., 2018): per-mode statistics of the gradient, preconditioner
    ``(H_i + εI)^{-1/(2k)}`` per mode (``root`` overrides ``2k``), ``ε = damping``.

    The statistics come from the mini-batch gradient with the data's targets (source
    ``empirical``; ``source="true_fisher"`` uses sampled targets instead). Inverse roots by
    ``eigh`` (``"newton"`` for the coupled Newton iteration). ``stat_every``/
    ``inverse_every`` default to TNT's, so that the two compare at the same frequencies.
    """
    return assemble(
        model, likelihood, source=source,
        structure=ShampooStructure(reshape=reshape, max_dim=max_dim, root=root),
        solver=solver, params=params, generator=generator,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, ema=ema,
        **_schedule(model, stat_every, inverse_every),
    )


def NaturalGradient(
    model: nn.Module,
    likelihood: Any,
    *,
    lr: float,
    damping: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_samples: int = 1,
    blocks: str = "layer",
    scale: str = "sgd",
    damping_rule: str = "frobenius",
    solver: Any = "cholesky",
    generator: torch.Generator | None = None,
    params: Any = None,
) -> CurvatureOptimizer:
    """The damped natural gradient of the sampled Fisher per block, every step, by
    Sherman–Morrison–Woodbury: ``(λI + VVᵀ/R)⁻¹ g`` with ``V`` the ``R = S·N`` per-sample
    gradients for targets sampled from the model and ``g`` the data's gradient.

    Structure ``smw`` with ``GramSource(targets="sampled", num_samples=...)``; ``λ =
    damping·‖VᵀV‖_F`` (``damping_rule="frobenius"``) or ``damping`` itself (``"constant"``);
    ``scale="sgd"`` folds ``1/λ`` into the learning rate (see ``docs/fngd.md``).
    """
    return assemble(
        model, likelihood, source=GramSource(targets="sampled", num_samples=num_samples),
        structure=SMW(blocks=blocks, scale=scale), solver=solver, damping_rule=damping_rule,
        params=params, generator=generator,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
