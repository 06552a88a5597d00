r"""Dense float64 references of whole optimizer steps, for the composition-matrix test.

A *reference structure* restates, from the definitions, the formula a registered structure
claims: dense matrices, :func:`torch.linalg.inv`, :func:`torch.linalg.eigh`, :func:`torch.kron`
— never the component it checks (each lives in its own module here and imports only the
oracles, the likelihoods and this base). :class:`ReferenceOptimizer` drives one through the
optimizer's documented schedule (statistics every ``stat_every`` steps with an EMA, inverses
every ``inverse_every``, heavy-ball momentum, decoupled weight decay), with statistics from
:mod:`curvlib.testing.oracles` (per-sample gradients by :mod:`torch.func`).

Damping rules are restated too: :func:`damping_reference` gives, per registered rule name,
the damping it assigns to one matrix, written from the rule's definition (``constant``: the
hyperparameter; ``frobenius``: ``α‖A‖_F``); every reference applies it to the matrices its
structure documents (TNT: each *normalised* factor; KFAC: each raw factor, split by ``π``;
Shampoo, dense: each statistic; diagonal: each ``1 × 1`` block ``v_i^power``; SMW: each
block's per-sample Gram).

Plugins that register a structure can register its reference with
:func:`register_reference`, and a damping rule's with :func:`register_damping_reference`;
the composition-matrix test requires one for every registered structure and rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.likelihoods import as_likelihood
from curvlib.testing import oracles

__all__ = [
    "ReferenceOptimizer",
    "ReferenceStatistics",
    "ReferenceStructure",
    "check_steps",
    "damping_reference",
    "reference_for",
    "register_damping_reference",
    "register_reference",
]

F64 = torch.float64
_REFERENCES: dict[str, type[ReferenceStructure]] = {}
#: damping rule name → ``(value, matrix) → ε`` (a 0-dim float64 tensor) for one matrix
_DAMPINGS: dict[str, Callable[[float, Tensor], Tensor]] = {}


def register_reference(name: str) -> Callable[[type[ReferenceStructure]],
                                              type[ReferenceStructure]]:
    """Class decorator: the reference of the structure registered as ``name``."""

    def decorate(cls: type[ReferenceStructure]) -> type[ReferenceStructure]:
        _REFERENCES[name] = cls
        return cls

    return decorate


def reference_for(name: str) -> type[ReferenceStructure]:
    """The reference registered for structure ``name`` (``LookupError`` naming those that
    exist if there is none)."""
    _load_builtin()
    if name not in _REFERENCES:
        raise LookupError(
            f"no dense reference for structure {name!r}; references exist for "
            f"{sorted(_REFERENCES)}. Register one with "
            f"curvlib.testing.reference.register_reference({name!r})"
        )
    return _REFERENCES[name]


def register_damping_reference(name: str) -> Callable[[Callable[[float, Tensor], Tensor]],
                                                     Callable[[float, Tensor], Tensor]]:
    """Function decorator: the reference of the damping rule registered as ``name``, a
    function ``(value, matrix) → ε`` giving the damping of one square matrix (a 0-dim float64
    tensor) for the param group's ``damping`` hyperparameter ``value``."""

    def decorate(fn: Callable[[float, Tensor], Tensor]) -> Callable[[float, Tensor], Tensor]:
        _DAMPINGS[name] = fn
        return fn

    return decorate


def damping_reference(name: str) -> Callable[[float, Tensor], Tensor]:
    """The reference registered for damping rule ``name`` (``LookupError`` naming those that
    exist if there is none)."""
    if name not in _DAMPINGS:
        raise LookupError(
            f"no reference for damping rule {name!r}; references exist for "
            f"{sorted(_DAMPINGS)}. Register one with "
            f"curvlib.testing.reference.register_damping_reference({name!r})"
        )
    return _DAMPINGS[name]


@register_damping_reference("constant")
def constant_damping(value: float, matrix: Tensor) -> Tensor:
    """``ε = value`` whatever the matrix."""
    return torch.tensor(float(value), dtype=F64)


@register_damping_reference("frobenius")
def frobenius_damping(value: float, matrix: Tensor) -> Tensor:
    """``ε = value · ‖A‖_F = value · (Σ_ij a_ij²)^{1/2}``."""
    return float(value) * matrix.to(F64).square().sum().sqrt()


def _load_builtin() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def split(flat: Tensor, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """A flat ``(..., P)`` tensor (oracle order) as ``name → (..., *shape)``."""
    out, start = {}, 0
    for name in names:
        size = int(torch.Size(shapes[name]).numel())
        out[name] = flat[..., start:start + size].reshape(*flat.shape[:-1], *shapes[name])
        start += size
    return out


class ReferenceStatistics:
    """One statistics step's raw quantities, float64, from the definitions.

    Attributes:
        model: a float64 copy of the model at the step's parameters.
        likelihood: the likelihood object.
        inputs: the batch's inputs (float64).
        draws: the ``S`` target tensors the source uses: ``[targets]`` for data targets,
            ``S`` targets sampled from the model's predictive distribution otherwise.
        sampled: whether the targets were sampled.
        names: trainable parameter names in model order; ``shapes`` their shapes.
    """

    def __init__(self, model: nn.Module, likelihood: Any, inputs: Tensor, draws: list[Tensor],
                 sampled: bool):
        self.model = model
        self.likelihood = as_likelihood(likelihood)
        self.inputs = inputs.to(F64) if inputs.is_floating_point() else inputs
        self.draws = draws
        self.sampled = sampled
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        self._rows: dict[str, Tensor] | None = None

    @property
    def batch_size(self) -> int:
        """``N``."""
        return int(self.inputs.shape[0])

    @property
    def num_samples(self) -> int:
        """``S``, the number of target draws."""
        return len(self.draws)

    def rows(self) -> dict[str, Tensor]:
        """``name → (S·N, *shape)``: per-sample gradients ``∂ℓ_n/∂θ`` (not divided by N),
        draw-major."""
        if self._rows is None:
            flat = torch.cat([oracles.per_sample_grads(self.model, self.likelihood, self.inputs, y)
                              for y in self.draws])
            self._rows = split(flat, self.names, self.shapes)
        return self._rows

    def batch(self) -> dict[str, Tensor]:
        """``name → (S, *shape)``: each draw's gradient of the mean loss."""
        n = self.batch_size
        return {name: r.reshape(self.num_samples, n, *r.shape[1:]).mean(1)
                for name, r in self.rows().items()}

    def layer_records(self, module_name: str) -> list[tuple[Tensor, list[Tensor]]]:
        """For each call of module ``module_name`` in the forward pass: its input ``X``
        (first positional argument, float64) and, per draw, ``Z = ∂(Σ_n ℓ_n)/∂output`` —
        from forward hooks on the float64 copy and :func:`torch.autograd.grad`, one backward
        per draw."""
        module = dict(self.model.named_modules())[module_name]
        records: list[tuple[Tensor, Tensor]] = []

        def hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
            records.append((args[0].detach(), output))

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                outputs = self.model(self.inputs)
                zs = [torch.autograd.grad(self.likelihood.loss(outputs, y).sum(),
                                          [o for _, o in records], retain_graph=True)
                      for y in self.draws]
        finally:
            handle.remove()
        return [(x, [z[i] for z in zs]) for i, (x, _) in enumerate(records)]


class ReferenceStructure:
    """Base of references: the dense formula one structure claims.

    Args:
        structure: the configured component (read its public options only).
        model: the float64 model (its parameters give names, shapes and owners).
        names: the trainable parameter names the optimizer optimizes.
    """

    #: ``"vector"`` (``update``/``refresh``/``direction``) or ``"batch"`` (``precondition``).
    preconditions = "vector"
    #: The damping rule's registered name (:class:`ReferenceOptimizer` sets it).
    damping_rule = "constant"

    # The methods below raise on purpose: a vector reference overrides the first three, a
    # batch reference ``precondition``; reaching a default means a reference declared the wrong
    # ``preconditions``, which should fail loudly rather than check against nothing.

    def __init__(self, structure: Any, model: nn.Module, names: list[str]):
        self.structure = structure
        self.model = model
        self.names = list(names)
        self.shapes = {n: p.shape for n, p in model.named_parameters() if n in self.names}
        owners: dict[str, str] = {}
        for mname, module in model.named_modules():
            for local, _ in module.named_parameters(recurse=False):
                full = f"{mname}.{local}" if mname else local
                owners.setdefault(full, mname)
        self.owners = owners
        self.modules = dict(model.named_modules())

    def covers(self, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
        """Whether the structure preconditions this parameter (default: every tensor)."""
        return param.dim() >= 1

    def damp(self, value: float, matrix: Tensor) -> Tensor:
        """The damping :attr:`damping_rule` gives ``matrix`` for hyperparameter ``value``
        (:func:`damping_reference`), a 0-dim float64 tensor."""
        return damping_reference(self.damping_rule)(value, matrix)

    def together(self) -> list[tuple[str, ...]]:
        """Parameters (of :attr:`names`) that must sit in one param group because one
        block spans them (default: none; KFAC: a layer's weight and bias; ``dense`` with
        ``blocks="layer"``: a module's parameters). Names not listed may go anywhere."""
        return []

    def shared_damping(self) -> list[tuple[str, ...]]:
        """Parameters that must have one ``damping`` value (default: :meth:`together`;
        batch structures: each block, which may span param groups)."""
        return self.together()

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        """Fold one statistics step in (first sets, then ``ema·H + (1 − ema)·S``)."""
        raise NotImplementedError

    def refresh(self, damping: float) -> None:
        """Recompute the damped inverses with damping hyperparameter ``damping``."""
        raise NotImplementedError

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Directions for the covered parameters' momenta (identity before any
        statistics)."""
        raise NotImplementedError

    def precondition(self, step: int, data: ReferenceStatistics,
                     curvature: Callable[[], ReferenceStatistics], damping: float
                     ) -> dict[str, Tensor]:
        """Batch structures: the covered parameters' preconditioned gradient at step
        ``step``, from the data's statistics and, if the step needs them, ``curvature()``
        (the source's statistics; call it only on steps where the structure draws them, so
        that sampled targets are drawn in the optimizer's order)."""
        raise NotImplementedError


def ema_update(old: Tensor | None, new: Tensor, ema: float) -> Tensor:
    """``new`` at the first update, then ``ema·old + (1 − ema)·new``."""
    return new.clone() if old is None else ema * old + (1 - ema) * new


#: The hyperparameters of a param group.
HYPER = ("lr", "damping", "momentum", "weight_decay", "ema", "stat_every", "inverse_every")


class ReferenceOptimizer:
    """The optimizer's documented step, in float64, around reference structures.

    Per param group, with its own hyperparameters: statistics at steps ``t`` with
    ``t % stat_every == 0`` (vector structures; the source runs once per step when any group
    is due, so the groups share one set of sampled targets); inverses at
    ``t % inverse_every == 0`` and at every statistics step while ``t < inverse_every``,
    damped by the damping rule with the group's ``damping``; ``m ← μ m + g`` (``m = g`` at
    the first step) with ``g`` the mean gradient from the oracles — or, for batch
    structures, the preconditioned gradient (each block damped with its group's ``damping``;
    ``stat_every`` and ``inverse_every`` do not apply); ``θ ← θ − lr·(d + wd·θ)`` with ``d``
    the direction for ``m`` (``m`` itself for parameters the structure does not cover).

    A vector structure gets one reference per param group (over that group's parameters);
    a batch structure one over every optimized parameter (its blocks may span groups).

    Args:
        model: the model (a float64 copy is made; the original is not touched).
        likelihood: the likelihood.
        source: the configured source; its public ``targets`` (``"data"``/``"sampled"``) and
            ``num_samples`` say which targets its statistics use.
        structure: the configured structure (its registered ``name`` picks the reference).
        damping_rule: the damping rule's registered name (:func:`damping_reference` gives
            its reference; every reference applies it where its structure does).
        generator: a generator in the same state as the optimizer's (sampled targets are
            drawn in the same order).
        groups: param groups as for a torch optimizer, with parameter *names*:
            ``[{"params": [names], "lr": ..., ...}, ...]``; keys a group leaves out take the
            keyword values below. ``None``: one group of every trainable parameter.
        hyper: ``lr``, ``damping``, ``momentum``, ``weight_decay``, ``ema``, ``stat_every``,
            ``inverse_every`` (the defaults of the groups).
    """

    def __init__(self, model: nn.Module, likelihood: Any, source: Any, structure: Any, *,
                 damping_rule: str, generator: torch.Generator | None,
                 lr: float | None = None, damping: float | None = None,
                 momentum: float | None = None, weight_decay: float = 0.0, ema: float = 0.9,
                 stat_every: int = 1, inverse_every: int = 20,
                 groups: list[dict[str, Any]] | None = None):
        self.model = copy.deepcopy(model).to(F64)
        self.likelihood = as_likelihood(likelihood)
        self.targets = getattr(source, "targets", None)
        if self.targets not in ("data", "sampled"):
            raise LookupError(f"no reference for source {source!r}: it must say whether its "
                              f"statistics use the data's targets or sampled ones (.targets)")
        self.num_samples = int(getattr(source, "num_samples", 1))
        self.generator = generator
        damping_reference(damping_rule)  # an unknown rule fails here, naming the known ones
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        ema=ema, stat_every=stat_every, inverse_every=inverse_every)
        self.groups: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, group in enumerate([{"params": trainable}] if groups is None else groups):
            unknown = set(group) - {"params", *HYPER}
            if unknown:
                raise ValueError(f"group {i}: unknown keys {sorted(unknown)}")
            hyper = {**defaults, **{k: group[k] for k in HYPER if k in group}}
            missing = [k for k, v in hyper.items() if v is None]
            if missing:
                raise ValueError(f"group {i}: no value for {missing}")
            names = list(group["params"])
            bad = [n for n in names if n not in trainable or n in seen]
            if bad:
                raise ValueError(f"group {i}: {bad} are not trainable parameters of the "
                                 f"model, or are in an earlier group")
            seen.update(names)
            hyper["stat_every"] = int(hyper["stat_every"])
            hyper["inverse_every"] = int(hyper["inverse_every"])
            self.groups.append({"names": names, **hyper})
        self.names = [n for n in trainable if n in seen]
        self.group_of = {n: g for g in self.groups for n in g["names"]}
        cls = reference_for(structure.name)
        self.batch = cls.preconditions == "batch"
        member_lists = [self.names] if self.batch else [g["names"] for g in self.groups]
        self.refs = [cls(structure, self.model, names) for names in member_lists]
        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        self.covered: set[str] = set()
        for ref, names in zip(self.refs, member_lists, strict=True):
            ref.damping_rule = damping_rule
            self.covered |= {n for n in names
                             if ref.covers(n, params[n], modules[ref.owners[n]])}
        #: the first group's reference and hyperparameters (one-group callers)
        self.ref = self.refs[0]
        self.hyper = {k: self.groups[0][k] for k in HYPER}
        self.buffers: dict[str, Tensor] = {}
        self.t = 0
        self._any_statistics = [False] * len(self.refs)

    @property
    def params(self) -> dict[str, Tensor]:
        """The current parameters (float64) by name."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()
                if n in self.names}

    def _statistics(self, inputs: Tensor, targets: Tensor) -> ReferenceStatistics:
        if self.targets == "data":
            return ReferenceStatistics(self.model, self.likelihood, inputs, [targets], False)
        with torch.no_grad():
            outputs = self.model(inputs.to(F64) if inputs.is_floating_point() else inputs)
        draws = [self.likelihood.sample(outputs, generator=self.generator)
                 for _ in range(self.num_samples)]
        return ReferenceStatistics(self.model, self.likelihood, inputs, draws, True)

    def step(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """One step on the batch; returns the parameters' change by name."""
        t = self.t
        data = ReferenceStatistics(self.model, self.likelihood, inputs, [targets], False)
        grads = {n: g[0] for n, g in data.batch().items() if n in self.group_of}
        if self.batch:
            def curvature() -> ReferenceStatistics:
                return data if self.targets == "data" else self._statistics(inputs, targets)

            damping = {n: float(self.group_of[n]["damping"]) for n in self.names}
            pre = self.refs[0].precondition(t, data, curvature, damping)
            grads = {n: pre[n] if n in self.covered else g for n, g in grads.items()}
        else:
            due = [t % g["stat_every"] == 0 for g in self.groups]
            stats = self._statistics(inputs, targets) if any(due) else None
            for i, (group, ref) in enumerate(zip(self.groups, self.refs, strict=True)):
                updated = False
                if due[i]:
                    ref.update(stats, group["ema"])
                    updated = self._any_statistics[i] = True
                t2 = group["inverse_every"]
                if self._any_statistics[i] and (t % t2 == 0 or (updated and t < t2)):
                    ref.refresh(group["damping"])
        for n, g in grads.items():
            mu = self.group_of[n]["momentum"]
            self.buffers[n] = g.clone() if n not in self.buffers else mu * self.buffers[n] + g
        directions = dict(self.buffers)
        if not self.batch:
            for group, ref in zip(self.groups, self.refs, strict=True):
                directions.update(ref.direction(
                    {n: self.buffers[n] for n in group["names"] if n in self.covered}))
        change = {}
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n not in self.group_of:
                    continue
                h = self.group_of[n]
                new = p - h["lr"] * (directions[n] + h["weight_decay"] * p)
                change[n] = new - p
                p.copy_(new)
        self.t += 1
        return change


def check_steps(opt: Any, model: nn.Module, likelihood: Any,
                batches: list[tuple[Tensor, Tensor]], *, rtol: float = 1e-10,
                step_rtol: float = 1e-8, atol: float = 1e-14,
                step_atol: float | None = 1e-13) -> ReferenceOptimizer:
    """Train ``opt`` on ``batches`` next to its :class:`ReferenceOptimizer` and assert, after
    every step, that the parameters and the step itself agree.

    ``opt`` must be freshly assembled (no step taken) on ``model``, with any number of param
    groups (each preconditioned; their hyperparameters are read from ``opt``); the reference
    copies its generator's state, so sampled targets are drawn alike. The step is compared at
    ``step_rtol`` and ``step_atol``: computed as a difference of parameters it carries their
    round-off ``u‖θ‖``; ``step_atol=None`` allows that, ``8u(‖θ_t‖ + ‖θ_{t+1}‖)`` per tensor
    (``u`` the float64 unit round-off), plus ``step_rtol`` times the norm of the whole step (a
    solve over a block that spans several tensors leaves errors of the block's scale in each,
    so a tensor whose exact step is zero or tiny carries that much), so that ``step_rtol`` can
    be the parameters' own ``1e-10``. Returns the reference.
    """
    from curvlib.testing.assertions import assert_close

    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(opt.param_groups):
        if not group.get("precondition", True):
            raise ValueError(f"check_steps compares preconditioned param groups; group {i} "
                             f"has precondition=False")
        groups.append({"params": [names[id(p)] for p in group["params"]],
                       **{k: group[k] for k in HYPER}})
    generator = torch.Generator(device=opt.generator.device)
    generator.set_state(opt.generator.get_state())
    ref = ReferenceOptimizer(model, likelihood, opt.source, opt.structure,
                             damping_rule=type(opt.damping_rule).name, generator=generator,
                             groups=groups)
    u = torch.finfo(F64).eps / 2
    for t, (x, y) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
        change = ref.step(x, y)
        expected = ref.params
        whole = float(torch.stack([c.norm() for c in change.values()]).norm()) if change else 0.0
        for name, p in model.named_parameters():
            if name not in expected:
                continue
            assert_close(p, expected[name], rtol=rtol, atol=atol, what=f"step {t}: {name}")
            tol = step_atol
            if tol is None:
                tol = 8 * u * float(before[name].norm() + p.detach().norm()) + step_rtol * whole
            assert_close(p.detach() - before[name], change[name], rtol=step_rtol,
                         atol=tol, what=f"step {t}: Δ{name}")
    return ref
