r"""Optimizers assembled from components: :func:`assemble` and :class:`CurvatureOptimizer`.

``assemble(model, likelihood, source=..., structure=..., solver=..., **hyper)`` returns a
:class:`torch.optim.Optimizer`. The training loop differs from SGD's in one line::

    opt = curvlib.assemble(model, "categorical", source="true_fisher",
                           structure="tensor_normal", solver="cholesky", lr=1e-3, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        outputs = model(x)
        loss = opt.backward(outputs, y)   # instead of loss = criterion(...); loss.backward()
        opt.step()

:meth:`CurvatureOptimizer.backward` computes the mean loss with the likelihood, lets the
source collect its statistics when they are due (e.g. TNT's sampled backward pass, with the
graph retained), then runs the ordinary backward. :meth:`CurvatureOptimizer.step` folds the
statistics into the structure, refreshes the inverses when due, forms the momentum
``m ← μ m + g`` and steps along the structure's direction for ``m``, with decoupled weight
decay ``W ← W − lr·(direction + wd·W)``.

Hyperparameters (in every param group, so LR schedulers work): ``lr``, ``damping``,
``momentum``, ``weight_decay``, ``ema``, ``stat_every`` (T1), ``inverse_every`` (T2).
Schedule: statistics at steps ``t`` with ``t % T1 == 0`` (``t`` counts from 0); inverses at
``t % T2 == 0`` and at every statistics step while ``t < T2``.

Parameters the structure does not cover (it says so through ``covers``), and those of a param
group with ``precondition=False``, get the **fallback**: the momentum itself (SGD with
momentum, the same learning rate and decoupled weight decay). :meth:`CurvatureOptimizer.coverage`
lists every parameter with its treatment and, for the fallback, the reason. Structures start
from identity inverses, so before the first refresh a covered parameter moves like the
fallback too.

**Exact or refused.** Statistics that come from layer records (per-sample gradients, Gram
matrices, KFAC factors; every batch structure) see a parameter only inside the forward calls
of the modules that own it. On the first step that records, and whenever the number of calls
per watched module changes, the optimizer reads the autograd graph
(:func:`curvlib.coverage.unseen_uses`) and refuses, with :class:`~curvlib.errors.CoverageError`
before any state changes, a parameter used anywhere else (a registered layer whose ``forward``
is not called, as ``nn.MultiheadAttention``'s ``out_proj``; ``F.linear(x, lin.weight)``). A
weight tied across modules is recorded at each owner and summed; structures with one block
per module (``kfac``) refuse it at construction. Structures that need only batch gradients
(``tensor_normal``, ``shampoo``, ``diagonal``) get them from ordinary backward passes and work
on any model.

**Protocol.** ``step()`` after a plain ``loss.backward()`` (gradients that ``opt.backward``
did not compute) raises :class:`~curvlib.errors.UsageError` and changes nothing; ``step()``
with no backward since the last step (or ``zero_grad``) does nothing and does not advance the
schedule. ``add_param_group`` works out the new group's coverage (and is refused between
``opt.backward`` and ``step``).

**Gradient accumulation.** Several ``opt.backward`` calls before one ``step`` accumulate:
``.grad`` is the sum of each micro-batch's own gradient — the plain gradient for vector
structures (as ``loss.backward()`` accumulates), each micro-batch's own preconditioned
gradient for batch structures (its own coefficients; ``coefficient_sharing`` keys micro-batch
``k > 0`` of a step apart from the first, and an explicit ``key`` may not repeat within a
step). On a statistics step the statistics are those of the concatenated batch
(:func:`curvlib.sources.merge_statistics`); micro-batches that cannot be merged (different
draws, modules or sequence lengths) are refused at the second ``opt.backward``.

**Tensor hooks.** Hooks registered with ``p.register_hook`` act on what lands in ``.grad``:
the plain gradient for vector structures (statistics are computed from the raw per-sample or
batch gradients, before any hook), the preconditioned gradient for batch structures (the
optimizer backpropagates it through the parameter, so its hooks run).

**Non-finite policy** (as ``torch.amp.GradScaler``): each ``opt.backward`` checks, with one
host synchronisation, that the loss and every gradient are finite (batch structures also
reject a block whose per-sample statistics cannot be solved). A rejected batch gives a
``RuntimeWarning`` and a NaN return value, and the ``step()`` that follows changes nothing —
parameters, momentum, statistics, stored coefficients and the schedule stay as they are —
and adds one to :attr:`CurvatureOptimizer.skipped_steps`. Hyperparameters that are NaN,
infinite or out of range are refused (:class:`~curvlib.errors.HyperparameterError`) at
construction, in ``add_param_group``, and at every ``opt.backward`` and ``step`` before
anything changes (schedulers edit groups in between); so is ``damping = 0`` for structures
that need a positive damping.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.capture import Capture
from curvlib.coverage import Coverage, owners_of, unseen_uses
from curvlib.damping import Damping, as_damping
from curvlib.errors import (
    CoverageError,
    CurvlibError,
    HyperparameterError,
    InputError,
    StateDictError,
    UsageError,
)
from curvlib.layers.base import plugin_for
from curvlib.likelihoods import Likelihood, as_likelihood
from curvlib.solvers import Solver, as_solver
from curvlib.sources import (
    Source,
    Statistics,
    as_source,
    check_mergeable,
    data_layout,
    data_pass,
    merge_statistics,
    weighted_layer_grads,
)
from curvlib.structures.base import BatchContext, Structure, as_structure

__all__ = ["CompatibilityError", "CurvatureOptimizer", "assemble"]

HYPER = ("lr", "damping", "momentum", "weight_decay", "ema", "stat_every", "inverse_every")
#: Keys a param group may hold besides ``params``: the hyperparameters and ``precondition``
#: (``False``: the group's parameters get the fallback, SGD with momentum).
GROUP_KEYS = (*HYPER, "precondition")


class CompatibilityError(CurvlibError, ValueError):
    """A structure needs statistics the source does not provide, or a solver power it lacks."""


class CurvatureOptimizer(torch.optim.Optimizer):
    """A second-order optimizer made of a source, a structure and a solver.

    Build it with :func:`assemble` (or a recipe such as :func:`curvlib.TNT`). Arguments are
    those of :func:`assemble`. See the module docstring for the protocol, the fallback, the
    accumulation rule and the non-finite policy.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        *,
        source: Source,
        structure: Structure,
        solver: Solver,
        damping_rule: Damping,
        params: Iterable[Any] | None = None,
        generator: torch.Generator | None = None,
        **hyper: Any,
    ):
        unknown = set(hyper) - set(HYPER)
        if unknown:
            raise TypeError(
                f"unknown hyperparameter(s) {sorted(unknown)}; the shared ones are "
                f"{', '.join(HYPER)} (component options go to the component, e.g. "
                f"structure=TensorNormal(reshape='out_rest'))"
            )
        defaults = dict(lr=1e-3, damping=1e-3, momentum=0.9, weight_decay=0.0, ema=0.9,
                        stat_every=1, inverse_every=20)
        defaults.update(hyper)
        self._positive = _needs_positive_damping(structure)
        _check_hyper(defaults, "the defaults", structure if self._positive else None)
        self._ready = False  # torch's __init__ adds the groups; configure once, below
        super().__init__(model.parameters() if params is None else params, defaults)
        for group in self.param_groups:
            odd = set(group) - set(GROUP_KEYS) - {"params", "name"}
            if odd:
                warnings.warn(
                    f"param group keys {sorted(odd)} are not curvlib hyperparameters and are "
                    f"ignored (the hyperparameters are {', '.join(HYPER)}; a group with "
                    f"precondition=False gets SGD with momentum)",
                    UserWarning, stacklevel=3)
        self.model = model
        self.likelihood: Likelihood = as_likelihood(likelihood)
        self.source, self.structure = source, structure
        self.solver, self.damping_rule = solver, damping_rule
        missing = structure.needs - source.provides
        if missing:
            raise CompatibilityError(
                f"structure {structure!r} needs {sorted(missing)}, which source {source!r} "
                f"does not provide (it provides {sorted(source.provides)}); sources that "
                f"would: {_providers(structure.needs)}"
            )
        structure.check_source(source)
        self._batch = structure.preconditions == "batch"
        #: State of batch structures (e.g. stored coefficients), saved in ``state_dict``.
        self.structure_state: dict[str, Any] = {}
        #: Steps skipped by the non-finite policy (saved in ``state_dict``).
        self.skipped_steps = 0
        try:
            device = next(model.parameters()).device
        except StopIteration:
            raise UsageError("the model has no parameters: there is nothing to optimize") \
                from None
        if generator is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self._step_count = 0
        self._closed = False
        self._capture: Capture | None = None
        self.last_refresh: dict[str, int] = {}
        self._reset_pending()
        self._configure()
        self._ready = True

    # -- configuration ---------------------------------------------------------------------------

    def _configure(self) -> None:
        """Work out, from the param groups and the model as they are now, which parameters
        the structure preconditions (:meth:`coverage`), and (re)build the capture.

        Runs at construction, after :meth:`add_param_group`, and when a parameter's
        ``requires_grad`` changed. Raises before changing anything if a group holds a
        parameter that is not the model's, if nothing is trainable, or if the structure has
        no exact formula for a parameter (e.g. KFAC for a weight tied across modules).
        """
        model, structure = self.model, self.structure
        names: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if n not in names.setdefault(id(p), []):
                names[id(p)].append(n)
        owners = owners_of(model)
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group, f"param group {gi}", structure if self._positive else None)
            for p in group["params"]:
                if id(p) not in names:
                    raise UsageError(
                        f"param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                        f"not a parameter of the model: curvlib preconditions the model's "
                        f"parameters from its layers; pass params drawn from "
                        f"model.parameters() (or register the tensor as a parameter)")
        order = {id(p): i for i, p in enumerate(model.parameters())}
        rows: list[Coverage] = []
        covered: dict[str, nn.Parameter] = {}
        group_of: dict[str, dict] = {}
        plain: list[nn.Parameter] = []
        trainable = 0
        damping_name = repr(self.damping_rule)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                name, aliases = names[id(p)][0], tuple(names[id(p)][1:])
                own = owners.get(id(p), [])
                owner = own[0][1] if own else None
                reason = None
                if not p.requires_grad:
                    reason = "frozen (requires_grad=False): not updated"
                elif not group.get("precondition", True):
                    reason = f"its param group ({gi}) has precondition=False"
                elif not structure.covers(p, owner):
                    reason = _fallback_reason(structure, p, owner)
                if p.requires_grad:
                    trainable += 1
                if reason is None and len(own) > 1 and not structure.shares_across_modules:
                    raise CoverageError(
                        f"parameter {name!r} is shared by modules "
                        f"{[m for m, _ in own]} (tied weights); {structure!r} builds one "
                        f"block per module and has no exact formula for a tensor used by "
                        f"several. Put it in a param group with precondition=False (SGD with "
                        f"momentum), or use a structure that works from per-parameter "
                        f"statistics (tensor_normal, shampoo, diagonal, dense)")
                if reason is None:
                    covered[name] = p
                    group_of[name] = group
                elif p.requires_grad:
                    plain.append(p)
                rows.append(Coverage(
                    name, tuple(p.shape), gi, reason is None,
                    repr(structure) if reason is None else "",
                    repr(self.solver) if reason is None and structure.solver_powers([p])
                    else "", f"{damping_name} ({group['damping']:g})", reason, aliases))
        if trainable == 0:
            raise UsageError(
                "nothing to optimize: every parameter given to the optimizer has "
                "requires_grad=False; unfreeze the ones to train (p.requires_grad_(True)) "
                "before building the optimizer")
        unsupported = sorted(q for q in structure.solver_powers(list(covered.values()))
                             if not self.solver.supports(q))
        if unsupported:
            raise CompatibilityError(
                f"structure {structure!r} needs (A + εI)^(-1/p) for p in {unsupported}, which "
                f"solver {self.solver!r} does not compute; solvers that do: "
                f"{_solvers_for(unsupported)}"
            )
        covered = dict(sorted(covered.items(), key=lambda kv: order[id(kv[1])]))
        # -- commit the configuration (nothing above changed the optimizer) --
        self._names = {i: ns[0] for i, ns in names.items()}
        self._coverage = rows
        self._covered = covered
        self._covered_ids = {id(p) for p in covered.values()}
        self._group_of = group_of
        self._plain = plain
        self._grad_flags = self._requires_grad_flags()
        old = self._capture
        if old is not None:
            old.stop()  # its records stay: a forward may already have run (see below)
            self._capture = None
        self._audited: tuple[int, ...] | None = None
        self._watched: list[nn.Module] = []
        self._owner_modules_of: dict[str, list[nn.Module]] = {}
        self._owners_of: dict[str, str] = {}
        self._dampings: tuple[tuple[float, ...], dict[str, float]] = ((), {})
        needs_records = self._batch or (
            bool(covered) and self.source.needs_capture_for(structure.needs))
        if not (needs_records and covered):
            return
        self._owner_modules_of = {name: [m for _, m in owners[id(p)]]
                                  for name, p in covered.items()}
        wanted = {id(m) for mods in self._owner_modules_of.values() for m in mods}
        watched = {mname: m for mname, m in model.named_modules() if id(m) in wanted}
        capture = Capture(watched, clear_on_call_of=model, grad_hooks=False, keep_outputs=set())
        capture.keep_outputs = {m for m in watched.values() if plugin_for(m).needs_output}
        self._watched = list(watched.values())
        if self._batch:
            # plugins are resolved once, here (a layer plugin registered later is not seen)
            self._layout = data_layout(capture, covered)
            self._owners_of = {name: owners[id(p)][0][0] for name, p in covered.items()}
            #: module → (plugin, local → global parameter names), for the shared steps
            self._layer_of = {module: (plugin, params)
                              for module, _, plugin, params in self._layout.layers}
        if old is not None:  # reconfigured between the forward and opt.backward
            for module, calls in capture.calls.items():
                calls.extend(old.calls.get(module, ()))
        capture.start()
        capture.set_recording(self._batch or self._stats_due())
        self._capture = capture

    def _requires_grad_flags(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for g in self.param_groups for p in g["params"])

    def coverage(self) -> list[Coverage]:
        """One :class:`~curvlib.coverage.Coverage` row per parameter of the param groups:
        which structure, solver and damping rule precondition it, or why it gets the
        fallback (SGD with momentum) or is frozen. ``print(curvlib.format_coverage(
        opt.coverage()))`` shows it as a table."""
        return list(self._coverage)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch's), then work out its coverage: the new parameters
        are preconditioned like the others (or get the fallback, and :meth:`coverage` says
        why). Refused between ``opt.backward`` and ``step`` and for a bad hyperparameter;
        a refused group is not added."""
        if not getattr(self, "_ready", False):
            super().add_param_group(param_group)
            return
        self._check_open()
        if self._backwards:
            raise UsageError(
                "add_param_group was called between opt.backward and step: this step's "
                "gradients do not cover the new parameters. Add groups before opt.backward "
                "(e.g. right after step)")
        super().add_param_group(param_group)
        try:
            self._configure()
        except BaseException:
            self.param_groups.pop()
            self._configure()
            raise

    # -- schedule ------------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Steps taken so far (``t`` of the schedule; skipped and no-op steps do not count)."""
        return self._step_count

    def _stats_due(self) -> bool:
        t = self._step_count
        return any(t % int(g["stat_every"]) == 0 for g in self.param_groups)

    # -- checks ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(
                "this optimizer was closed (opt.close() removed its capture hooks); build a "
                "new one, e.g. with the same arguments and load_state_dict(old.state_dict())")

    def _check_groups(self) -> None:
        """Every group's hyperparameters, before anything is changed (schedulers and users
        edit them between steps)."""
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group, f"param group {gi}", self.structure if self._positive else None)

    def _reset_pending(self) -> None:
        self._backwards = 0
        self._pending: list[Statistics] = []
        self._contexts: list[BatchContext] = []
        self._bad_batch = False
        self._grad_marks = self._marks()

    def _marks(self) -> tuple[Any, ...]:
        """Identity and version of every ``.grad``: tells whether a backward pass ran."""
        return tuple(None if p.grad is None else (id(p.grad), p.grad._version)
                     for g in self.param_groups for p in g["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; also forgets micro-batches accumulated since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._reset_pending()

    def _audit(self, outputs: Tensor) -> None:
        """Refuse parameters used outside their owners' recorded calls (on the first
        recorded step and whenever the number of calls per watched module changes)."""
        capture = self._capture
        assert capture is not None
        signature = tuple(len(capture.calls.get(m, ())) for m in self._watched)
        if signature == self._audited:
            return
        calls = {name: [c for m in self._owner_modules_of[name] for c in capture.calls.get(m, ())]
                 for name in self._covered}
        bad = unseen_uses([outputs.grad_fn], self._covered, calls)
        if bad:
            lines = []
            for name, nodes in bad.items():
                mods = [self._module_name(m) for m in self._owner_modules_of[name]]
                lines.append(f"  {name!r} (owned by {mods}) is used by {sorted(set(nodes))} "
                             f"outside their forward calls")
            first = next(iter(bad))
            raise CoverageError(
                f"{self.structure!r} with {self.source!r} reads per-sample statistics from "
                f"the inputs and output gradients recorded at each parameter's own module, "
                f"and these parameters are also used elsewhere (a registered layer whose "
                f"forward is not called, as nn.MultiheadAttention's out_proj, or a weight "
                f"used functionally, as F.linear(x, lin.weight)), so their statistics would "
                f"miss that use:\n" + "\n".join(lines) + "\n"
                f"Fix: call the module instead of using its weight, or put these parameters "
                f"in a param group with precondition=False (SGD with momentum), e.g. "
                f"params=[{{'params': others}}, {{'params': [model.get_parameter({first!r})], "
                f"'precondition': False}}]"
                + ("" if self._batch else
                   ", or use a structure that needs only batch gradients (tensor_normal, "
                   "shampoo, diagonal)"))
        self._audited = signature

    def _module_name(self, module: nn.Module) -> str:
        capture = self._capture
        return capture.names.get(module, type(module).__name__) if capture else ""

    def _prepare(self, outputs: Tensor, targets: Tensor | None) -> None:
        """The checks every ``opt.backward`` makes before it changes anything."""
        self._check_open()
        self._check_groups()
        if self._requires_grad_flags() != self._grad_flags:
            if self._backwards:
                raise UsageError(
                    "a parameter's requires_grad changed between two opt.backward calls of "
                    "one step; change it before the step's first opt.backward")
            self._configure()
        if not isinstance(outputs, Tensor):
            raise InputError(f"opt.backward takes the model's output tensor, got "
                             f"{type(outputs).__name__}")
        if outputs.dim() == 0 or outputs.shape[0] == 0:
            raise InputError(
                f"opt.backward got outputs of shape {tuple(outputs.shape)}: an empty batch "
                f"(or no batch dimension) has no loss to minimise; skip empty batches")
        if not outputs.requires_grad:
            raise InputError(
                "the outputs passed to opt.backward do not require grad (computed under "
                "torch.no_grad(), or every parameter is frozen): there is nothing to "
                "backpropagate")
        if isinstance(targets, Tensor) and targets.dim() > 0 \
                and targets.shape[0] != outputs.shape[0]:
            raise InputError(
                f"targets have {targets.shape[0]} rows but outputs have {outputs.shape[0]}: "
                f"pass one target per sample")

    # -- the two calls of the training loop -----------------------------------------------------

    def backward(self, outputs: Tensor, targets: Tensor, *, key: Any = None,
                 sample_ids: Tensor | None = None) -> Tensor:
        """Mean loss with the likelihood, the source's statistics when due, then backward.

        With a vector structure (TNT…) this is the ordinary backward pass plus the source's
        passes. With a batch structure (``smw``, ``coefficient_sharing``) it computes the
        preconditioned gradient and adds it to ``.grad`` of the covered parameters (and the
        plain mean gradient to the others); :meth:`step` then applies momentum and weight
        decay. ``key`` and ``sample_ids`` are for ``coefficient_sharing`` (see its docs).

        Several calls before one :meth:`step` accumulate (see the module docstring). A batch
        whose loss or gradients are not finite is rejected: a ``RuntimeWarning``, a NaN
        return value, and the step that follows is skipped.

        Returns the (detached) mean loss.
        """
        self._prepare(outputs, targets)
        state = self.generator.get_state()
        try:
            if self._batch:
                loss = self._batch_backward(outputs, targets, key, sample_ids)
            else:
                loss = self._vector_backward(outputs, targets, key, sample_ids)
        except BaseException:
            self.generator.set_state(state)  # a refused call consumes no random numbers
            if self._capture is not None:
                self._capture.release_outputs()
            raise
        self._backwards += 1
        return self._finite(loss)

    def _vector_backward(self, outputs: Tensor, targets: Tensor, key: Any,
                         sample_ids: Tensor | None) -> Tensor:
        if key is not None or sample_ids is not None:
            raise TypeError(
                f"key= and sample_ids= are used by batch structures (coefficient_sharing); "
                f"{self.structure!r} does not use them"
            )
        loss = self.likelihood.mean_loss(outputs, targets)
        stats = None
        if self._stats_due():
            if self._capture is not None:
                self._audit(outputs)
            stats = self.source.collect(
                self.model, self.likelihood, outputs, targets, capture=self._capture,
                generator=self.generator)
            if self._pending:
                why = check_mergeable(self._pending[0], stats)
                if why is not None:
                    raise UsageError(
                        f"this micro-batch's statistics cannot be accumulated with the "
                        f"previous ones of this step: {why}. Call opt.step() after each "
                        f"opt.backward, or keep micro-batches alike")
        loss.backward()
        if self._capture is not None:
            self._capture.release_outputs()
        if stats is not None:
            self._pending.append(stats)
        return loss.detach()

    def _batch_backward(self, outputs: Tensor, targets: Tensor, key: Any,
                        sample_ids: Tensor | None) -> Tensor:
        if targets is None:
            raise InputError(f"{self.structure!r} preconditions the data's gradient: pass the "
                             f"batch's targets to opt.backward(outputs, targets)")
        capture = self._capture
        micro = self._backwards
        if key is not None and any(c.key == key for c in self._contexts):
            raise UsageError(
                f"key {key!r} was already used by a micro-batch of this step: each "
                f"accumulated micro-batch needs its own key")
        losses = self.likelihood.loss(outputs, targets)
        n = int(losses.shape[0])
        context = BatchContext(
            step=self._step_count, batch_size=n, key=key, sample_ids=sample_ids,
            params=self._covered, owners=self._owners_of,
            damping=self._damping_by_name(), damping_rule=self.damping_rule,
            solver=self.solver, store=self.structure_state, micro=micro)
        try:
            if capture is not None:
                self._audit(outputs)
            mean = losses.detach().mean()
            directions, plain, planned, hooks_ran = self._precondition(
                context, outputs, targets, losses, mean)
        finally:
            if capture is not None:
                capture.release_outputs()
                capture.clear()
        # tensor hooks (p.register_hook) act on what lands in .grad, the preconditioned
        # gradient: a backward pass from the parameters themselves runs them (autograd ran
        # them already where it formed the gradient: the plain parameters, loss weights)
        hooked = [] if hooks_ran else [n for n, p in self._covered.items() if _has_hooks(p)]
        with torch.no_grad():
            for name, d in directions.items():
                if name not in hooked:
                    _accumulate(self._covered[name], d)
            for p, g in zip(self._plain, plain, strict=True):
                if g is not None:
                    _accumulate(p, g / n)
        if hooked:
            torch.autograd.backward(
                [self._covered[name] for name in hooked],
                [directions[name].detach().to(self._covered[name].dtype) for name in hooked])
        if planned:
            self._contexts.append(context)
        self.last_refresh = dict(context.report)
        if context.report.get("skipped"):
            self._bad_batch = True
            warnings.warn(
                f"{context.report['skipped']} block(s) had per-sample statistics that were not "
                f"finite or could not be solved even in float64 with raised damping: the "
                f"batch is rejected and the next step is skipped (parameters, momentum and "
                f"stored coefficients stay as they are; opt.skipped_steps counts it)",
                RuntimeWarning, stacklevel=3)
            return torch.full_like(mean, float("nan"))
        return mean

    def _finite(self, loss: Tensor) -> Tensor:
        """The non-finite policy: one host synchronisation per ``opt.backward``."""
        if self._bad_batch:  # already rejected (and warned about) by the structure
            return torch.full_like(loss, float("nan"))
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not bool(_non_finite_flag([loss.detach().reshape(1), *grads], loss.device)):
            return loss
        self._bad_batch = True
        warnings.warn(
            "opt.backward got a non-finite loss or gradient (an Inf/NaN input, target or "
            "parameter, or an overflow); the next step() is skipped: parameters, momentum, "
            "statistics and stored coefficients stay as they are (opt.skipped_steps counts "
            "such steps). Call opt.zero_grad() before the next batch",
            RuntimeWarning, stacklevel=3)
        return torch.full_like(loss, float("nan"))

    def _damping_by_name(self) -> dict[str, float]:
        """Covered parameter name → its group's ``damping`` (rebuilt only when a group's value
        changed, e.g. by a scheduler)."""
        values = tuple(float(g["damping"]) for g in self.param_groups)
        if values != self._dampings[0] or len(self._dampings[1]) != len(self._group_of):
            self._dampings = (values, {name: float(g["damping"])
                                       for name, g in self._group_of.items()})
        return self._dampings[1]

    def _precondition(self, context: BatchContext, outputs: Tensor, targets: Tensor,
                      losses: Tensor, mean: Tensor
                      ) -> tuple[dict[str, Tensor], list[Tensor | None], bool, bool]:
        """The covered parameters' directions, the plain parameters' summed gradients,
        whether the structure planned this step (nothing is covered: it is not asked), and
        whether autograd formed the directions (so tensor hooks already ran on them)."""
        if not self._covered:
            grads = torch.autograd.grad(losses.sum(), self._plain, allow_unused=True)
            return {}, list(grads), False, True
        plan = self.structure.plan(context)
        if plan.loss_weights is not None:
            covered = list(self._covered.values())
            c = plan.loss_weights.to(device=losses.device, dtype=losses.dtype)
            weighted = torch.autograd.grad((losses * c).sum(), covered,
                                           retain_graph=bool(self._plain), allow_unused=True)
            plain: list[Tensor | None] = []
            if self._plain:
                plain = list(torch.autograd.grad(losses.sum(), self._plain, allow_unused=True))
            directions = {name: torch.zeros_like(p) if g is None else g
                          for (name, p), g in zip(self._covered.items(), weighted, strict=True)}
            return directions, plain, True, True
        if plan.coefficients is not None:
            directions, plain = self._weighted_backward(losses, plan.coefficients)
            return directions, plain, True, False
        curvature = None
        shares = plan.curvature and self.source.shares_data_pass
        if plan.curvature and not shares:
            curvature = self.source.collect(self.model, self.likelihood, outputs, targets,
                                            capture=self._capture, generator=self.generator)
        data, plain = data_pass(self.model, self.likelihood, outputs, targets, self._capture,
                                losses=losses, also=tuple(self._plain), layout=self._layout,
                                mean_loss=mean)
        if shares:
            curvature = self.source.from_data_pass(data)
        directions = self.structure.gradient(context, data, curvature)
        return directions, plain, True, False

    def _weighted_backward(self, losses: Tensor, coefficients: dict[str, Tensor]
                           ) -> tuple[dict[str, Tensor], list[Tensor | None]]:
        """One backward pass to the layer outputs; after it, each layer's ``Σ_n c_n g_n``
        is formed by its plugin from the recorded ``X`` and ``Z`` (the cost of an SGD
        backward: no per-sample gradient is formed)."""
        capture = self._capture
        assert capture is not None
        layers = self._layer_of
        out: dict[str, Tensor] = {}

        def on_grad(module: nn.Module, call: Any) -> None:
            entry = layers.get(module)
            if entry is not None:
                weighted_layer_grads(entry[0], module, [call], entry[1], coefficients, out)

        capture.on_grad = on_grad
        recording, capture._recording = capture._recording, False  # plugins may re-run layers
        try:
            plain = capture.backward_to_outputs(losses.sum(), also=tuple(self._plain))
        finally:
            capture.on_grad = None
            capture._recording = recording
        if len(out) != len(self._covered):
            for name, p in self._covered.items():
                if name not in out:  # not used by this batch (the audit saw every use)
                    out[name] = torch.zeros_like(
                        p, dtype=torch.promote_types(p.dtype, torch.float32))
        return out, plain

    def _items(self, group: dict) -> list[tuple[str, nn.Parameter, dict]]:
        items = []
        for p in group["params"]:
            if id(p) not in self._covered_ids:
                continue
            state = self.state[p]
            if "structure" not in state:
                state.update(self.structure.init_state(p))
                # marks state the structure initialised (a tensor: torch's load_state_dict
                # turns non-tensor values such as strings into generators)
                state["structure"] = torch.ones(())
            items.append((self._names[id(p)], p, state))
        return items

    @torch.no_grad()
    def step(self, closure=None):
        """One step along the structure's direction for the momentum (see the module).

        Refused (:class:`~curvlib.errors.UsageError`, nothing changed) when gradients were
        computed by a plain ``loss.backward()`` instead of ``opt.backward``; a no-op (the
        schedule does not advance) when no backward ran since the last step; skipped
        (see the non-finite policy) after a rejected batch.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_open()
        if self._backwards == 0:
            if self._marks() == self._grad_marks:
                return loss  # no backward since the last step or zero_grad: nothing to do
            raise UsageError(
                f"step() found gradients that opt.backward did not compute (a plain "
                f"loss.backward()?): {self.structure!r} would step without its curvature. "
                f"Replace `loss = criterion(outputs, targets); loss.backward()` by "
                f"`loss = opt.backward(outputs, targets)`")
        if self._bad_batch:
            self.skipped_steps += 1
            self._reset_pending()
            if self._capture is not None:
                self._capture.clear()
            return loss
        self._check_groups()
        t = self._step_count
        parts, contexts = self._pending, self._contexts
        stats = merge_statistics(parts) if parts else None
        # every group's statistics and inverses first, then every group's move: statistics
        # are formed lazily (a generic-plugin module's per-sample rows re-run the module), so
        # a later group's must not see parameters an earlier group has moved
        group_items = []
        for group in self.param_groups:
            items = [] if self._batch else self._items(group)
            group_items.append(items)
            updated = False
            if stats is not None and t % int(group["stat_every"]) == 0 and items:
                self.structure.update(items, stats, ema=float(group["ema"]))
                updated = True
            t2 = int(group["inverse_every"])
            if items and (t % t2 == 0 or (updated and t < t2)):
                value = float(group["damping"])
                self.last_refresh = self.structure.refresh(
                    items, solver=self.solver,
                    damping=lambda mats, value=value: self.damping_rule(value, mats))
                if self.last_refresh.get("kept"):
                    warnings.warn(
                        f"{self.last_refresh['kept']} factor(s) could not be inverted even in "
                        f"float64 with raised damping; their previous inverses were kept",
                        RuntimeWarning, stacklevel=2)
        for group, items in zip(self.param_groups, group_items, strict=True):
            covered = {id(p) for _, p, _ in items}
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    grads.append(p.grad)
                    bufs.append(buf)
                params.append(p)
            if bufs:
                _momentum_(bufs, grads, mu)
            if not params:
                continue
            directions = [self.state[p]["momentum_buffer"] for p in params]
            mapped = [i for i, p in enumerate(params) if id(p) in covered]
            if mapped:
                by_id = {id(p): item for item in items for p in (item[1],)}
                found = self.structure.directions(
                    [by_id[id(params[i])] for i in mapped], [directions[i] for i in mapped])
                for i, d in zip(mapped, found, strict=True):
                    directions[i] = d
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, directions, alpha=-lr)
        for context in contexts:
            self.structure.commit(context)
        self._step_count += 1
        self._reset_pending()
        if self._capture is not None:
            self._capture.clear()
            self._capture.set_recording(self._batch or self._stats_due())
        return loss

    # -- warm start ----------------------------------------------------------------------------

    def warm_start(self, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
        """Set the statistics to their arithmetic mean over ``batches`` at the current point.

        Each item is ``(inputs, targets)``; the model is run on the inputs, the source
        collects its statistics (no parameter is changed, no ``.grad`` is touched), and the
        structure averages them. Then the inverses are computed. Returns the number of
        batches used.
        """
        self._check_open()
        if self._batch:
            raise TypeError(
                f"warm_start averages running statistics; {self.structure!r} keeps none (it "
                f"preconditions each batch from that batch's statistics)"
            )
        if self._backwards:
            raise UsageError("warm_start was called between opt.backward and step")
        self._check_groups()
        count = 0
        if self._capture is not None:
            self._capture.set_recording(True)
        for inputs, targets in batches:
            outputs = self.model(inputs)
            if self._capture is not None:
                self._audit(outputs)
            stats = self.source.collect(self.model, self.likelihood, outputs, targets,
                                        capture=self._capture, generator=self.generator)
            for group in self.param_groups:
                items = self._items(group)
                if items:
                    self.structure.update(items, stats, ema=float(group["ema"]), average=True)
            if self._capture is not None:
                self._capture.release_outputs()
                self._capture.clear()
            count += 1
        if count == 0:
            raise InputError("warm_start got no batches")
        for group in self.param_groups:
            items = self._items(group)
            if items:
                value = float(group["damping"])
                self.last_refresh = self.structure.refresh(
                    items, solver=self.solver,
                    damping=lambda mats, value=value: self.damping_rule(value, mats))
        if self._capture is not None:
            self._capture.set_recording(self._stats_due())
        return count

    # -- state ---------------------------------------------------------------------------------

    def _signature(self) -> dict[str, Any]:
        """What a state dict must match to be loaded: the components and the parameters."""
        return {"source": repr(self.source), "structure": repr(self.structure),
                "solver": repr(self.solver), "damping_rule": repr(self.damping_rule),
                "params": [[[self._names[id(p)], list(p.shape)] for p in g["params"]]
                           for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the step count, the generator state, the skipped-step
        counter and the signature that :meth:`load_state_dict` checks."""
        sd = super().state_dict()
        sd["curvlib"] = {"step": self._step_count, "generator": self.generator.get_state(),
                         "structure": self.structure_state, "skipped": self.skipped_steps,
                         "signature": self._signature()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything. Tensor state keeps its saved dtype and values bit for bit
        (torch would cast floating state to each parameter's dtype, which would round
        float32 curvature of a bf16 model).

        Raises :class:`~curvlib.errors.StateDictError`, changing nothing, when the state
        comes from another recipe (source, structure, solver or damping rule), another
        model (parameter names or shapes), or has state tensors that do not fit.
        """
        self._check_open()
        extra = state_dict.get("curvlib")
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise StateDictError("not an optimizer state dict (no 'state' and 'param_groups')")
        mine = self._signature()
        theirs = extra.get("signature") if isinstance(extra, dict) else None
        if theirs is not None:
            for key in ("source", "structure", "solver", "damping_rule"):
                if theirs.get(key) != mine[key]:
                    raise StateDictError(
                        f"the state dict was saved by an optimizer with {key} "
                        f"{theirs.get(key)}; this one has {mine[key]}: build the optimizer "
                        f"with the same components to resume")
            if theirs.get("params") != mine["params"]:
                saved = [(n, tuple(s)) for g in theirs.get("params", []) for n, s in g]
                here = [(n, tuple(s)) for g in mine["params"] for n, s in g]
                diff = next((f"{a} saved, {b} here" for a, b in zip(saved, here, strict=False)
                             if a != b), f"{len(saved)} parameters saved, {len(here)} here")
                raise StateDictError(
                    f"the state dict was saved for other parameters or param groups "
                    f"({diff}): load it into an optimizer of the same model and groups")
        params = [p for g in self.param_groups for p in g["params"]]
        plain = {k: v for k, v in state_dict.items() if k != "curvlib"}
        if len(plain["param_groups"]) != len(self.param_groups) or [
                len(g["params"]) for g in plain["param_groups"]] != [
                len(g["params"]) for g in self.param_groups]:
            raise StateDictError(
                "the state dict has other param groups (their number or sizes differ): load "
                "it into an optimizer of the same model and groups")
        for index, st in plain["state"].items():
            param = params[int(index)]
            buf = st.get("momentum_buffer")
            if isinstance(buf, Tensor) and buf.shape != param.shape:
                raise StateDictError(
                    f"momentum of parameter {self._names[id(param)]!r} has shape "
                    f"{tuple(buf.shape)}, the parameter {tuple(param.shape)}: the state "
                    f"comes from another model")
            if "structure" in st:
                expected = set(self.structure.init_state(param))
                missing = expected - set(st)
                if missing:
                    raise StateDictError(
                        f"the state of parameter {self._names[id(param)]!r} lacks "
                        f"{sorted(missing)}, which {self.structure!r} keeps: the state "
                        f"comes from another structure")
                fresh = self.structure.init_state(param)
                for key, value in fresh.items():
                    got = st.get(key)
                    if isinstance(value, Tensor) and isinstance(got, Tensor) \
                            and got.shape != value.shape:
                        raise StateDictError(
                            f"state {key!r} of parameter {self._names[id(param)]!r} has "
                            f"shape {tuple(got.shape)}, {self.structure!r} expects "
                            f"{tuple(value.shape)}: the state comes from another model or "
                            f"configuration")
        for gi, g in enumerate(plain["param_groups"]):
            _check_hyper({**self.defaults, **g}, f"saved param group {gi}",
                         self.structure if self._positive else None)
        saved = {index: {name: v for name, v in st.items() if isinstance(v, Tensor)}
                 for index, st in plain["state"].items()}
        super().load_state_dict(plain)
        for index, entries in saved.items():
            param = params[int(index)]
            state = self.state[param]
            for name, value in entries.items():
                device = param.device if value.dim() > 0 or name != "step" else value.device
                state[name] = value.detach().to(device=device, copy=True)
        if extra is not None:
            self._step_count = int(extra["step"])
            self.generator.set_state(extra["generator"])
            self.structure_state = _copy_tree(extra.get("structure", {}))
            self.skipped_steps = int(extra.get("skipped", 0))
        self._reset_pending()
        self._configure()

    def __deepcopy__(self, memo: dict[int, Any]) -> CurvatureOptimizer:
        """A working copy: the model, state and components are deep-copied (the copy trains
        the copied model), and the copy installs capture hooks of its own."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        capture = self._capture
        handles = capture._handles if capture is not None else []
        for key, value in self.__dict__.items():
            if key in ("_capture", "_watched", "_owner_modules_of", "_layout", "_layer_of"):
                continue
            setattr(new, key, copy.deepcopy(value, memo))
        new._capture = None
        # the copied modules carry copies of this optimizer's hooks: remove them
        ids = {h.id for h in handles}
        for module in new.model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for hid in [i for i in hooks if i in ids]:
                    del hooks[hid]
        new._configure()
        return new

    def __del__(self) -> None:
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.stop()

    def close(self) -> None:
        """Remove the capture hooks; the optimizer cannot be used afterwards."""
        if self._capture is not None:
            self._capture.stop()
            self._capture = None
        self._closed = True

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, structure={self.structure!r}, "
                f"solver={self.solver!r}, damping={self.damping_rule!r}, "
                f"groups={len(self.param_groups)})")


def _momentum_(bufs: list[Tensor], grads: list[Tensor], mu: float) -> None:
    """``m ← μ m + g`` in place for every buffer.

    On the CPU one pass per buffer (``add(g, m, alpha=μ)`` written into ``m``: memory
    traffic, not arithmetic, is the cost there); elsewhere two multi-tensor ops (one kernel
    each for all buffers: launches, not traffic, are the cost on a GPU).
    """
    if bufs[0].device.type == "cpu":
        for buf, g in zip(bufs, grads, strict=True):
            torch.add(g, buf, alpha=mu, out=buf)
    else:
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)


def _accumulate(p: nn.Parameter, g: Tensor) -> None:
    """Add ``g`` to ``p.grad`` in the parameter's dtype (as autograd would)."""
    if g.requires_grad:
        g = g.detach()
    if g.dtype != p.dtype or g.device != p.device:
        g = g.to(dtype=p.dtype, device=p.device)
    if p.grad is None:
        p.grad = g.clone() if g.data_ptr() == p.data_ptr() else g.contiguous()
    else:
        p.grad.add_(g)


def _copy_tree(value: Any) -> Any:
    """A copy of nested dicts/lists with every tensor copied bit for bit (dtype and device
    kept)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy_tree(v) for v in value)
    return value


def _solvers_for(powers: list[float]) -> str:
    """Registered solvers (default options) that support every power in ``powers``."""
    from curvlib.registry import registrations

    found = []
    for reg in registrations("solver"):
        try:
            candidate = reg.obj()
        except Exception:  # a solver that needs arguments: skip it in the hint
            continue
        if all(candidate.supports(p) for p in powers):
            found.append(repr(reg.name))
    return ", ".join(found) or "none registered"


def _providers(needs: frozenset[str]) -> str:
    """Registered sources (default options, and per-sample true_fisher) providing ``needs``."""
    from curvlib.registry import registrations
    from curvlib.sources import TrueFisher

    found = []
    for reg in registrations("source"):
        try:
            candidate = reg.obj()
        except Exception:  # a source that needs arguments: skip it in the hint
            continue
        if needs <= candidate.provides:
            found.append(repr(reg.name))
    if "true_fisher" not in " ".join(found) and needs <= TrueFisher(per_sample=True).provides:
        found.append("TrueFisher(per_sample=True)")
    return ", ".join(found) or "none registered"


def _check_hyper(h: dict, where: str, positive: Structure | None = None) -> None:
    """Refuse a hyperparameter that is NaN, infinite, of the wrong type or out of range
    (:class:`~curvlib.errors.HyperparameterError`, naming ``where`` and the key)."""

    def bad(key: str, rule: str) -> HyperparameterError:
        return HyperparameterError(f"{where}: {key} must be {rule}, got {h[key]!r}")

    for key in ("lr", "damping", "momentum", "weight_decay", "ema"):
        value = h[key]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise bad(key, "a number")
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad(key, "a real number")
        if not math.isfinite(value):
            raise bad(key, "finite")
    if h["lr"] < 0:
        raise bad("lr", "non-negative")
    if h["damping"] < 0:
        raise bad("damping", "non-negative")
    if positive is not None and h["damping"] <= 0:
        raise bad("damping", f"positive for {positive!r} (its damped system is singular "
                             f"without it)")
    if h["weight_decay"] < 0:
        raise bad("weight_decay", "non-negative")
    if not 0 <= h["momentum"] < 1:
        raise bad("momentum", "in [0, 1)")
    if not 0 <= h["ema"] < 1:
        raise bad("ema", "in [0, 1)")
    for key in ("stat_every", "inverse_every"):
        value = h[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or int(value) != value or value < 1:
            raise bad(key, "a positive integer")
    if not isinstance(h.get("precondition", True), bool):
        raise bad("precondition", "True or False")


def _needs_positive_damping(structure: Structure) -> bool:
    """Whether the structure (or the structure it wraps) needs ``damping > 0``."""
    inner = getattr(structure, "inner", None)
    return bool(getattr(structure, "positive_damping", False)
                or getattr(inner, "positive_damping", False))


def _fallback_reason(structure: Structure, param: nn.Parameter, owner: nn.Module | None) -> str:
    """Why ``structure`` does not cover ``param`` (its own words where it has them)."""
    explain = getattr(structure, "fallback_reason", None)
    if explain is not None:
        return str(explain(param, owner))
    kind = type(owner).__name__ if owner is not None else "module"
    return (f"{structure!r} does not cover this {kind} parameter of shape "
            f"{tuple(param.shape)}")


def _has_hooks(p: Tensor) -> bool:
    """Whether ``p`` has tensor hooks (``register_hook``) or post-accumulate-grad hooks."""
    return bool(getattr(p, "_backward_hooks", None)
                or getattr(p, "_post_accumulate_grad_hooks", None))


def assemble(
    model: nn.Module,
    likelihood: Any,
    *,
    source: Any,
    structure: Any,
    solver: Any = "cholesky",
    damping_rule: Any = None,
    params: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    **hyper: Any,
) -> CurvatureOptimizer:
    """Build an optimizer from a source, a structure and a solver (names, classes or objects).

    Args:
        model: the model; its trainable parameters are optimized unless ``params`` is given
            (a list of parameters or of param-group dicts, as for any torch optimizer).
        likelihood: a registered likelihood name or object.
        source, structure, solver, damping_rule: components (see ``curvlib.available()``);
            ``damping_rule`` defaults to the structure's (``constant`` for TNT,
            ``frobenius`` — ``λ = α‖UᵀU‖_F`` — for ``smw``).
        generator: the :class:`torch.Generator` sampled targets come from (default: one
            seeded from torch's global generator).
        hyper: ``lr``, ``damping``, ``momentum``, ``weight_decay``, ``ema``, ``stat_every``,
            ``inverse_every`` (defaults 1e-3, 1e-3, 0.9, 0, 0.9, 1, 20).

    Raises:
        CompatibilityError: the structure needs statistics the source does not provide.
    """
    structure = as_structure(structure)
    if damping_rule is None:
        damping_rule = structure.default_damping
    return CurvatureOptimizer(
        model, likelihood, source=as_source(source), structure=structure,
        solver=as_solver(solver), damping_rule=as_damping(damping_rule), params=params,
        generator=generator, **hyper)


def _non_finite_flag(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A one-element float tensor on ``device``: nonzero iff some entry of ``tensors`` is
    Inf or NaN. Reads each tensor once, overflows nothing (no norm is formed) and does not
    synchronise: torch's own check for ``GradScaler`` (an in-place multiplication by exactly
    1, which leaves every value as it is), per device and floating dtype; where a torch build
    has no kernel for it, the entries' minimum and maximum (NaN and ±Inf survive both)."""
    flag = torch.zeros(1, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        t = t._values() if t.is_sparse else t  # a sparse gradient: its stored entries
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (dev, dtype), group in groups.items():
        if not dtype.is_floating_point:
            continue
        found = torch.zeros(1, device=dev)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found, torch.ones(1, device=dev))
        except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
            ends = torch.stack([v.float() for t in group if t.numel() for v in torch.aminmax(t)])
            found = (~torch.isfinite(ends)).any().float().reshape(1) if len(ends) else found
        flag = flag + found.to(device)
    return flag

