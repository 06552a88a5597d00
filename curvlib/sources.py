r"""Curvature sources (kind ``source``): a batch in, :class:`Statistics` out.

A source decides *which targets* the gradients use and *what* it hands to a structure:

================  ====================  =====================================================
name              targets               statistics
================  ====================  =====================================================
``true_fisher``   sampled ``y ~ p(·|f)``  batch-averaged sampled gradients (TNT), or per-sample
                  (``num_samples`` S)    gradients with ``per_sample=True``
``empirical``     the data's targets     per-sample gradients (and everything derived)
``gram``          data (or ``sampled``)  per-sample Gram blocks and weighted gradients
================  ====================  =====================================================

:class:`Statistics` is the one type every source returns. Its quantities are computed on
demand from what the source recorded and cached:

* :meth:`Statistics.batch_grads` — ``(S, *shape)`` per parameter: draw ``s``'s gradient of
  the mean loss, ``(1/N) Σ_n g_{n,s}``;
* :meth:`Statistics.per_sample_grads` — ``(S·N, *shape)``: rows ordered draw-major
  (``row = s·N + n``), each ``g_{n,s}`` not divided by ``N``;
* :meth:`Statistics.gram` — ``(S·N, S·N)`` per parameter, ``UᵀU`` of those rows;
* :meth:`Statistics.weighted_grads` — ``Σ_r c_r g_r`` for coefficients over the rows (one
  vector for every parameter, or one per parameter);
* :meth:`Statistics.row_dots` — ``⟨g_r, v⟩`` for every row and a parameter-shaped ``v``
  (``Uᵀv``);
* :meth:`Statistics.kfac_factors` — per layer (module name).

With these rows, ``(1/(S·N)) Σ_r g_r g_rᵀ`` is the MC Fisher (sampled) or the empirical
Fisher (data targets) of :mod:`curvlib.testing.oracles`. Per-sample quantities go through
the layer plugins (:mod:`curvlib.layers`), so registered layers never materialise what
they need not. Randomness comes only from the caller's :class:`torch.Generator`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from curvlib.capture import Call, Capture
from curvlib.errors import CurvlibError
from curvlib.layers.base import LayerPlugin, plugin_for, trainable_parameters
from curvlib.likelihoods import Likelihood, as_likelihood
from curvlib.registry import register, resolve

__all__ = [
    "PROVIDES",
    "DataLayout",
    "Empirical",
    "GramSource",
    "Source",
    "SourceError",
    "Statistics",
    "TrueFisher",
    "as_source",
    "check_mergeable",
    "data_layout",
    "data_pass",
    "gram",
    "merge_statistics",
    "per_sample_grads",
    "weighted_layer_grads",
]

#: Names of the quantities a source can provide (``Source.provides``).
PROVIDES: tuple[str, ...] = (
    "batch_grads", "per_sample_grads", "gram", "weighted_grads", "row_dots", "kfac_factors"
)


class SourceError(CurvlibError, RuntimeError):
    """A source cannot produce what was asked (the message says what would)."""


@dataclass
class _Layer:
    """One watched module with its plugin, its row-stacked calls and its parameters."""

    name: str
    module: nn.Module
    plugin: LayerPlugin
    calls: list[Call]
    params: dict[str, str]  # local name -> global parameter name


@dataclass
class Statistics:
    """The statistics a source hands to a structure (see the module docstring).

    Attributes:
        source: the name of the source that made them.
        batch_size: ``N``, samples in the batch.
        num_samples: ``S``, target draws per sample (1 with data targets).
        sampled: whether the targets were drawn from the model's predictive distribution.
        provides: the quantities this object may be asked for (a subset of
            :data:`PROVIDES`).
        loss: the mean loss with the data's targets, detached, if they were given.
        shapes: parameter name → shape, for every parameter covered, in model order.
        targets: the targets of each draw (``S`` tensors; the data's own with data targets).
    """

    source: str
    batch_size: int
    num_samples: int
    sampled: bool
    provides: frozenset[str]
    loss: Tensor | None = None
    shapes: dict[str, torch.Size] = field(default_factory=dict)
    targets: list[Tensor] = field(default_factory=list, repr=False)
    _layers: list[_Layer] = field(default_factory=list, repr=False)
    _batch_grads: dict[str, Tensor] | None = field(default=None, repr=False)
    _per_sample: dict[str, Tensor] | None = field(default=None, repr=False)
    _gram: dict[str, Tensor] | None = field(default=None, repr=False)
    _capture: Capture | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        """``S·N``: the number of per-sample gradient rows."""
        return self.batch_size * self.num_samples

    def _need(self, what: str) -> None:
        if what not in self.provides:
            offering = ", ".join(sorted(self.provides)) or "nothing"
            raise SourceError(
                f"source {self.source!r} does not provide {what!r} (it provides: "
                f"{offering}). Use a source that does: empirical or gram, or "
                f"TrueFisher(per_sample=True) for sampled per-sample quantities"
            )

    def _quiet(self) -> Any:
        return self._capture.paused() if self._capture is not None else nullcontext()

    def _owners(self) -> dict[str, list[tuple[_Layer, str]]]:
        owners: dict[str, list[tuple[_Layer, str]]] = {}
        for layer in self._layers:
            for local, name in layer.params.items():
                owners.setdefault(name, []).append((layer, local))
        return owners

    def per_sample_grads(self) -> dict[str, Tensor]:
        """Parameter name → ``(S·N, *shape)`` per-sample gradients (cached)."""
        self._need("per_sample_grads")
        if self._per_sample is None:
            out: dict[str, Tensor] = {}
            with self._quiet():
                for layer in self._layers:
                    if not layer.calls:
                        continue
                    for local, g in layer.plugin.per_sample_grads(layer.module,
                                                                   layer.calls).items():
                        name = layer.params[local]
                        out[name] = g if name not in out else out[name] + g
            self._per_sample = self._complete(out, lambda s: (self.rows, *s))
        return self._per_sample

    def gram(self) -> dict[str, Tensor]:
        """Parameter name → ``(S·N, S·N)`` per-sample Gram ``UᵀU`` (cached).

        Uses each plugin's Gram (Khatri–Rao or patch contraction where cheaper); a
        parameter shared by several modules is summed first, then its Gram is formed.
        """
        self._need("gram")
        if self._gram is None:
            seen: set[str] = set()
            shared: set[str] = set()
            for layer in self._layers:
                for name in layer.params.values():
                    (shared if name in seen else seen).add(name)
            out: dict[str, Tensor] = {}
            with self._quiet():
                for layer in self._layers:
                    if not layer.calls:
                        continue
                    if all(name in shared for name in layer.params.values()):
                        continue
                    for local, k in layer.plugin.gram(layer.module, layer.calls).items():
                        name = layer.params[local]
                        if name not in shared:
                            out[name] = k
                if shared:
                    grads = self._per_sample_raw(shared)
                    for name in shared:
                        flat = grads[name].reshape(self.rows, -1)
                        out[name] = flat @ flat.T
            self._gram = self._complete(out, lambda s: (self.rows, self.rows))
        return self._gram

    def _per_sample_raw(self, names: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._layers:
            if not layer.calls or not set(layer.params.values()) & names:
                continue
            for local, g in layer.plugin.per_sample_grads(layer.module, layer.calls).items():
                name = layer.params[local]
                if name in names:
                    out[name] = g if name not in out else out[name] + g
        return self._complete(out, lambda s: (self.rows, *s), only=names)

    @property
    def layers(self) -> dict[str, tuple[str, ...]]:
        """Module name → the names of the parameters it owns, in model order.

        A parameter owned by several modules (tied weights) is listed under the first.
        """
        out: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        for layer in self._layers:
            names = tuple(n for n in layer.params.values() if n not in seen and n in self.shapes)
            seen.update(names)
            if names:
                out[layer.name] = names
        return out

    def _coefficients_for(self, coefficients: Tensor | dict[str, Tensor],
                          names: set[str]) -> dict[str, Tensor]:
        """One coefficient vector per parameter name in ``names``, each checked."""
        if isinstance(coefficients, Tensor):
            if coefficients.dim() != 1 or coefficients.shape[0] != self.rows:
                raise ValueError(
                    f"coefficients must have shape ({self.rows},) (S·N rows), got "
                    f"{tuple(coefficients.shape)}"
                )
            return {name: coefficients for name in names}
        else:
            missing = names - set(coefficients)
            if missing:
                raise ValueError(f"no coefficients given for {sorted(missing)}")
            per = {name: coefficients[name] for name in names}
        for name, c in per.items():
            if c.dim() != 1 or c.shape[0] != self.rows:
                raise ValueError(
                    f"coefficients for {name!r} must have shape ({self.rows},) (S·N rows), "
                    f"got {tuple(c.shape)}"
                )
        return per

    def weighted_grads(self, coefficients: Tensor | dict[str, Tensor],
                       names: Any = None) -> dict[str, Tensor]:
        """Parameter name → ``Σ_r c_r g_r`` for coefficients ``(S·N,)`` over the rows.

        ``coefficients`` is one vector for every parameter, or a dict parameter name →
        vector (e.g. one per block). ``names`` restricts the result to those parameters
        (default: all covered; with a dict, its keys). Registered layers never materialise
        per-sample gradients for this (Linear: ``(c⊙Z)ᵀX``; convolution: its weight
        gradient of ``c⊙Z``); a layer asked for part of its parameters computes only those.
        """
        self._need("weighted_grads")
        if names is None:
            wanted = set(coefficients) if isinstance(coefficients, dict) else set(self.shapes)
        else:
            wanted = set(names)
        unknown = wanted - set(self.shapes)
        if unknown:
            raise ValueError(f"no statistics for parameter(s) {sorted(unknown)}")
        per = self._coefficients_for(coefficients, wanted)
        out: dict[str, Tensor] = {}
        with self._quiet():
            for layer in self._layers:
                if not layer.calls:
                    continue
                weighted_layer_grads(layer.plugin, layer.module, layer.calls, layer.params,
                                     per, out, wanted)
        return self._complete(out, lambda s: tuple(s), only=wanted)

    def row_dots(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter name → ``(S·N,)``: ``⟨g_r, v⟩`` for each row ``r`` (``Uᵀv``).

        ``vectors`` maps parameter names to parameter-shaped tensors ``v``. Registered
        layers never materialise per-sample gradients for this (Linear:
        ``Σ_t z_tᵀ V x_t``; convolution: one forward convolution with weight ``V``).
        """
        self._need("row_dots")
        unknown = set(vectors) - set(self.shapes)
        if unknown:
            raise ValueError(f"no statistics for parameter(s) {sorted(unknown)}")
        out: dict[str, Tensor] = {}
        with self._quiet():
            for layer in self._layers:
                if not layer.calls:
                    continue
                local = {loc: vectors[name] for loc, name in layer.params.items()
                         if name in vectors}
                if not local:
                    continue
                for loc, d in layer.plugin.row_dots(layer.module, layer.calls, local).items():
                    name = layer.params[loc]
                    out[name] = d if name not in out else out[name] + d
        return self._complete(out, lambda s: (self.rows,), only=set(vectors))

    def batch_grads(self) -> dict[str, Tensor]:
        """Parameter name → ``(S, *shape)``: each draw's gradient of the mean loss."""
        self._need("batch_grads")
        if self._batch_grads is None:
            n, s = self.batch_size, self.num_samples
            per_draw = []
            for k in range(s):
                c = torch.zeros(self.rows, dtype=torch.float64)
                c[k * n:(k + 1) * n] = 1.0 / n
                per_draw.append(self.weighted_grads(c))
            self._batch_grads = {
                name: torch.stack([d[name] for d in per_draw]) for name in self.shapes
            }
        return self._batch_grads

    def mode_statistics(self, dims: dict[str, tuple[int, ...]],
                        modes: dict[str, list[int]] | None = None
                        ) -> dict[str, list[Tensor | None]]:
        """Parameter name → ``[(1/R) Σ_r mat_i(g_r) mat_i(g_r)ᵀ for each mode i]`` over the
        ``R = S·N`` per-sample rows, each parameter seen with shape ``dims[name]``; only the
        modes in ``modes[name]`` (default all), ``None`` for the others.

        Layer plugins take fast paths where they have them (Linear: rank one, nothing
        materialised); a parameter shared by several modules is summed first.
        """
        self._need("per_sample_grads")
        owners = self._owners()
        shared = {name for name, own in owners.items() if len(own) > 1 and name in dims}
        out: dict[str, list[Tensor]] = {}
        with self._quiet():
            for layer in self._layers:
                if not layer.calls:
                    continue
                local = {loc: tuple(dims[name]) for loc, name in layer.params.items()
                         if name in dims and name not in shared}
                if not local:
                    continue
                local_modes = None if modes is None else {
                    loc: modes[name] for loc, name in layer.params.items() if name in modes}
                for loc, mats in layer.plugin.mode_statistics(layer.module, layer.calls,
                                                               local, local_modes).items():
                    out[layer.params[loc]] = mats
            if shared:
                from curvlib.layers.base import per_sample_mode_statistics

                grads = self._per_sample_raw(shared)
                for name in shared:
                    g = grads[name]
                    out[name] = per_sample_mode_statistics(
                        g.reshape(g.shape[0], *dims[name]),
                        None if modes is None else modes.get(name))
        ref = next((t for m in out.values() for t in m if t is not None), None)
        for name in dims:
            if name in self.shapes and name not in out:  # a module that was not called
                out[name] = [torch.zeros(d, d, dtype=ref.dtype if ref is not None else None,
                                         device=ref.device if ref is not None else None)
                             if modes is None or i in modes.get(name, [])
                             else None for i, d in enumerate(dims[name])]
        return out

    def kfac_factors(self, mode: str = "expand", modules: Iterable[str] | None = None
                     ) -> dict[str, Any]:
        """Module name → :class:`~curvlib.layers.KFACFactors` for layers whose plugin has them.

        ``modules`` restricts the answer to those module names (default: every recorded
        module). A module asked for whose plugin has no Kronecker factors raises
        :class:`~curvlib.layers.LayerPluginError` naming the module.
        """
        self._need("kfac_factors")
        wanted = None if modules is None else set(modules)
        out = {}
        with self._quiet():
            for layer in self._layers:
                if layer.calls and (wanted is None or layer.name in wanted):
                    out[layer.name] = layer.plugin.kfac_factors(layer.module, layer.calls,
                                                                mode=mode)
        return out

    def _complete(self, values: dict[str, Tensor], shape_of, only: set[str] | None = None
                  ) -> dict[str, Tensor]:
        """Model-ordered dict; zeros for parameters whose modules were not called."""
        if only is None and len(values) == len(self.shapes) and list(values) == list(
                self.shapes):
            return values  # every parameter, already in model order
        out = {}
        ref = next(iter(values.values()), None)
        for name, shape in self.shapes.items():
            if only is not None and name not in only:
                continue
            if name in values:
                out[name] = values[name]
            else:
                dtype = ref.dtype if ref is not None else torch.float32
                device = ref.device if ref is not None else None
                out[name] = torch.zeros(shape_of(shape), dtype=dtype, device=device)
        return out


def merge_statistics(parts: list[Statistics]) -> Statistics:
    """The statistics of the concatenation of several micro-batches (gradient accumulation).

    Each part is one micro-batch's :class:`Statistics` from the same source, with the same
    parameters and the same number of draws ``S``; the result is what the source would
    have given for the concatenated batch with the same targets: rows are concatenated
    (draw-major, as in one batch), batch gradients are the ``N_k/N``-weighted means of the
    parts', mode statistics and Kronecker factors (means over samples) likewise. The
    per-sample Gram matrix of the concatenation needs cross terms no part holds, so it is
    refused. :func:`check_mergeable` says why two parts cannot be merged.
    """
    if len(parts) == 1:
        return parts[0]
    return _Merged(parts)


def check_mergeable(first: Statistics, new: Statistics) -> str | None:
    """Why ``new`` cannot be merged with ``first`` (``None`` when it can)."""
    if new.num_samples != first.num_samples:
        return (f"the micro-batches drew {first.num_samples} and {new.num_samples} target(s) "
                f"per sample")
    if dict(new.shapes) != dict(first.shapes):
        return "the micro-batches recorded different parameters (a module was not called)"
    for a, b in zip(first._layers, new._layers, strict=False):
        if len(a.calls) != len(b.calls):
            return (f"module {a.name!r} was called {len(a.calls)} and {len(b.calls)} times in "
                    f"the micro-batches")
        for ca, cb in zip(a.calls, b.calls, strict=True):
            sa = [tuple(t.shape[1:]) for t in ca.inputs if isinstance(t, Tensor)]
            sb = [tuple(t.shape[1:]) for t in cb.inputs if isinstance(t, Tensor)]
            if sa != sb:
                return (f"module {a.name!r} saw inputs of shapes {sa} and {sb} (beyond the "
                        f"batch dimension) in the micro-batches")
    if len(first._layers) != len(new._layers):
        return "the micro-batches recorded different modules"
    return None


class _Merged(Statistics):
    """Statistics of concatenated micro-batches (see :func:`merge_statistics`)."""

    def __init__(self, parts: list[Statistics]):
        first = parts[0]
        loss = None
        n = sum(p.batch_size for p in parts)
        if all(p.loss is not None for p in parts):
            loss = sum(p.loss * (p.batch_size / n) for p in parts)
        targets = [torch.cat([p.targets[s] for p in parts]) for s in range(first.num_samples)] \
            if all(len(p.targets) == first.num_samples for p in parts) else []
        super().__init__(first.source, n, first.num_samples, first.sampled, first.provides,
                         loss, dict(first.shapes), targets, first._layers,
                         _capture=first._capture)
        self.parts = parts

    def _weights(self) -> list[float]:
        return [p.batch_size / self.batch_size for p in self.parts]

    def _rows(self, per_part: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Concatenate row-indexed tensors of the parts, draw-major over the whole batch."""
        s = self.num_samples
        out = {}
        for name in per_part[0]:
            blocks = [d[name].reshape(s, p.batch_size, *d[name].shape[1:])
                      for d, p in zip(per_part, self.parts, strict=True)]
            cat = torch.cat(blocks, 1)
            out[name] = cat.reshape(s * self.batch_size, *cat.shape[2:])
        return out

    def _split(self, c: Tensor) -> list[Tensor]:
        """A ``(S·N,)`` vector over the whole batch as the parts' ``(S·N_k,)`` vectors."""
        s = self.num_samples
        c = c.reshape(s, self.batch_size)
        sizes = [p.batch_size for p in self.parts]
        return [b.reshape(-1) for b in torch.split(c, sizes, dim=1)]

    def per_sample_grads(self) -> dict[str, Tensor]:
        """The parts' per-sample gradients, rows concatenated (draw-major)."""
        self._need("per_sample_grads")
        if self._per_sample is None:
            self._per_sample = self._rows([p.per_sample_grads() for p in self.parts])
        return self._per_sample

    def gram(self) -> dict[str, Tensor]:
        """Refused: the Gram matrix of concatenated micro-batches needs cross terms."""
        raise SourceError(
            "the per-sample Gram matrix of accumulated micro-batches needs the cross terms "
            "between them, which no micro-batch holds: call opt.backward once per step with "
            "this structure")

    def weighted_grads(self, coefficients: Tensor | dict[str, Tensor],
                       names: Any = None) -> dict[str, Tensor]:
        """``Σ_r c_r g_r`` over the rows of all parts."""
        self._need("weighted_grads")
        if isinstance(coefficients, Tensor):
            pieces: list[Any] = self._split(coefficients)
        else:
            split = {k: self._split(v) for k, v in coefficients.items()}
            pieces = [{k: v[i] for k, v in split.items()} for i in range(len(self.parts))]
        total: dict[str, Tensor] = {}
        for part, c in zip(self.parts, pieces, strict=True):
            for name, g in part.weighted_grads(c, names).items():
                total[name] = g if name not in total else total[name] + g
        return total

    def row_dots(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``⟨g_r, v⟩`` for the rows of all parts (draw-major)."""
        self._need("row_dots")
        per = [p.row_dots(vectors) for p in self.parts]
        return {name: t.reshape(-1) for name, t in
                self._rows([{k: v.unsqueeze(-1) for k, v in d.items()} for d in per]).items()}

    def batch_grads(self) -> dict[str, Tensor]:
        """Each draw's gradient of the mean loss over the whole batch: ``Σ_k (N_k/N) ḡ_k``."""
        self._need("batch_grads")
        if self._batch_grads is None:
            out: dict[str, Tensor] = {}
            for part, w in zip(self.parts, self._weights(), strict=True):
                for name, g in part.batch_grads().items():
                    out[name] = g * w if name not in out else out[name] + g * w
            self._batch_grads = out
        return self._batch_grads

    def mode_statistics(self, dims: dict[str, tuple[int, ...]],
                        modes: dict[str, list[int]] | None = None
                        ) -> dict[str, list[Tensor | None]]:
        """The ``R_k/R``-weighted mean of the parts' mode statistics (means over rows)."""
        self._need("per_sample_grads")
        out: dict[str, list[Tensor | None]] = {}
        for part, w in zip(self.parts, self._weights(), strict=True):
            for name, mats in part.mode_statistics(dims, modes).items():
                scaled = [None if m is None else m * w for m in mats]
                if name not in out:
                    out[name] = scaled
                else:
                    out[name] = [a if b is None else a + b
                                 for a, b in zip(out[name], scaled, strict=True)]
        return out

    def kfac_factors(self, mode: str = "expand", modules: Iterable[str] | None = None
                     ) -> dict[str, Any]:
        """The ``N_k/N``-weighted means of the parts' factors (both are means over samples)."""
        from dataclasses import replace

        self._need("kfac_factors")
        wanted = None if modules is None else list(modules)
        out: dict[str, Any] = {}
        for part, w in zip(self.parts, self._weights(), strict=True):
            for name, f in part.kfac_factors(mode, wanted).items():
                if name not in out:
                    out[name] = replace(f, input_cov=f.input_cov * w, grad_cov=f.grad_cov * w)
                else:
                    g = out[name]
                    out[name] = replace(g, input_cov=g.input_cov + f.input_cov * w,
                                        grad_cov=g.grad_cov + f.grad_cov * w)
        return out


def weighted_layer_grads(plugin: LayerPlugin, module: nn.Module, calls: list[Call],
                         params: dict[str, str], coefficients: dict[str, Tensor],
                         out: dict[str, Tensor], wanted: Any = None) -> None:
    """Add one module's ``Σ_r c_r g_r`` to ``out`` (parameter name → tensor).

    ``params`` maps the module's local parameter names to global ones, ``coefficients``
    global names to ``(R,)`` vectors; only names in ``wanted`` (default: all) are formed.
    One plugin call per distinct coefficient vector, asking only for its parameters. Used by
    :meth:`Statistics.weighted_grads` and by the optimizer's shared steps, which call it for
    each call's ``Z`` as the backward pass produces it.
    """
    by_vector: dict[int, list[str]] = {}
    for loc, name in params.items():
        if wanted is None or name in wanted:
            by_vector.setdefault(id(coefficients[name]), []).append(loc)
    for locs in by_vector.values():
        c = coefficients[params[locs[0]]]
        if c.device != calls[0].grad_output.device:
            c = c.to(calls[0].grad_output.device)
        if len(locs) == len(params):
            grads = plugin.weighted_grads(module, calls, c)
        else:
            grads = plugin.weighted_grads(module, calls, c, params=locs)
        for loc in locs:
            name, g = params[loc], grads[loc]
            out[name] = g if name not in out else out[name] + g


class Source(abc.ABC):
    """Base class of curvature sources (kind ``source``).

    A source turns one batch — the model outputs of a forward pass made under a
    :class:`~curvlib.capture.Capture`, and the data targets — into :class:`Statistics`.
    It may run backward passes (with ``retain_graph=True``, so the caller's own backward
    still works) but never touches parameter ``.grad``.
    """

    #: Registry name.
    name: ClassVar[str] = ""

    @property
    @abc.abstractmethod
    def provides(self) -> frozenset[str]:
        """The quantities its statistics offer (a subset of :data:`PROVIDES`)."""

    @property
    def needs_capture(self) -> bool:
        """Whether :meth:`collect` needs the forward pass recorded by a capture."""
        return True

    @property
    def needs_targets(self) -> bool:
        """Whether :meth:`collect` needs the data's targets."""
        return True

    def needs_capture_for(self, needs: frozenset[str]) -> bool:
        """Whether :meth:`collect` needs the layer records to provide ``needs`` (names in
        :data:`PROVIDES`). Default: :attr:`needs_capture`. curvlib's sources give
        ``batch_grads`` alone from ordinary backward passes, without records, so that a
        structure that needs only batch gradients (``tensor_normal``, ``shampoo``,
        ``diagonal``) works on any model, whatever its modules return."""
        return self.needs_capture

    @abc.abstractmethod
    def collect(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        outputs: Tensor,
        targets: Tensor | None,
        *,
        capture: Capture | None = None,
        generator: torch.Generator | None = None,
    ) -> Statistics:
        """Statistics of one batch (see the class docstring)."""

    @classmethod
    def examples(cls) -> list[Source]:
        """Configured instances the composition-matrix test assembles with every registered
        structure and solver (default: the default configuration)."""
        return [cls()]

    @property
    def shares_data_pass(self) -> bool:
        """Whether :meth:`from_data_pass` gives this source's statistics (default: no)."""
        return False

    def from_data_pass(self, data: Statistics) -> Statistics | None:
        """This source's statistics taken from the optimizer's data pass, if they are there.

        Structures that precondition per batch (``smw``) run one backward pass of the data
        loss to the layer outputs anyway (:func:`data_pass`); a source whose statistics are
        exactly those rows (data targets) returns them here, so no second pass is made.
        Default: ``None`` (the optimizer calls :meth:`collect`).
        """
        return None


def _batch_statistics(name: str, model: nn.Module, lik: Likelihood, outputs: Tensor,
                      targets: Tensor | None, draws: list[Tensor], sampled: bool,
                      capture: Capture | None) -> Statistics:
    """Statistics holding only ``batch_grads``: ``∂/∂θ`` of each draw's mean loss, one
    ordinary backward pass per draw (graph retained), for every trainable parameter."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_draw = []
    with capture.paused() if capture is not None else nullcontext():
        for y in draws:
            g = torch.autograd.grad(lik.mean_loss(outputs, y), list(named.values()),
                                    retain_graph=True, allow_unused=True)
            per_draw.append([torch.zeros_like(p) if gi is None else gi
                             for gi, p in zip(g, named.values(), strict=True)])
    if len(per_draw) == 1:  # no copy for the common single draw
        batch = {n: per_draw[0][i].detach().unsqueeze(0) for i, n in enumerate(named)}
    else:
        batch = {n: torch.stack([d[i] for d in per_draw]).detach()
                 for i, n in enumerate(named)}
    loss = None
    if targets is not None:
        with torch.no_grad():
            loss = lik.mean_loss(outputs.detach(), targets)
    return Statistics(name, int(outputs.shape[0]), len(draws), sampled,
                      frozenset({"batch_grads"}), loss, {n: p.shape for n, p in named.items()},
                      list(draws), _batch_grads=batch)


def _trainable_names(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def _stack_calls(calls: list[Call], grads: list[list[Tensor]]) -> list[Call]:
    """Row-stack ``S`` backward passes: inputs repeated, output gradients concatenated."""
    if len(grads) == 1:
        return [Call(c.inputs, c.kwargs, c.output, g, c.output_version)
                for c, g in zip(calls, grads[0], strict=True)]
    s = len(grads)
    stacked = []
    for i, c in enumerate(calls):
        n = c.batch_size

        def rep(v: Any, n: int = n) -> Any:
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
                return v.unsqueeze(0).expand(s, *v.shape).reshape(s * n, *v.shape[1:])
            return v

        z = torch.cat([g[i] for g in grads], 0)
        stacked.append(Call(tuple(rep(v) for v in c.inputs),
                            {k: rep(v) for k, v in c.kwargs.items()}, None, z))
    return stacked


class _OutputGradientSource(Source):
    """Shared machinery: backward passes to the layer outputs with data or sampled targets."""

    _provides: ClassVar[frozenset[str]] = frozenset(PROVIDES)

    def __init__(self, *, targets: Literal["data", "sampled"] = "data", num_samples: int = 1):
        if targets not in ("data", "sampled"):
            raise ValueError(f"targets must be 'data' or 'sampled', got {targets!r}")
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if targets == "data" and num_samples != 1:
            raise ValueError("num_samples > 1 needs sampled targets (targets='sampled')")
        self.targets = targets
        self.num_samples = int(num_samples)

    @property
    def provides(self) -> frozenset[str]:
        """See :data:`PROVIDES`."""
        return self._provides

    @property
    def needs_targets(self) -> bool:
        """Only data targets need the caller's targets."""
        return self.targets == "data"

    def needs_capture_for(self, needs: frozenset[str]) -> bool:
        """Records are needed for anything beyond ``batch_grads``."""
        return not needs <= {"batch_grads"}

    def _draws(self, likelihood: Likelihood, outputs: Tensor, targets: Tensor | None,
               generator: torch.Generator | None) -> list[Tensor]:
        if self.targets == "data":
            if targets is None:
                raise SourceError(
                    f"source {self.name!r} uses the data's targets, but none were given; pass "
                    f"targets, or use the true_fisher source to sample them"
                )
            return [targets]
        detached = outputs.detach()
        if not bool(torch.isfinite(detached.sum())):
            # a diverging model: sample anyway (the gradients will be non-finite and the
            # structures skip them) rather than crash inside the likelihood's sampler
            detached = torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0)
        return [likelihood.sample(detached, generator=generator)
                for _ in range(self.num_samples)]

    def collect(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        outputs: Tensor,
        targets: Tensor | None,
        *,
        capture: Capture | None = None,
        generator: torch.Generator | None = None,
    ) -> Statistics:
        """Backward passes of the summed per-sample losses to the recorded layer outputs.

        Without a ``capture`` the statistics hold only ``batch_grads`` (each draw's gradient
        of the mean loss, from one ordinary backward pass per draw, for every trainable
        parameter of the model): what structures that need nothing else use.
        """
        lik = as_likelihood(likelihood)
        if capture is None:
            draws = self._draws(lik, outputs, targets, generator)
            return _batch_statistics(self.name, model, lik, outputs, targets, draws,
                                     self.targets == "sampled", None)
        draws = self._draws(lik, outputs, targets, generator)
        grads: dict[nn.Module, list[list[Tensor]]] = {m: [] for m in capture.calls}
        with capture.paused():
            for y in draws:
                capture.backward_to_outputs(lik.loss(outputs, y).sum(), retain_graph=True)
                for module, calls in capture.calls.items():
                    grads[module].append([c.grad_output for c in calls])
        loss = None
        if targets is not None:
            with torch.no_grad():
                loss = lik.mean_loss(outputs.detach(), targets)
        return _statistics(self.name, model, capture, grads, draws, self.targets == "sampled",
                           self.provides, int(outputs.shape[0]), loss)

    @property
    def shares_data_pass(self) -> bool:
        """With data targets the optimizer's data pass holds exactly these rows."""
        return self.targets == "data"

    def from_data_pass(self, data: Statistics) -> Statistics | None:
        """With data targets, the optimizer's own data pass already holds these statistics."""
        if self.targets != "data":
            return None
        return _relabel(data, self.name, self.provides)


@dataclass(frozen=True)
class DataLayout:
    """Which recorded modules hold which parameters, with their plugins: what
    :func:`data_pass` would otherwise look up on every call (see :func:`data_layout`)."""

    layers: tuple[tuple[nn.Module, str, LayerPlugin, dict[str, str]], ...]
    shapes: dict[str, torch.Size]


def data_layout(capture: Capture, parameters: dict[str, Tensor]) -> DataLayout:
    """The layout of ``parameters`` (name → parameter, model order) over the modules
    ``capture`` watches. Plugins are resolved now: build it again after registering a new
    layer plugin."""
    index = {id(p): n for n, p in parameters.items()}
    layers = []
    for module in capture.calls:
        params = {k: index[id(p)] for k, p in module._parameters.items()
                  if p is not None and id(p) in index}
        if params:
            layers.append((module, capture.names[module], plugin_for(module), params))
    covered = {n for *_, params in layers for n in params.values()}
    shapes = {n: p.shape for n, p in parameters.items() if n in covered}
    return DataLayout(tuple(layers), shapes)


def _statistics(name: str, model: nn.Module, capture: Capture,
                grads: dict[nn.Module, list[list[Tensor]]], draws: list[Tensor], sampled: bool,
                provides: frozenset[str], batch_size: int, loss: Tensor | None,
                layout: DataLayout | None = None) -> Statistics:
    """Statistics from the calls a capture recorded and the output gradients of each draw.

    ``layout`` (from :func:`data_layout`) limits them to its parameters and spares walking
    the model and the registry (the optimizer passes one, every step).
    """
    if layout is not None:
        layers = [_Layer(lname, module, plugin,
                         _stack_calls(capture.calls[module], grads[module])
                         if capture.calls[module] else [], params)
                  for module, lname, plugin, params in layout.layers]
        return Statistics(name, batch_size, len(draws), sampled, provides, loss, layout.shapes,
                          list(draws), layers, _capture=capture)
    index = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    layers = []
    for module, calls in capture.calls.items():
        local = trainable_parameters(module)
        params = {k: index[id(p)] for k, p in local.items() if id(p) in index}
        if not params:
            continue
        stacked = _stack_calls(calls, grads[module]) if calls else []
        layers.append(_Layer(capture.names[module], module, plugin_for(module), stacked, params))
    covered = {n for layer in layers for n in layer.params.values()}
    shapes = {n: s for n, s in _trainable_names(model).items() if n in covered}
    return Statistics(name, batch_size, len(draws), sampled, provides, loss, shapes,
                      list(draws), layers, _capture=capture)


def _relabel(data: Statistics, name: str, provides: frozenset[str]) -> Statistics:
    """The same rows under another source's name and offer (caches shared from then on)."""
    out = Statistics(name, data.batch_size, data.num_samples, data.sampled, provides,
                     data.loss, data.shapes, data.targets, data._layers, _capture=data._capture)
    out._gram, out._per_sample = data._gram, data._per_sample
    return out


#: What the statistics of :func:`data_pass` offer.
DATA_PASS_PROVIDES = frozenset({"per_sample_grads", "gram", "weighted_grads", "row_dots"})


def data_pass(model: nn.Module, likelihood: Any, outputs: Tensor, targets: Tensor,
              capture: Capture, *, losses: Tensor | None = None,
              also: tuple[Tensor, ...] = (), layout: DataLayout | None = None,
              mean_loss: Tensor | None = None) -> tuple[Statistics, list[Tensor | None]]:
    """One backward pass of the summed data loss to the recorded layer outputs.

    This is the ordinary backward pass of training, stopped at the layer outputs (FNGD,
    Section IV-C): no parameter gradient of a recorded layer is formed. ``also`` are
    tensors (parameters outside the recorded layers) whose gradients of ``Σ_n ℓ_n`` are
    computed in the same pass and returned (``None`` where unused). ``losses`` are the
    per-sample losses if already computed, ``mean_loss`` their detached mean;
    ``layout`` (:func:`data_layout`) restricts the statistics to its parameters.

    Returns the data rows as :class:`Statistics` (source name ``"data"``) and those
    gradients.
    """
    if losses is None:
        losses = as_likelihood(likelihood).loss(outputs, targets)
    with capture.paused():
        extra = capture.backward_to_outputs(losses.sum(), also=tuple(also))
    grads = {m: [[c.grad_output for c in calls]] for m, calls in capture.calls.items()}
    stats = _statistics("data", model, capture, grads, [targets], False, DATA_PASS_PROVIDES,
                        int(outputs.shape[0]),
                        losses.detach().mean() if mean_loss is None else mean_loss, layout)
    return stats, extra


@register("source", "true_fisher")
class TrueFisher(_OutputGradientSource):
    """Gradients with targets sampled from the model: ``y ~ p(· | f(x))``, ``S`` draws.

    Args:
        num_samples: ``S``, draws per sample.
        per_sample: ``False`` (default, as TNT): only the batch-averaged sampled gradient
            per draw, from one ordinary backward pass each (works for any model, no
            capture needed); ``True``: per-sample sampled gradients through the layer
            plugins (everything in :data:`PROVIDES`).
    """

    name = "true_fisher"

    def __init__(self, num_samples: int = 1, per_sample: bool = False):
        super().__init__(targets="sampled", num_samples=num_samples)
        self.per_sample = bool(per_sample)

    @property
    def provides(self) -> frozenset[str]:
        """``batch_grads`` only, unless ``per_sample=True``."""
        return frozenset(PROVIDES) if self.per_sample else frozenset({"batch_grads"})

    @property
    def needs_capture(self) -> bool:
        """Only the per-sample mode needs the layer records."""
        return self.per_sample

    def needs_capture_for(self, needs: frozenset[str]) -> bool:
        """Records are needed in the per-sample mode, for anything beyond ``batch_grads``."""
        return self.per_sample and not needs <= {"batch_grads"}

    def collect(self, model, likelihood, outputs, targets, *, capture=None, generator=None):
        """Per-sample mode: as the base (``batch_grads`` alone without a ``capture``);
        batch mode: ``∂/∂θ`` of each draw's mean loss."""
        if self.per_sample:
            return super().collect(model, likelihood, outputs, targets, capture=capture,
                                   generator=generator)
        lik = as_likelihood(likelihood)
        draws = self._draws(lik, outputs, None, generator)
        return _batch_statistics(self.name, model, lik, outputs, targets, draws, True, capture)

    @classmethod
    def examples(cls) -> list[Source]:
        """TNT's batch mode, and two draws per sample with per-sample gradients."""
        return [cls(), cls(num_samples=2, per_sample=True)]

    def __repr__(self) -> str:
        return f"TrueFisher(num_samples={self.num_samples}, per_sample={self.per_sample})"


@register("source", "empirical")
class Empirical(_OutputGradientSource):
    """Per-sample gradients with the data's own targets (the empirical Fisher's rows)."""

    name = "empirical"

    def __init__(self) -> None:
        super().__init__(targets="data", num_samples=1)

    def __repr__(self) -> str:
        return "Empirical()"


@register("source", "gram")
class GramSource(_OutputGradientSource):
    """Per-sample Gram blocks ``UᵀU`` and weighted gradients (FNGD's statistics).

    Args:
        targets: ``"data"`` (default, FNGD) or ``"sampled"`` (natural gradient with the
            true Fisher's low-rank form).
        num_samples: draws per sample with sampled targets.

    It provides ``gram``, ``weighted_grads`` and ``row_dots`` (and ``per_sample_grads`` for
    checks), not Kronecker factors or batch gradients: structures that need those should say
    so.
    """

    name = "gram"
    _provides = frozenset({"gram", "weighted_grads", "row_dots", "per_sample_grads"})

    def __init__(self, targets: Literal["data", "sampled"] = "data", num_samples: int = 1):
        super().__init__(targets=targets, num_samples=num_samples)

    @classmethod
    def examples(cls) -> list[Source]:
        """Data targets (FNGD) and sampled targets (the true Fisher's low-rank form)."""
        return [cls(), cls(targets="sampled")]

    def __repr__(self) -> str:
        return f"GramSource(targets={self.targets!r}, num_samples={self.num_samples})"


def as_source(source: str | Source | type[Source], **options: Any) -> Source:
    """A source object from a registered name, a class or an object.

    ``options`` are passed to the constructor for names and classes.
    """
    return resolve("source", source, Source, **options)


def _run(model: nn.Module, likelihood: Any, inputs: Any, targets: Tensor | None,
         source: str | Source, generator: torch.Generator | None, what: str, verify: bool
         ) -> Statistics:
    if isinstance(source, str) and source == "true_fisher":
        src: Source = TrueFisher(per_sample=True)
    else:
        src = as_source(source)
    if what not in src.provides:
        raise SourceError(
            f"source {src!r} does not provide {what!r}; pass source='empirical', 'gram' or "
            f"TrueFisher(per_sample=True)"
        )
    lik = as_likelihood(likelihood)
    if not src.needs_targets:
        targets = None
    with torch.enable_grad(), Capture(model) as cap:  # also inside a caller's no_grad()
        outputs = model(inputs)
        stats = src.collect(model, lik, outputs, targets, capture=cap, generator=generator)
        if verify:
            _verify(model, lik, outputs, stats)
    cap.release_outputs()
    return stats


def _verify(model: nn.Module, lik: Likelihood, outputs: Tensor, stats: Statistics) -> None:
    """Σ_n g_n of every draw must equal autograd's gradient of that draw's summed loss.

    Catches a parameter used outside the forward of the modules that own it (no hook sees
    such a use), at the cost of one ordinary backward pass per draw.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and n in stats.shapes}
    n = stats.batch_size
    for s, y in enumerate(stats.targets):
        c = torch.zeros(stats.rows, dtype=torch.float64)
        c[s * n:(s + 1) * n] = 1.0
        summed = stats.weighted_grads(c)
        true = torch.autograd.grad(lik.loss(outputs, y).sum(), list(named.values()),
                                   retain_graph=True, allow_unused=True)
        for (name, p), g in zip(named.items(), true, strict=True):
            g = torch.zeros_like(p) if g is None else g
            got = summed[name].to(g.dtype)
            tol = torch.finfo(p.dtype).eps ** 0.5
            scale = g.norm().clamp_min(torch.finfo(g.dtype).tiny)
            if (got - g).norm() > tol * scale + torch.finfo(g.dtype).tiny:
                raise SourceError(
                    f"the per-sample gradients of {name!r} do not add up to its gradient "
                    f"(relative difference {((got - g).norm() / scale).item():.2e}): the "
                    f"parameter is used outside the forward of the module that owns it (e.g. "
                    f"functionally, as in `h @ emb.weight.T`), where no layer hook sees it. "
                    f"Wrap that use in a module; pass verify=False to skip this check"
                )


def _backend(backend: str) -> str:
    if backend not in ("curvlib", "backpack"):
        raise ValueError(f"backend must be 'curvlib' or 'backpack', got {backend!r}")
    return backend


def per_sample_grads(
    model: nn.Module,
    likelihood: Any,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    source: str | Source = "empirical",
    generator: torch.Generator | None = None,
    backend: Literal["curvlib", "backpack"] = "curvlib",
    verify: bool = True,
) -> dict[str, Tensor]:
    """Per-sample gradients ``g_n = ∂ℓ_n/∂θ`` by parameter name, each ``(N, *shape)``.

    With a source drawing ``S`` targets per sample the rows are ``S·N``, draw-major.

    Args:
        model: any module; registered layers use their plugins, others ``torch.func``.
        likelihood: a registered name or a :class:`~curvlib.likelihoods.Likelihood`.
        inputs: the batch, passed as ``model(inputs)``.
        targets: the data's targets (ignored by ``true_fisher``, which samples them).
        source: ``"empirical"`` (data targets), ``"true_fisher"`` (one sampled target per
            sample), ``"gram"``, or a source object (e.g. ``TrueFisher(num_samples=4,
            per_sample=True)`` for ``(S·N, *shape)`` rows, draw-major).
        generator: the :class:`torch.Generator` sampled targets come from.
        backend: ``"curvlib"`` (default) or ``"backpack"`` (BackPACK's BatchGrad, and
            SqrtGGNMC for sampled targets, on the layers BackPACK supports; see
            :mod:`curvlib.backends.backpack`).
        verify: check that each draw's per-sample gradients add up to autograd's gradient
            (one extra ordinary backward pass); this catches parameters used outside the
            modules that own them, which no layer hook can see.

    The model is run once in its current mode; parameter ``.grad`` is not touched.
    """
    if _backend(backend) == "backpack":
        from curvlib.backends.backpack import per_sample_grads as bp_grads

        return bp_grads(model, likelihood, inputs, targets, source=source, generator=generator)
    return _run(model, likelihood, inputs, targets, source, generator,
                "per_sample_grads", verify).per_sample_grads()


def gram(
    model: nn.Module,
    likelihood: Any,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    source: str | Source = "empirical",
    generator: torch.Generator | None = None,
    backend: Literal["curvlib", "backpack"] = "curvlib",
    verify: bool = True,
) -> dict[str, Tensor]:
    """Per-sample Gram ``UᵀU`` (``N × N``, entry ``g_mᵀ g_n``) by parameter name.

    With a source drawing ``S`` targets per sample it is ``S·N × S·N`` (rows draw-major).

    Arguments as :func:`per_sample_grads`. With the curvlib backend, Linear and
    convolution layers never materialise per-sample gradients unless that is cheaper.
    """
    if _backend(backend) == "backpack":
        grads = per_sample_grads(model, likelihood, inputs, targets, source=source,
                                 generator=generator, backend="backpack")
        return {n: g.reshape(g.shape[0], -1) @ g.reshape(g.shape[0], -1).T
                for n, g in grads.items()}
    return _run(model, likelihood, inputs, targets, source, generator, "gram", verify).gram()
