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

Parameters the structure does not cover (it says so through ``covers``) get the **fallback**:
the momentum itself (SGD with momentum, the same learning rate and decoupled weight decay).
Structures start from identity inverses, so before the first refresh a covered parameter
moves like the fallback too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.capture import Capture
from curvlib.damping import Damping, as_damping
from curvlib.layers.base import plugin_for
from curvlib.likelihoods import Likelihood, as_likelihood
from curvlib.solvers import Solver, as_solver
from curvlib.sources import (
    Source,
    Statistics,
    as_source,
    data_layout,
    data_pass,
    weighted_layer_grads,
)
from curvlib.structures.base import BatchContext, Structure, as_structure

__all__ = ["CompatibilityError", "CurvatureOptimizer", "assemble"]

HYPER = ("lr", "damping", "momentum", "weight_decay", "ema", "stat_every", "inverse_every")


class CompatibilityError(ValueError):
    """A structure needs statistics the source does not provide, or a solver power it lacks."""


class CurvatureOptimizer(torch.optim.Optimizer):
    """A second-order optimizer made of a source, a structure and a solver.

    Build it with :func:`assemble` (or a recipe such as :func:`curvlib.TNT`). Arguments are
    those of :func:`assemble`.
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
        _check_hyper(defaults)
        super().__init__(model.parameters() if params is None else params, defaults)
        for group in self.param_groups:
            _check_hyper(group)
            odd = set(group) - set(HYPER) - {"params", "name"}
            if odd:
                warnings.warn(
                    f"param group keys {sorted(odd)} are not curvlib hyperparameters and are "
                    f"ignored (the hyperparameters are {', '.join(HYPER)})",
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
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        covered = [p for p in trainable if structure.covers(p, _owner_of(model, p))]
        unsupported = sorted(p for p in structure.solver_powers(covered)
                             if not solver.supports(p))
        if unsupported:
            raise CompatibilityError(
                f"structure {structure!r} needs (A + εI)^(-1/p) for p in {unsupported}, which "
                f"solver {solver!r} does not compute; solvers that do: "
                f"{_solvers_for(unsupported)}"
            )
        structure.check_source(source)
        self._names = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._names:
                    raise ValueError("every optimized parameter must belong to the model")
        self._owner_names: dict[int, str] = {}
        owner_modules: dict[str, nn.Module] = {}
        for mname, module in model.named_modules():
            for p in module.parameters(recurse=False):
                if id(p) not in self._owner_names:
                    self._owner_names[id(p)] = mname
                    owner_modules.setdefault(mname, module)
        self._owner_modules = owner_modules
        self._batch = structure.preconditions == "batch"
        #: State of batch structures (e.g. stored coefficients), saved in ``state_dict``.
        self.structure_state: dict[str, Any] = {}
        self._prepared = False
        device = next(model.parameters()).device
        if generator is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self._step_count = 0
        self._pending: Statistics | None = None
        self.last_refresh: dict[str, int] = {}
        self._capture: Capture | None = None
        if self._batch:
            self._covered: dict[str, nn.Parameter] = {}
            self._plain: list[nn.Parameter] = []
            self._group_of: dict[str, dict] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if not p.requires_grad:
                        continue
                    owner = owner_modules[self._owner_names[id(p)]]
                    if structure.covers(p, owner):
                        self._covered[self._names[id(p)]] = p
                        self._group_of[self._names[id(p)]] = group
                    else:
                        self._plain.append(p)
            order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
            self._covered = dict(sorted(self._covered.items(), key=lambda kv: order[kv[0]]))
            watched = {self._owner_names[id(p)] for p in self._covered.values()}
            self._capture = Capture({m: owner_modules[m] for m in owner_modules if m in watched},
                                    clear_on_call_of=model, grad_hooks=False,
                                    keep_outputs=set())
            self._capture.start()
            # plugins are resolved once, here (a layer plugin registered later is not seen)
            self._layout = data_layout(self._capture, self._covered)
            self._owners_of = {name: self._owner_names[id(p)] for name, p in self._covered.items()}
            #: module → (plugin, local → global parameter names), for the shared steps
            self._layer_of = {module: (plugin, params)
                              for module, _, plugin, params in self._layout.layers}
            # outputs are kept only where a plugin reads them (the generic plugin's check)
            self._capture.keep_outputs = {module for module, (plugin, _) in
                                          self._layer_of.items() if plugin.needs_output}
            self._dampings: tuple[tuple[float, ...], dict[str, float]] = ((), {})
        elif source.needs_capture:
            self._capture = Capture(model, clear_on_call_of=model, grad_hooks=False)
            self._capture.keep_outputs = {m for m in self._capture.names
                                          if plugin_for(m).needs_output}
            self._capture.start()
            self._capture.set_recording(self._stats_due())

    # -- schedule ------------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Steps taken so far (``t`` of the schedule)."""
        return self._step_count

    def _stats_due(self) -> bool:
        t = self._step_count
        return any(t % int(g["stat_every"]) == 0 for g in self.param_groups)

    # -- the two calls of the training loop -----------------------------------------------------

    def backward(self, outputs: Tensor, targets: Tensor, *, key: Any = None,
                 sample_ids: Tensor | None = None) -> Tensor:
        """Mean loss with the likelihood, the source's statistics when due, then backward.

        With a vector structure (TNT…) this is the ordinary backward pass plus the source's
        passes. With a batch structure (``smw``, ``coefficient_sharing``) it computes the
        preconditioned gradient and adds it to ``.grad`` of the covered parameters (and the
        plain mean gradient to the others); :meth:`step` then applies momentum and weight
        decay. ``key`` and ``sample_ids`` are for ``coefficient_sharing`` (see its docs).

        Returns the (detached) mean loss.
        """
        if self._batch:
            return self._batch_backward(outputs, targets, key, sample_ids)
        if key is not None or sample_ids is not None:
            raise TypeError(
                f"key= and sample_ids= are used by batch structures (coefficient_sharing); "
                f"{self.structure!r} does not use them"
            )
        loss = self.likelihood.mean_loss(outputs, targets)
        if self._stats_due():
            self._pending = self.source.collect(
                self.model, self.likelihood, outputs, targets, capture=self._capture,
                generator=self.generator)
        loss.backward()
        if self._capture is not None:
            self._capture.release_outputs()
        return loss.detach()

    def _batch_backward(self, outputs: Tensor, targets: Tensor, key: Any,
                        sample_ids: Tensor | None) -> Tensor:
        if targets is None:
            raise ValueError(f"{self.structure!r} preconditions the data's gradient: pass the "
                             f"batch's targets to opt.backward(outputs, targets)")
        capture = self._capture
        assert capture is not None
        losses = self.likelihood.loss(outputs, targets)
        n = int(losses.shape[0])
        context = BatchContext(
            step=self._step_count, batch_size=n, key=key, sample_ids=sample_ids,
            params=self._covered, owners=self._owners_of, damping=self._damping_by_name(),
            damping_rule=self.damping_rule, solver=self.solver, store=self.structure_state)
        try:
            mean = losses.detach().mean()
            directions, plain, planned = self._precondition(context, outputs, targets, losses,
                                                            mean)
        finally:
            capture.release_outputs()
            capture.clear()
        with torch.no_grad():
            for name, d in directions.items():
                _accumulate(self._covered[name], d)
            for p, g in zip(self._plain, plain, strict=True):
                if g is not None:
                    _accumulate(p, g / n)
        if planned:
            self.structure.commit(context)
        self.last_refresh = dict(context.report)
        if context.report.get("skipped"):
            warnings.warn(
                f"{context.report['skipped']} block(s) had per-sample statistics that were not "
                f"finite or could not be solved even in float64 with raised damping; they do "
                f"not move this step", RuntimeWarning, stacklevel=3)
        self._prepared = True
        return mean

    def _damping_by_name(self) -> dict[str, float]:
        """Covered parameter name → its group's ``damping`` (rebuilt only when a group's value
        changed, e.g. by a scheduler)."""
        values = tuple(float(g["damping"]) for g in self.param_groups)
        if values != self._dampings[0]:
            self._dampings = (values, {name: float(g["damping"])
                                       for name, g in self._group_of.items()})
        return self._dampings[1]

    def _precondition(self, context: BatchContext, outputs: Tensor, targets: Tensor,
                      losses: Tensor, mean: Tensor
                      ) -> tuple[dict[str, Tensor], list[Tensor | None], bool]:
        """The covered parameters' directions, the plain parameters' summed gradients, and
        whether the structure planned this step (nothing is covered: it is not asked)."""
        if not self._covered:
            grads = torch.autograd.grad(losses.sum(), self._plain, allow_unused=True)
            return {}, list(grads), False
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
            return directions, plain, True
        if plan.coefficients is not None:
            directions, plain = self._weighted_backward(losses, plan.coefficients)
            return directions, plain, True
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
        return directions, plain, True

    def _weighted_backward(self, losses: Tensor, coefficients: dict[str, Tensor]
                           ) -> tuple[dict[str, Tensor], list[Tensor | None]]:
        """One backward pass to the layer outputs; each layer's ``Σ_n c_n g_n`` is formed by
        its plugin as soon as that layer's ``Z`` arrives (as autograd forms a weight
        gradient), so nothing waits for the end of the pass."""
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
                if name not in out:  # a module that was not called
                    out[name] = torch.zeros_like(
                        p, dtype=torch.promote_types(p.dtype, torch.float32))
        return out, plain

    def _items(self, group: dict) -> list[tuple[str, nn.Parameter, dict]]:
        items = []
        for p in group["params"]:
            if not self.structure.covers(p, self._owner_modules[self._owner_names[id(p)]]):
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
        """One step along the structure's direction for the momentum (see the module)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self._step_count
        if self._batch:
            if not self._prepared:
                raise RuntimeError(
                    f"{self.structure!r} preconditions the gradient inside opt.backward("
                    f"outputs, targets): call it instead of loss.backward() before each step"
                )
            self._prepared = False
        stats, self._pending = self._pending, None
        for group in self.param_groups:
            items = [] if self._batch else self._items(group)
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
        self._step_count += 1
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
        if self._batch:
            raise TypeError(
                f"warm_start averages running statistics; {self.structure!r} keeps none (it "
                f"preconditions each batch from that batch's statistics)"
            )
        count = 0
        if self._capture is not None:
            self._capture.set_recording(True)
        for inputs, targets in batches:
            outputs = self.model(inputs)
            stats = self.source.collect(self.model, self.likelihood, outputs, targets,
                                        capture=self._capture, generator=self.generator)
            for group in self.param_groups:
                items = self._items(group)
                if items:
                    self.structure.update(items, stats, ema=float(group["ema"]), average=True)
            if self._capture is not None:
                self._capture.clear()
            count += 1
        if count == 0:
            raise ValueError("warm_start got no batches")
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

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the step count and the generator state."""
        sd = super().state_dict()
        sd["curvlib"] = {"step": self._step_count, "generator": self.generator.get_state(),
                         "structure": self.structure_state}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything. Tensor state keeps its saved dtype and values bit for bit
        (torch would cast floating state to each parameter's dtype, which would round
        float32 curvature of a bf16 model)."""
        extra = state_dict.get("curvlib")
        plain = {k: v for k, v in state_dict.items() if k != "curvlib"}
        saved = {index: {name: v for name, v in st.items() if isinstance(v, Tensor)}
                 for index, st in plain["state"].items()}
        super().load_state_dict(plain)
        params = [p for g in self.param_groups for p in g["params"]]
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
        if self._capture is not None:
            self._capture.set_recording(self._batch or self._stats_due())

    def __del__(self) -> None:
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.stop()

    def close(self) -> None:
        """Remove the capture hooks (only sources with per-sample statistics install them)."""
        if self._capture is not None:
            self._capture.stop()
            self._capture = None

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


def _owner_of(model: nn.Module, param: nn.Parameter) -> nn.Module | None:
    """The first module (in ``named_modules`` order) that owns ``param`` directly."""
    for module in model.modules():
        if any(q is param for q in module.parameters(recurse=False)):
            return module
    return None


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


def _check_hyper(h: dict) -> None:
    if h["lr"] < 0:
        raise ValueError(f"lr must be non-negative, got {h['lr']}")
    if h["damping"] < 0:
        raise ValueError(f"damping must be non-negative, got {h['damping']}")
    if not 0 <= h["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']}")
    if not 0 <= h["ema"] < 1:
        raise ValueError(f"ema must be in [0, 1), got {h['ema']}")
    for key in ("stat_every", "inverse_every"):
        if int(h[key]) != h[key] or h[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {h[key]!r}")


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
