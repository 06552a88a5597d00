r"""Damping rules (kind ``damping``): the ``ε`` a structure adds before inverting.

A damping rule maps the param group's ``damping`` hyperparameter (and, if it wants, the
matrices about to be inverted) to one damping per matrix. Built in:

* ``constant`` — the hyperparameter itself, for every matrix (TNT adds it to each normalised
  Kronecker factor, not to the Kronecker product);
* ``frobenius`` — the hyperparameter ``α`` times each matrix's Frobenius norm,
  ``λ = α‖A‖_F`` (FNGD eq. 14, with ``A = UᵀU`` the per-sample Gram of a block).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.registry import register, resolve

__all__ = ["Constant", "Damping", "Frobenius", "as_damping"]


class Damping(abc.ABC):
    """Base class of damping rules."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def __call__(self, value: float, matrices: Tensor) -> Tensor:
        """Dampings ``(B,)`` for ``matrices (B, d, d)`` given the hyperparameter ``value``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register("damping", "constant")
class Constant(Damping):
    """The same ``ε`` (the param group's ``damping``) for every matrix."""

    name = "constant"

    def __call__(self, value: float, matrices: Tensor) -> Tensor:
        """``value`` for each of the ``B`` matrices."""
        if value < 0:
            raise ValueError(f"damping must be non-negative, got {value}")
        return torch.full((matrices.shape[0],), float(value), dtype=torch.float64,
                          device=matrices.device)


@register("damping", "frobenius")
class Frobenius(Damping):
    """``λ = α‖A‖_F`` per matrix, ``α`` the param group's ``damping`` (FNGD eq. 14).

    Scale-free: multiplying ``A`` by ``s`` multiplies ``λ`` by ``s``, so the damped system
    ``A + λI`` keeps its conditioning as gradients grow or shrink.
    """

    name = "frobenius"

    def __call__(self, value: float, matrices: Tensor) -> Tensor:
        """``value · ‖A_b‖_F`` for each of the ``B`` matrices (float64)."""
        if value < 0:
            raise ValueError(f"damping must be non-negative, got {value}")
        if matrices.dtype != torch.float64:
            matrices = matrices.to(torch.float64)
        norms = torch.linalg.matrix_norm(matrices, ord="fro")
        return float(value) * norms


def as_damping(damping: str | Damping | type[Damping]) -> Damping:
    """A damping rule from a registered name, a class or an object."""
    return resolve("damping", damping, Damping)
