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

That is the protocol of **vector** structures (``preconditions = "vector"``: TNT, KFAC,
Shampoo…), which keep running statistics and map a gradient-like vector to a direction.
**Batch** structures (``preconditions = "batch"``: ``smw``, ``coefficient_sharing``) instead
precondition each batch's gradient from that batch's per-sample statistics, inside
``opt.backward``:

* :meth:`Structure.plan` says what the step needs — the source's curvature statistics or
  not, or per-sample loss weights for one ordinary backward pass;
* :meth:`Structure.gradient` returns the preconditioned gradient of every covered parameter
  from the data pass (:func:`curvlib.sources.data_pass`) and, when planned, the curvature
  statistics;
* the optimizer writes it into ``.grad`` and steps with momentum and weight decay like SGD.

Batch structures keep what must survive between steps (stored coefficients) in
``context.store``, a dict the optimizer owns and saves in its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from curvlib.registry import resolve

__all__ = ["BatchContext", "Plan", "Structure", "as_structure", "fold"]


@dataclass
class Plan:
    """What a batch structure needs for one step.

    Attributes:
        curvature: run the source (its statistics are passed to :meth:`Structure.gradient`).
        loss_weights: if set, ``(N,)`` weights ``c``: the covered parameters' gradient is
            that of ``Σ_n c_n ℓ_n``, from one ordinary backward pass, and
            :meth:`Structure.gradient` is not called.
        coefficients: if set, parameter name → ``(N,)`` coefficients ``c`` for every covered
            parameter: its gradient is ``Σ_n c_n g_n``, which the optimizer forms after one
            backward pass to the layer outputs, layer by layer from each layer's recorded
            ``X`` and ``Z`` (``(c⊙Z)ᵀX`` for Linear; no per-sample gradient: the cost of an
            SGD backward), and :meth:`Structure.gradient` is not called.
    """

    curvature: bool = True
    loss_weights: Tensor | None = None
    coefficients: dict[str, Tensor] | None = None


@dataclass
class BatchContext:
    """What a batch structure knows about the step it preconditions.

    Attributes:
        step: the optimizer's step count ``t`` (from 0).
        batch_size: ``N``.
        key: the key the caller passed to ``opt.backward`` (``None`` if none).
        sample_ids: ``(N,)`` integer ids of the samples, if the caller passed them.
        params: covered parameter name → parameter, in model order.
        owners: covered parameter name → the name of the module that owns it.
        damping: covered parameter name → its param group's ``damping`` hyperparameter.
        damping_rule: the optimizer's damping rule (kind ``damping``).
        solver: the optimizer's solver.
        store: structure state kept by the optimizer across steps (saved in its
            ``state_dict``); tensors, numbers, strings, and dicts and lists of them.
        report: counts the structure fills in for :attr:`CurvatureOptimizer.last_refresh`.
        notes: scratch space from :meth:`Structure.plan` to :meth:`Structure.gradient` and
            :meth:`Structure.commit` within the step.
        micro: the micro-batch's index within the step (``0`` unless several
            ``opt.backward`` calls accumulate before one ``step``); :meth:`Structure.commit`
            runs for every micro-batch at ``step``, in order.
    """

    step: int
    batch_size: int
    key: Any
    sample_ids: Tensor | None
    params: dict[str, nn.Parameter]
    owners: dict[str, str]
    damping: dict[str, float]
    damping_rule: Any
    solver: Any
    store: dict[str, Any]
    report: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    micro: int = 0


class Structure:
    """Base class of structures; see the module docstring for the two protocols.

    A vector structure overrides :meth:`init_state`, :meth:`update`, :meth:`refresh` and
    :meth:`direction`; a batch structure sets ``preconditions = "batch"`` and overrides
    :meth:`plan` (optionally), :meth:`gradient` and :meth:`commit`.
    """

    name: ClassVar[str] = ""
    #: The statistics it needs from a source (names in :data:`curvlib.sources.PROVIDES`).
    needs: ClassVar[frozenset[str]] = frozenset()
    #: ``"vector"`` (running statistics, :meth:`direction`) or ``"batch"`` (:meth:`gradient`).
    preconditions: ClassVar[str] = "vector"
    #: The damping rule :func:`curvlib.assemble` uses when none is given.
    default_damping: ClassVar[str] = "constant"
    #: Whether it needs ``damping > 0`` (the optimizer refuses ``0`` at construction).
    positive_damping: ClassVar[bool] = False
    #: Whether it has an exact formula for a parameter held by several modules (tied
    #: weights); ``False`` (e.g. KFAC's per-module factors): the optimizer refuses one.
    shares_across_modules: ClassVar[bool] = True

    def fallback_reason(self, param: nn.Parameter, owner: nn.Module | None = None) -> str:
        """Why :meth:`covers` is ``False`` for ``param``, in a few words (shown by
        :meth:`CurvatureOptimizer.coverage <curvlib.optim.CurvatureOptimizer.coverage>`)."""
        kind = type(owner).__name__ if owner is not None else "module"
        return f"{self!r} does not cover this {kind} parameter of shape {tuple(param.shape)}"

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """Whether this structure preconditions ``param``, owned by module ``owner`` (others
        get the fallback)."""
        return True

    # -- vector structures ----------------------------------------------------------------------
    # The defaults below raise on purpose: a vector structure overrides all four, and a batch
    # structure never has them called (the optimizer takes the batch path), so reaching one
    # means a structure declared the wrong ``preconditions``.

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """The initial per-parameter state (tensors on the parameter's device)."""
        return {}

    def update(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]], stats: Any, *,
               ema: float, average: bool = False) -> None:
        """Fold one batch's statistics into the state of ``(name, param, state)`` items."""
        raise NotImplementedError(f"{type(self).__name__} keeps no running statistics")

    def refresh(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]], *, solver: Any,
                damping: Callable[[Tensor], Tensor]) -> dict[str, int]:
        """Recompute the inverses; returns counts of what the recovery policy had to do."""
        raise NotImplementedError(f"{type(self).__name__} keeps no inverses")

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """The preconditioned direction for ``vector`` (parameter-shaped)."""
        raise NotImplementedError(f"{type(self).__name__} preconditions batches, not vectors")

    def directions(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]],
                   vectors: list[Tensor]) -> list[Tensor]:
        """Directions for several covered parameters of one param group at once.

        ``items`` are ``(name, param, state)`` and ``vectors`` their momenta, in the same
        order. The optimizer calls this once per param group. The default maps each
        parameter by :meth:`direction`; structures whose blocks span several tensors (a
        layer's weight and bias in ``kfac`` or ``dense``) override it.
        """
        return [self.direction(p, state, v)
                for (_, p, state), v in zip(items, vectors, strict=True)]

    def solver_powers(self, params: list[nn.Parameter]) -> set[float]:
        """The powers ``p`` this structure asks the solver for (``(A + εI)^{-1/p}``) when it
        covers ``params``; the optimizer refuses a solver that lacks one. Default ``{1.0}``
        (inverses); a structure that uses no solver returns an empty set."""
        return {1.0}

    def curvature_blocks(self, items: list[tuple[str, nn.Parameter, dict[str, Any]]]
                         ) -> dict[tuple[str, ...], Tensor]:
        """The current undamped curvature approximation as dense float64 matrices.

        Keys are blocks (tuples of parameter names); rows and columns run over each
        parameter flattened row-major, concatenated in the key's order (the order of
        :mod:`curvlib.testing.oracles`). Meant for small models: see
        :mod:`curvlib.diagnostics`.
        """
        # raises on purpose: batch structures (smw, sharing) hold no running block, and the
        # diagnostics must say so rather than compare against an empty dict
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its curvature as dense blocks")

    # -- composition ----------------------------------------------------------------------------

    @classmethod
    def examples(cls) -> list[Structure]:
        """Configured instances the composition-matrix test assembles with every registered
        source and solver (default: the default configuration)."""
        return [cls()]

    # -- batch structures -----------------------------------------------------------------------

    def check_source(self, source: Any) -> None:
        """Raise ``CompatibilityError`` if this structure cannot work with ``source`` for a
        reason beyond :attr:`needs` (default: nothing to check)."""

    def plan(self, context: BatchContext) -> Plan:
        """What this step needs (default: the curvature statistics)."""
        return Plan()

    def gradient(self, context: BatchContext, data: Any, curvature: Any) -> dict[str, Tensor]:
        """Covered parameter name → preconditioned gradient, from the data pass ``data`` and
        (when planned) the source's statistics ``curvature``."""
        # raises on purpose: every batch structure overrides it (see the note above)
        raise NotImplementedError(f"{type(self).__name__} is not a batch structure")

    def commit(self, context: BatchContext) -> None:
        """Called by ``step()`` for each micro-batch of the step, once every gradient has
        been written: make changes to ``context.store`` permanent here, so a step that fails
        midway, or is skipped by the non-finite policy, leaves none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def fold(running: Tensor, new: Tensor, count: Tensor | int, *, ema: float,
         average: bool = False) -> None:
    """Fold one statistic into a running one, in place — the rule every vector structure uses.

    ``count`` is the number of statistics folded in so far. The first sets ``running = new``;
    later ones give ``ema·running + (1 − ema)·new`` (one ``lerp_``), or, with ``average=True``
    (the warm start), the arithmetic mean of all of them.
    """
    new = new.to(running.dtype)
    if average:
        running.mul_(count / (count + 1)).add_(new / (count + 1))
    elif count == 0:
        running.copy_(new)
    else:
        running.lerp_(new, 1 - ema)


def as_structure(structure: str | Structure | type[Structure], **options: Any) -> Structure:
    """A structure object from a registered name, a class or an object."""
    return resolve("structure", structure, Structure, **options)
