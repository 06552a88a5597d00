r"""Recipes: the founding methods as one-line assemblies of registered components.

* :func:`TNT` — Tensor Normal Training (Ren & Goldfarb, 2021): source ``true_fisher``
  (one target sampled per example from the model, batch-averaged gradient, a second backward
  pass), structure ``tensor_normal``, solver ``cholesky``, constant damping per factor.
* :func:`FNGD` — inverse-free Fast Natural Gradient Descent (Ou et al.): source ``gram``
  (per-sample gradients with the data's targets), structure ``coefficient_sharing`` around
  ``smw``, solver ``cholesky``, damping ``frobenius`` (``λ = α‖UᵀU‖_F``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvlib.optim import CurvatureOptimizer, assemble
from curvlib.sources import GramSource, TrueFisher
from curvlib.structures.sharing import CoefficientSharing
from curvlib.structures.smw import SMW
from curvlib.structures.tensor_normal import TensorNormal

__all__ = ["FNGD", "TNT"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    has_conv = any(isinstance(m, _CONV) for m in model.modules())
    t1, t2 = (10, 100) if has_conv else (1, 20)
    return assemble(
        model, likelihood,
        source=TrueFisher(num_samples=num_samples),
        structure=TensorNormal(reshape=reshape),
        solver=solver,
        params=params,
        generator=generator,
        lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, ema=ema,
        stat_every=t1 if stat_every is None else stat_every,
        inverse_every=t2 if inverse_every is None else inverse_every,
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
