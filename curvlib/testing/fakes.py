"""Small stand-ins for unit-testing a structure without a model or a source.

A vector structure reads its statistics through a few methods of
:class:`curvlib.sources.Statistics`; :class:`GradientStatistics` serves given tensors through
them, so a test can feed a structure exactly the gradients it wants and compare the result
with a dense formula. :func:`structure_items` builds the ``(name, param, state)`` items the
optimizer passes, and :func:`constant_damping` the damping callable of ``refresh``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["GradientStatistics", "constant_damping", "gradient_draws", "structure_items"]


class GradientStatistics:
    """Statistics that return the given tensors: ``grads`` maps parameter names to
    ``(S, *shape)`` draws (read by ``batch_grads``) or ``(R, *shape)`` rows (read by
    ``per_sample_grads``) — the same tensors for both; a structure reads one or the other."""

    def __init__(self, grads: dict[str, Tensor]):
        self.grads = grads

    def batch_grads(self) -> dict[str, Tensor]:
        """The given tensors, as per-draw batch gradients."""
        return self.grads

    def per_sample_grads(self) -> dict[str, Tensor]:
        """The given tensors, as per-sample rows."""
        return self.grads


def structure_items(structure: object, shapes: dict[str, tuple[int, ...]],
                    dtype: torch.dtype = torch.float64
                    ) -> list[tuple[str, nn.Parameter, dict]]:
    """``(name, param, structure.init_state(param))`` for zero parameters of ``shapes``."""
    items = []
    for name, shape in shapes.items():
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        items.append((name, p, structure.init_state(p)))  # type: ignore[attr-defined]
    return items


def constant_damping(value: float, dtype: torch.dtype = torch.float64
                     ) -> Callable[[Tensor], Tensor]:
    """The ``damping`` callable of ``Structure.refresh`` for a constant ``value``."""
    return lambda mats: torch.full((mats.shape[0],), value, dtype=dtype)


def gradient_draws(shape: tuple[int, ...], num: int, seed: int, scale: float = 1.0,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """``num`` standard-normal draws of ``shape`` (times ``scale``) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(num, *shape, generator=gen, dtype=dtype)
