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
from curvlib.likelihoods import Likelihood, as_likelihood
from curvlib.solvers import Solver, as_solver
from curvlib.sources import Source, Statistics, as_source
from curvlib.structures.base import Structure, as_structure

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
        if not solver.supports(1.0):
            raise CompatibilityError(f"solver {solver!r} cannot compute inverses (power 1)")
        self._names = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._names:
                    raise ValueError("every optimized parameter must belong to the model")
        device = next(model.parameters()).device
        if generator is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self._step_count = 0
        self._pending: Statistics | None = None
        self.last_refresh: dict[str, int] = {}
        self._capture: Capture | None = None
        if source.needs_capture:
            self._capture = Capture(model, clear_on_call_of=model)
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

    def backward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss with the likelihood, the source's statistics when due, then backward.

        Returns the (detached) mean loss.
        """
        loss = self.likelihood.mean_loss(outputs, targets)
        if self._stats_due():
            self._pending = self.source.collect(
                self.model, self.likelihood, outputs, targets, capture=self._capture,
                generator=self.generator)
        loss.backward()
        if self._capture is not None:
            self._capture.release_outputs()
        return loss.detach()

    def _items(self, group: dict) -> list[tuple[str, nn.Parameter, dict]]:
        items = []
        for p in group["params"]:
            if not self.structure.covers(p):
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
        stats, self._pending = self._pending, None
        for group in self.param_groups:
            items = self._items(group)
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    buf.mul_(mu).add_(p.grad)
                covered_p = id(p) in covered
                direction = self.structure.direction(p, state, buf) if covered_p else buf
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(direction, alpha=-lr)
        self._step_count += 1
        if self._capture is not None:
            self._capture.clear()
            self._capture.set_recording(self._stats_due())
        return loss

    # -- warm start ----------------------------------------------------------------------------

    def warm_start(self, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
        """Set the statistics to their arithmetic mean over ``batches`` at the current point.

        Each item is ``(inputs, targets)``; the model is run on the inputs, the source
        collects its statistics (no parameter is changed, no ``.grad`` is touched), and the
        structure averages them. Then the inverses are computed. Returns the number of
        batches used.
        """
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
        sd["curvlib"] = {"step": self._step_count, "generator": self.generator.get_state()}
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
        if self._capture is not None:
            self._capture.set_recording(self._stats_due())

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
    damping_rule: Any = "constant",
    params: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    **hyper: Any,
) -> CurvatureOptimizer:
    """Build an optimizer from a source, a structure and a solver (names, classes or objects).

    Args:
        model: the model; its trainable parameters are optimized unless ``params`` is given
            (a list of parameters or of param-group dicts, as for any torch optimizer).
        likelihood: a registered likelihood name or object.
        source, structure, solver, damping_rule: components (see ``curvlib.available()``).
        generator: the :class:`torch.Generator` sampled targets come from (default: one
            seeded from torch's global generator).
        hyper: ``lr``, ``damping``, ``momentum``, ``weight_decay``, ``ema``, ``stat_every``,
            ``inverse_every`` (defaults 1e-3, 1e-3, 0.9, 0, 0.9, 1, 20).

    Raises:
        CompatibilityError: the structure needs statistics the source does not provide.
    """
    return CurvatureOptimizer(
        model, likelihood, source=as_source(source), structure=as_structure(structure),
        solver=as_solver(solver), damping_rule=as_damping(damping_rule), params=params,
        generator=generator, **hyper)
