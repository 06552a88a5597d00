r"""curvlib-poisson: a Poisson likelihood with log link, registered as a curvlib plugin.

This package is an example of curvlib's entry-point plugin path. Its ``pyproject.toml``
declares::

    [project.entry-points."curvlib.plugins"]
    poisson = "curvlib_poisson"

so curvlib imports this module on its first registry lookup, and the
``@curvlib.register("likelihood", "poisson")`` decorator below adds :class:`Poisson` to the
``likelihood`` registry with origin ``"curvlib-poisson"`` (the distribution).

The model output ``f`` is the log-rate of independent Poisson counts, ``λ = exp(f)``:

* per-sample loss ``ℓ_n = Σ_k (exp(f_nk) − y_nk f_nk)``, the negative log-likelihood up to the
  constant ``Σ_k log(y_nk!)``; summed over the output dimensions of sample ``n``, this is
  ``PoissonNLLLoss(log_input=True, full=False, reduction="none")`` summed per sample;
* score ``∇_f ℓ_n = exp(f_n) − y_n``, with mean 0 and covariance ``diag(exp(f_n))`` under
  ``y_n ~ Poisson(exp(f_n))``;
* output-space Fisher ``Λ(f_n) = diag(exp(f_n))``, which is also the loss Hessian
  ``∂²ℓ_n/∂f_n²`` (the log link is canonical), and its square root
  ``S_n = diag(exp(f_n / 2))``.
"""

from __future__ import annotations

import curvlib
import torch
from torch import Tensor

__all__ = ["Poisson"]

__version__ = "0.1.0"


def _check_outputs(outputs: Tensor) -> None:
    """Outputs must be a floating-point tensor ``(N, *)`` with the batch dimension first."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"poisson: outputs must be a torch.Tensor, got {type(outputs).__name__}")
    if outputs.dim() < 1:
        raise ValueError(
            f"poisson: outputs must have a batch dimension first and at least 1 dimension, "
            f"got shape {tuple(outputs.shape)}; for a single sample use outputs.unsqueeze(0)"
        )
    if not outputs.is_floating_point():
        raise TypeError(f"poisson: outputs must be floating point, got {outputs.dtype}")


def _check_targets(outputs: Tensor, targets: Tensor) -> None:
    """Targets must be real counts with exactly the outputs' shape."""
    if not isinstance(targets, Tensor) or targets.shape != outputs.shape:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"poisson: targets must have the outputs' shape {tuple(outputs.shape)}, got {shape}"
        )
    if targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"poisson: targets must be counts (an integer or floating dtype), got {targets.dtype}"
        )


def _per_sample(values: Tensor) -> Tensor:
    """Flatten every dimension but the first: ``(N, *) -> (N, K)``."""
    return values.reshape(values.shape[0], -1)


@curvlib.register("likelihood", "poisson")
class Poisson(curvlib.Likelihood):
    r"""Independent Poisson counts with log-rate outputs (log link), for count regression.

    Outputs ``f`` have any shape ``(N, *)`` and are log-rates, ``λ = exp(f)``; targets are
    counts ``y`` of the same shape (integer or floating dtype; non-negativity is not checked,
    since a data-dependent check would break :func:`torch.func.vmap`). With ``K`` the number
    of outputs of one sample, flattened row-major:

    * ``loss``: ``ℓ_n = Σ_k (exp(f_nk) − y_nk f_nk)``, shape ``(N,)`` — the negative
      log-likelihood without the constant ``log(y!)``, equal to
      ``PoissonNLLLoss(log_input=True, full=False, reduction="none")`` summed per sample;
    * ``sample``: ``y ~ Poisson(exp(f))`` by :func:`torch.poisson`, floating point;
    * ``fisher``: ``Λ(f_n) = diag(exp(f_n))``, shape ``(N, K, K)``;
    * ``fisher_sqrt``: ``S_n = diag(exp(f_n / 2))``, shape ``(N, K, K)``, ``S_n S_nᵀ = Λ(f_n)``.

    The log link is canonical, so ``Λ(f_n) = ∂²ℓ_n/∂f_n²`` for every ``y_n`` and the exact
    Fisher equals the generalised Gauss–Newton matrix.
    """

    name = "poisson"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample loss ``ℓ_n = Σ_k (exp(f_nk) − y_nk f_nk)``, shape ``(N,)``."""
        _check_outputs(outputs)
        _check_targets(outputs, targets)
        elementwise = torch.exp(outputs) - targets.to(outputs.dtype) * outputs
        return _per_sample(elementwise).sum(1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Counts ``y ~ Poisson(exp(f))`` of the outputs' shape and dtype; no gradient flows."""
        _check_outputs(outputs)
        return torch.poisson(outputs.detach().exp(), generator=generator)

    def fisher(self, outputs: Tensor) -> Tensor:
        """Output-space Fisher ``Λ(f_n) = diag(exp(f_n))``, shape ``(N, K, K)``."""
        _check_outputs(outputs)
        return torch.diag_embed(_per_sample(outputs).exp())

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        """Square root ``S_n = diag(exp(f_n / 2))`` of ``Λ(f_n)``, shape ``(N, K, K)``."""
        _check_outputs(outputs)
        return torch.diag_embed((0.5 * _per_sample(outputs)).exp())
