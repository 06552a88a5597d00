r"""The structure interface (kind ``structure``).

A structure holds, per parameter it covers, an approximation of that parameter's curvature
block, keeps it up to date from a source's :class:`~curvlib.sources.Statistics`, refreshes
its (damped) inverse with a solver, and maps a vector (the momentum of the gradient) to a
direction. Its per-parameter state lives in the optimizer's ``state[p]`` as tensors, so it
travels with ``state_dict``.

The optimizer (:mod:`curvlib.optim`) calls, per param group:

* :meth:`Structure.update` on statistics steps (every ``stat_every`` steps), with the group's
  ``ema``, or with ``average=True`` while warm-starting;
* :meth:`Structure.refresh` when inverses are due;
* :meth:`Structure.direction` on every step, for covered parameters.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from curvlib.registry import resolve

__all__ = ["Structure", "as_structure"]


class Structure(abc.ABC):
    """Base class of structures; see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    #: The statistics it needs from a source (names in :data:`curvlib.sources.PROVIDES`).
    needs: ClassVar[frozenset[str]] = frozenset()

    def covers(self, param: nn.Parameter) -> bool:
        """Whether this structure preconditions ``param`` (others get the fallback)."""
        return True

    @abc.abstractmethod
    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """The initial per-parameter state (tensors on the parameter's device)."""

    @abc.abstractmethod
    def update(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]], stats: Any, *,
               ema: float, average: bool = False) -> None:
        """Fold one batch's statistics into the state of ``(name, param, state)`` items."""

    @abc.abstractmethod
    def refresh(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]], *, solver: Any,
                damping: Callable[[Tensor], Tensor]) -> dict[str, int]:
        """Recompute the inverses; returns counts of what the recovery policy had to do."""

    @abc.abstractmethod
    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """The preconditioned direction for ``vector`` (parameter-shaped)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def as_structure(structure: str | Structure | type[Structure], **options: Any) -> Structure:
    """A structure object from a registered name, a class or an object."""
    return resolve("structure", structure, Structure, **options)
