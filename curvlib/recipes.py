r"""Recipes: the founding methods as one-line assemblies of registered components.

* :func:`TNT` — Tensor Normal Training (Ren & Goldfarb, 2021): source ``true_fisher``
  (one target sampled per example from the model, batch-averaged gradient, a second backward
  pass), structure ``tensor_normal``, solver ``cholesky``, constant damping per factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvlib.optim import CurvatureOptimizer, assemble
from curvlib.sources import TrueFisher
from curvlib.structures.tensor_normal import TensorNormal

__all__ = ["TNT"]

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
