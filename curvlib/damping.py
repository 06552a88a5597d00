r"""Damping rules (kind ``damping``): the ``ε`` a structure adds before inverting.

A damping rule maps the param group's ``damping`` hyperparameter (and, if it wants, the
matrices about to be inverted) to one damping per matrix. Built in:

* ``constant`` — the hyperparameter itself, for every matrix (TNT adds it to each normalised
  Kronecker factor, not to the Kronecker product).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.registry import register, resolve

__all__ = ["Constant", "Damping", "as_damping"]


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


def as_damping(damping: str | Damping | type[Damping]) -> Damping:
    """A damping rule from a registered name, a class or an object."""
    return resolve("damping", damping, Damping)
