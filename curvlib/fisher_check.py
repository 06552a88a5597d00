r"""``curvlib fisher-check``: the TNT paper's Figure 1 on scikit-learn's digits.

How close is each method's direction to the block-Fisher direction along a trajectory? Ren &
Goldfarb (TNT, NeurIPS 2021, Figure 1) follow the block-Fisher method on 16 × 16 MNIST with a
256-20-20-20-20-20-10 tanh network and plot, per layer, the cosine between each method's
direction and the block-Fisher direction. This module runs that protocol on scikit-learn's
digits upsampled to 16 × 16, entirely from curvlib's components (sources
:class:`~curvlib.sources.TrueFisher` and :class:`~curvlib.sources.Empirical`; structures
``dense``, ``tensor_normal``, ``kfac``, ``shampoo``, ``diagonal``; solvers ``cholesky`` and
``eigh``), driven through the structure protocol (``update`` / ``refresh`` / ``directions``
on items; the block Fisher's direction is solved from its ``curvature_blocks`` by
:func:`curvlib.solvers.robust_solve`, which spares inverting the first layer's 5140² block) in
float64.

The protocol (``docs/cli.md`` has it in full):

* **data**: all 1797 digits, pixels / 16, upsampled 8 × 8 → 16 × 16 by
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, flattened to 256
  inputs; batches of 256 from a fresh permutation every epoch (``torch.randperm`` with a
  generator seeded by ``seed``); the ``N mod 256`` images left over at the end of an epoch (5)
  are dropped, so every batch has 256 images (7 batches per epoch);
* **model**: :func:`curvlib.cli.build_mlp` — Glorot-uniform weights from a generator seeded by
  ``seed``, zero biases, tanh, float64 — with the categorical likelihood (cross-entropy);
* **moving averages**: the averaged gradient ``m`` that every method preconditions and every
  method's statistics are warm-started by the plain average over one pass at the initial point
  (the first ``⌊N/256⌋`` batches of 256 in the data's order, the remainder dropped), then
  ``x ← 0.9 x + 0.1 x_batch`` at every iteration (:func:`curvlib.structures.base.fold`);
* **statistics**: one forward pass per batch; one draw of sampled labels ``y ~ p(·|f)`` per
  example (a generator seeded by ``seed``) feeds the block Fisher (per-sample outer products),
  KFAC (its factors) and TNT (the batch gradient at the sampled labels) — the same draw for
  all three; the data's labels feed ``m`` (the mean-loss gradient), Shampoo and Adam;
* **trajectory**: the block-Fisher method, ``θ ← θ − lr · (F_b + λI)⁻¹ m_b`` per layer ``b``
  (weight and bias together), every layer with its exact block — the first layer's is
  5140 × 5140, solved by one Cholesky factorisation per iteration (about 1 s on 2 cores);
  ``first_layer="kfac"`` lets that layer follow its KFAC direction instead (fast, but the
  trajectory, and with it the cosines of the other layers, shifts by a few hundredths);
* **compared**, at every iteration, for the same ``m`` and the same statistics, with every
  inverse refreshed: block Fisher (``dense``, ``λ`` on the whole block; cosine 1 by
  construction), TNT (``tensor_normal``, ``ε = λ`` per normalised factor), KFAC (``kfac``,
  ``√λ`` per factor), Shampoo (``shampoo``, ``(H_i + λI)^{-1/(2k)}`` per mode, data labels),
  Adam (``diagonal``, ``m / (√v + λ)``, data labels), SGD-m (``m`` itself); the cosine per
  layer is :func:`curvlib.diagnostics.cosine_similarities`.

Entry points: :func:`fisher_check` (the whole run as a JSON-ready dict), :class:`FisherCheck`
(one trajectory, step by step, for any tanh MLP — the tests use it on tiny models),
:func:`load_digits_16`, and the subcommand's :func:`add_parser` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlib._argtypes import non_negative_float as _non_negative_float
from curvlib._argtypes import positive_float as _positive_float
from curvlib._argtypes import positive_int as _positive_int
from curvlib.capture import Capture
from curvlib.damping import as_damping
from curvlib.diagnostics import cosine_similarities
from curvlib.likelihoods import as_likelihood
from curvlib.solvers import as_solver, robust_solve
from curvlib.sources import Empirical, Statistics, TrueFisher
from curvlib.structures import KFAC, Dense, Diagonal, Shampoo, TensorNormal
from curvlib.structures.base import Structure, fold

__all__ = [
    "DEFAULTS",
    "METHODS",
    "REPORTED_LAYERS",
    "WIDTHS",
    "FisherCheck",
    "Iteration",
    "add_parser",
    "dumps",
    "fisher_check",
    "format_summary",
    "load_digits_16",
    "plot_curves",
    "run",
]

#: Layer widths of the network of TNT's Figure 1 (Martens & Grosse's MNIST classifier).
WIDTHS = (256, 20, 20, 20, 20, 20, 10)
#: The methods compared, in the order of the table; "block Fisher" is the reference itself.
METHODS = ("block Fisher", "TNT", "KFAC", "Shampoo", "Adam", "SGD-m")
#: The layers (1-based) whose cosines the headline and the JSON's method lists report.
REPORTED_LAYERS = (2, 3, 4, 5)
#: Defaults of the subcommand (the protocol of issue 7, 2(a)).
DEFAULTS = dict(damping=1e-3, iters=200, lr=0.005, seed=0, batch_size=256, ema=0.9,
                first_layer="exact", first=50)
#: Digits images (scikit-learn's bundled data set).
DIGITS_SIZE = 1797
#: How the 8 × 8 digits become 16 × 16 (stated in the JSON's protocol).
INTERPOLATION = ("torch.nn.functional.interpolate(pixels / 16, size=(16, 16), "
                 "mode='bilinear', align_corners=False)")

_BENCH_HINT = 'pip install -e ".[bench]"'
F64 = torch.float64


# --------------------------------------------------------------------------- data


def load_digits_16(num_data: int = DIGITS_SIZE) -> tuple[Tensor, Tensor]:
    """The first ``num_data`` digits images upsampled to 16 × 16, flattened, and their labels.

    Pixels are divided by 16 (values in ``[0, 1]``), the ``8 × 8`` images upsampled by
    ``torch.nn.functional.interpolate(..., size=(16, 16), mode="bilinear",
    align_corners=False)`` and flattened row-major. Returns float64 inputs ``(num_data, 256)``
    and int64 labels ``(num_data,)``.

    Raises:
        ImportError: scikit-learn is not installed (the ``bench`` extra).
    """
    from curvlib.cli import load_digits_data

    inputs, labels = load_digits_data(num_data)
    images = inputs.reshape(-1, 1, 8, 8)
    up = nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return up.reshape(up.shape[0], 256).contiguous(), labels


# --------------------------------------------------------------------------- the methods


@dataclass
class _Method:
    """One compared method: a structure with its own state per parameter, which labels its
    statistics use, and the solver that inverts its factors."""

    name: str
    structure: Structure | None  # None: SGD-m (the direction is m)
    labels: str = "sampled"  # "sampled" or "data"
    solver: Any = None
    items: list[tuple[str, nn.Parameter, dict[str, Any]]] = field(default_factory=list)
    #: ``dense`` only: solve ``(F_b + λI) d = m_b`` per block (one Cholesky factorisation,
    #: no inverse formed: three times cheaper for the first layer's 5140² block)
    solve: bool = False
    damping: float = math.nan

    def update(self, sampled: Statistics, data: Statistics, *, ema: float,
               average: bool) -> None:
        if self.structure is not None:
            stats = sampled if self.labels == "sampled" else data
            self.structure.update(self.items, stats, ema=ema, average=average)

    def refresh(self, damping: float) -> None:
        if self.solve:
            self.damping = damping  # the direction is solved for directly (directions)
            return
        if self.structure is not None:
            rule = as_damping("constant")
            report = self.structure.refresh(
                self.items, solver=self.solver, damping=lambda mats: rule(damping, mats))
            if report.get("kept") or report.get("recovered"):
                raise RuntimeError(
                    f"{self.name}: {report} — a factor could not be inverted at damping "
                    f"{damping:g}; the comparison would not be of the stated method")

    def directions(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.structure is None:
            return {n: v.clone() for n, v in vectors.items()}
        if self.solve:
            return self._solved(vectors)
        names = [name for name, _, _ in self.items]
        found = self.structure.directions(self.items, [vectors[n] for n in names])
        return dict(zip(names, found, strict=True))

    def _solved(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(F_b + λI)⁻¹ m_b`` per block from the structure's running ``F_b``
        (``curvature_blocks``) by :func:`~curvlib.solvers.robust_solve`; blocks of equal size
        in one call."""
        assert self.structure is not None
        by_size: dict[int, list[tuple[tuple[str, ...], Tensor]]] = {}
        for key, f in self.structure.curvature_blocks(self.items).items():
            by_size.setdefault(f.shape[0], []).append((key, f))
        out: dict[str, Tensor] = {}
        for blocks in by_size.values():
            # one block alone (the first layer's 5140²) is not copied by a stack
            mats = (blocks[0][1].unsqueeze(0) if len(blocks) == 1
                    else torch.stack([f for _, f in blocks]))
            rhs = torch.stack([torch.cat([vectors[n].reshape(-1).to(F64) for n in key])
                               for key, _ in blocks])
            result = robust_solve(self.solver, mats, self.damping, rhs)
            if bool(result.recovered.any() or result.failed.any()):
                raise RuntimeError(f"{self.name}: a block could not be solved at damping "
                                   f"{self.damping:g}")
            for (key, _), d in zip(blocks, result.solution, strict=True):
                start = 0
                for n in key:
                    size = vectors[n].numel()
                    out[n] = d[start:start + size].reshape(vectors[n].shape)
                    start += size
        return out


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(module name, module)`` of every Linear layer, in order; the model must be an MLP
    whose trainable parameters are exactly these layers' weights and biases."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    owned = {id(p) for _, m in layers for p in m.parameters()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if not layers or others:
        raise ValueError(f"fisher-check needs an MLP of Linear layers (trainable parameters "
                         f"outside Linear layers: {others})")
    for name, module in layers:
        if module.bias is None:
            raise ValueError(f"layer {name!r} has no bias; the protocol's blocks are a "
                             f"layer's weight and bias together")
    return layers


@dataclass
class Iteration:
    """What one iteration saw and computed (returned by :meth:`FisherCheck.step`).

    Attributes:
        index: the iteration, from 0.
        batch: ``(B,)`` indices of the batch's images.
        sampled: ``(B,)`` the labels drawn from the model for the sampled-label statistics.
        loss: the mean cross-entropy of the batch at the current point (before the step).
        momentum: parameter name → ``m`` after this batch (what every method preconditions).
        directions: method → parameter name → its direction for ``m``.
        cosines: method → layer number (1-based) → cosine to the block-Fisher direction.
    """

    index: int
    batch: Tensor
    sampled: Tensor
    loss: float
    momentum: dict[str, Tensor]
    directions: dict[str, dict[str, Tensor]]
    cosines: dict[str, dict[int, float]]


class FisherCheck:
    """One trajectory of the block-Fisher method with every method's direction measured on it.

    Args:
        model: an MLP of ``nn.Linear`` layers with biases (any activations), float64 for the
            stated precision; its parameters move along the block-Fisher direction.
        inputs: ``(N, D)`` all the data; ``labels``: ``(N,)`` its classes.
        damping: ``λ`` (block Fisher ``F_b + λI``, TNT ``ε = λ``, KFAC ``√λ`` per factor,
            Shampoo ``ε = λ``, Adam ``ε = λ``).
        lr: the block-Fisher method's learning rate.
        seed: seeds the batch order and the label sampling (two generators, each seeded
            with ``seed``); the model's weights are the caller's.
        batch_size: images per batch (the remainder of an epoch is dropped).
        ema: the decay of every moving average.
        first_layer: ``"exact"`` (every layer follows its dense block; the first layer's
            is solved, not inverted) or ``"kfac"`` (the first layer's part of the trajectory
            is its KFAC direction, and the layer is not compared).
        max_block: the largest dense block accepted (``Dense(max_size=...)``).

    Call :meth:`warm_start` once, then :meth:`step` per iteration.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, damping: float,
                 lr: float, seed: int, batch_size: int = 256, ema: float = 0.9,
                 first_layer: str = "exact", max_block: int = 8192):
        if not damping > 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be a positive finite number, got {damping}")
        if not lr >= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a non-negative finite number, got {lr}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if first_layer not in ("kfac", "exact"):
            raise ValueError(f"first_layer must be 'kfac' or 'exact', got {first_layer!r}")
        if batch_size < 1 or inputs.shape[0] < batch_size:
            raise ValueError(f"need at least one batch: {inputs.shape[0]} images, batch size "
                             f"{batch_size}")
        self.model, self.inputs, self.labels = model, inputs, labels
        self.damping, self.lr, self.ema = float(damping), float(lr), float(ema)
        self.batch_size, self.first_layer = int(batch_size), first_layer
        self.likelihood = as_likelihood("categorical")
        self.layers = _linear_layers(model)
        self.layer_number = {name: i + 1 for i, (name, _) in enumerate(self.layers)}
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        first = self.layers[0][0]
        self.driven_by_kfac = ({n for n in self.params if n.rpartition(".")[0] == first}
                               if first_layer == "kfac" else set())
        self.compared_layers = [i + 1 for i, _ in enumerate(self.layers)
                                if not (i == 0 and first_layer == "kfac")]
        self.batch_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator().manual_seed(seed)
        self._sampled_source, self._data_source = TrueFisher(per_sample=True), Empirical()
        cholesky, eigh = as_solver("cholesky"), as_solver("eigh")
        self.methods = {
            "block Fisher": _Method("block Fisher", Dense(blocks="layer", max_size=max_block),
                                    "sampled", cholesky, solve=True),
            "TNT": _Method("TNT", TensorNormal(), "sampled", cholesky),
            "KFAC": _Method("KFAC", KFAC(), "sampled", cholesky),
            "Shampoo": _Method("Shampoo", Shampoo(), "data", eigh),
            "Adam": _Method("Adam", Diagonal(statistics="batch", power=0.5), "data", None),
            "SGD-m": _Method("SGD-m", None),
        }
        owners = dict(model.named_modules())
        for method in self.methods.values():
            if method.structure is None:
                continue
            for name, p in self.params.items():
                if method.name == "block Fisher" and name in self.driven_by_kfac:
                    continue
                owner = owners[name.rpartition(".")[0]]
                if not method.structure.covers(p, owner):
                    raise ValueError(f"{method.name} does not cover {name!r}")
                method.items.append((name, p, method.structure.init_state(p)))
        self.momentum: dict[str, Tensor] | None = None
        self._count = 0  # gradients folded into m
        self._queue: list[Tensor] = []
        self.iteration = 0

    # -- batches and statistics ---------------------------------------------------------------

    def next_batch(self) -> Tensor:
        """Indices of the next batch: consecutive slices of a fresh permutation per epoch
        (``torch.randperm`` from the batch generator), the remainder dropped."""
        if not self._queue:
            n, b = self.inputs.shape[0], self.batch_size
            perm = torch.randperm(n, generator=self.batch_generator)
            self._queue = [perm[i * b:(i + 1) * b] for i in range(n // b)]
        return self._queue.pop(0)

    def warm_start_batches(self) -> list[Tensor]:
        """The warm-start pass: the first ``⌊N/B⌋`` batches of ``B`` images in the data's
        order (the remainder dropped)."""
        n, b = self.inputs.shape[0], self.batch_size
        return [torch.arange(i * b, (i + 1) * b) for i in range(n // b)]

    def _statistics(self, index: Tensor) -> tuple[Statistics, Statistics]:
        """Sampled-label and data-label statistics of one batch at the current point."""
        x, y = self.inputs[index], self.labels[index]
        with torch.enable_grad(), Capture(self.model) as capture:
            outputs = self.model(x)
            sampled = self._sampled_source.collect(
                self.model, self.likelihood, outputs, None, capture=capture,
                generator=self.sample_generator)
            data = self._data_source.collect(self.model, self.likelihood, outputs, y,
                                             capture=capture)
        capture.release_outputs()
        return sampled, data

    def _fold(self, sampled: Statistics, data: Statistics, average: bool) -> None:
        grads = {n: g[0] for n, g in data.batch_grads().items()}
        if self.momentum is None:
            self.momentum = {n: torch.zeros_like(p, dtype=F64) for n, p in self.params.items()}
        for name, m in self.momentum.items():
            fold(m, grads[name], self._count, ema=self.ema, average=average)
        self._count += 1
        for method in self.methods.values():
            method.update(sampled, data, ema=self.ema, average=average)

    def _refresh(self) -> None:
        for method in self.methods.values():
            method.refresh(self.damping)

    # -- the protocol -------------------------------------------------------------------------

    def warm_start(self) -> list[tuple[Tensor, Tensor]]:
        """Average ``m`` and every method's statistics over one pass at the current point,
        then compute every inverse. Returns ``(batch indices, sampled labels)`` per batch."""
        if self._count:
            raise RuntimeError("warm_start must come before the first step, once")
        seen = []
        for index in self.warm_start_batches():
            sampled, data = self._statistics(index)
            self._fold(sampled, data, average=True)
            seen.append((index, sampled.targets[0]))
        self._refresh()
        return seen

    def directions(self) -> dict[str, dict[str, Tensor]]:
        """Every method's direction for the current ``m`` with its current inverses; the
        block Fisher's includes the first layer's KFAC direction under
        ``first_layer="kfac"``."""
        assert self.momentum is not None
        out = {name: method.directions(self.momentum)
               for name, method in self.methods.items()}
        for name in self.driven_by_kfac:
            out["block Fisher"][name] = out["KFAC"][name]
        order = list(self.params)
        return {k: {n: d[n] for n in order} for k, d in out.items()}

    def cosines(self, directions: dict[str, dict[str, Tensor]]) -> dict[str, dict[int, float]]:
        """Method → layer number → cosine of its direction to the block-Fisher direction
        (the compared layers only)."""
        reference = directions["block Fisher"]
        out = {}
        for method, d in directions.items():
            by_module = cosine_similarities(d, reference, model=self.model, by="layer")
            out[method] = {self.layer_number[m]: c for m, c in by_module.items()
                           if self.layer_number[m] in self.compared_layers}
        return out

    def step(self) -> Iteration:
        """One iteration: draw a batch, fold its statistics and gradient into the moving
        averages, refresh every inverse, measure every direction against the block Fisher's,
        and move the parameters along the latter."""
        if not self._count:
            raise RuntimeError("call warm_start() before the first step")
        index = self.next_batch()
        sampled, data = self._statistics(index)
        loss = float(data.loss) if data.loss is not None else math.nan
        self._fold(sampled, data, average=False)
        self._refresh()
        directions = self.directions()
        cosines = self.cosines(directions)
        assert self.momentum is not None
        momentum = {n: m.clone() for n, m in self.momentum.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.sub_(directions["block Fisher"][name].to(p.dtype), alpha=self.lr)
        record = Iteration(self.iteration, index, sampled.targets[0], loss, momentum,
                           directions, cosines)
        self.iteration += 1
        return record


# --------------------------------------------------------------------------- the whole run


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def fisher_check(damping: float = 1e-3, iters: int = 200, lr: float = 0.005, seed: int = 0, *,
                 num_data: int = DIGITS_SIZE, batch_size: int = 256,
                 first_layer: str = "exact",
                 first: int = 50, progress: Callable[[int, float], None] | None = None
                 ) -> dict[str, Any]:
    """Run the protocol (module docstring) and summarise it as a JSON-ready dict.

    Args:
        damping, iters, lr, seed: ``λ``, iterations, the block-Fisher learning rate, the seed
            of the weights, the batch order and the label sampling.
        num_data: use the first ``num_data`` digits images (1797: all).
        batch_size: images per batch.
        first_layer: ``"kfac"`` or ``"exact"`` (see :class:`FisherCheck`).
        first: the early window reported next to the mean over all iterations.
        progress: called as ``progress(iteration, loss)`` after every iteration.

    Returns:
        ``{method: [mean cosine of layers 2, 3, 4, 5 over all iterations]}`` for every
        method in :data:`METHODS`, plus ``"first_50"`` (the same over the first ``first``
        iterations; the key keeps its name for other windows), ``"headline"`` (method →
        ``{"all", "first_50"}`` means over layers 2–5), ``"per_layer"`` (method → layer →
        ``{"all", "first_50"}``, every compared layer), ``"curves"`` (method → layer → the
        cosine at every iteration), ``"loss"`` (the batch loss at every iteration),
        ``"protocol"`` (every setting) and ``"seconds"``.
    """
    from curvlib.cli import build_mlp

    if iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters}")
    if not 1 <= num_data <= DIGITS_SIZE:
        raise ValueError(f"num_data must be in 1..{DIGITS_SIZE}, got {num_data}")
    start = time.perf_counter()
    inputs, labels = load_digits_16(num_data)
    model = build_mlp(WIDTHS, seed)
    check = FisherCheck(model, inputs, labels, damping=damping, lr=lr, seed=seed,
                        batch_size=batch_size, first_layer=first_layer)
    check.warm_start()
    layers = check.compared_layers
    curves: dict[str, dict[int, list[float]]] = {
        m: {layer: [] for layer in layers} for m in METHODS}
    losses: list[float] = []
    for _ in range(iters):
        record = check.step()
        losses.append(record.loss)
        for method in METHODS:
            for layer in layers:
                curves[method][layer].append(record.cosines[method][layer])
        if progress is not None:
            progress(record.index, record.loss)
    seconds = time.perf_counter() - start
    window = min(first, iters)
    per_layer = {m: {layer: {"all": _mean(c), "first_50": _mean(c[:window])}
                     for layer, c in curves[m].items()} for m in METHODS}
    report: dict[str, Any] = {
        m: [per_layer[m][layer]["all"] for layer in REPORTED_LAYERS] for m in METHODS}
    report["first_50"] = {m: [per_layer[m][layer]["first_50"] for layer in REPORTED_LAYERS]
                          for m in METHODS}
    report["headline"] = {m: {"all": _mean(report[m]), "first_50": _mean(report["first_50"][m])}
                          for m in METHODS}
    report["reported_layers"] = list(REPORTED_LAYERS)
    report["methods"] = list(METHODS)
    report["per_layer"] = {m: {str(layer): v for layer, v in per_layer[m].items()} for m in METHODS}
    report["curves"] = {m: {str(layer): [round(c, 6) for c in v] for layer, v in curves[m].items()}
                        for m in METHODS}
    report["loss"] = [round(v, 6) for v in losses]
    names = [f"layer {i + 1} ({m.in_features}->{m.out_features})"
             for i, (_, m) in enumerate(check.layers)]
    report["protocol"] = {
        "damping": damping, "iters": iters, "lr": lr, "seed": seed, "num_data": num_data,
        "batch_size": batch_size, "batches_per_epoch": num_data // batch_size,
        "remainder": "the last num_data mod batch_size images of each epoch (and of the "
                     "warm-start pass) are dropped",
        "ema": check.ema, "first_50_window": window, "first_layer": first_layer,
        "compared_layers": layers, "layers": names,
        "architecture": "-".join(map(str, WIDTHS)), "activation": "tanh",
        "init": "xavier_uniform_ weights (torch.Generator seeded with seed, layer by layer), "
                "zero biases",
        "likelihood": "categorical (cross-entropy)",
        "data": f"sklearn load_digits, first {num_data} images, pixels / 16, upsampled 8x8 -> "
                f"16x16 by {INTERPOLATION}, flattened row-major",
        "batches": "a torch.randperm per epoch from a torch.Generator seeded with seed; "
                   "consecutive slices of batch_size",
        "warm_start": "plain mean over the first num_data // batch_size batches in data order, "
                      "at the initial point, for m and every statistic; then EMA",
        "sampled_labels": "one draw per example from a torch.Generator seeded with seed, shared "
                          "by block Fisher, TNT and KFAC",
        "dtype": "float64",
        "inverses": "refreshed every iteration (block Fisher: solved every iteration)",
        "methods": {
            "block Fisher": "dense(blocks=layer, per-sample MC Fisher); (F_b + lambda I) d = m_b "
                            "by robust_solve with cholesky" + (
                                "; layer 1 follows KFAC" if first_layer == "kfac" else ""),
            "TNT": "tensor_normal (batch gradient at sampled labels), eps = lambda per "
                   "normalised factor, cholesky",
            "KFAC": "kfac (expand, sampled labels), sqrt(lambda) per factor, cholesky",
            "Shampoo": "shampoo (data labels), (H_i + lambda I)^(-1/(2k)) per mode, eigh",
            "Adam": "diagonal (batch, data labels, power 0.5), m / (sqrt(v) + lambda)",
            "SGD-m": "m",
        },
    }
    report["seconds"] = seconds
    return report


# --------------------------------------------------------------------------- output


def format_summary(report: dict[str, Any]) -> str:
    """The printed table: per method, the mean cosine of every compared layer over all
    iterations (and over the first 50), and the headline mean over layers 2–5."""
    proto = report["protocol"]
    layers = [str(layer) for layer in proto["compared_layers"]]
    window = proto["first_50_window"]
    lines = [
        "curvlib fisher-check: TNT Figure 1 on sklearn digits upsampled to 16x16",
        f"MLP {proto['architecture']} (tanh), {proto['num_data']} images, batches of "
        f"{proto['batch_size']}, seed {proto['seed']}, float64",
        f"trajectory: block Fisher, lr {proto['lr']:g}, {proto['iters']} iterations, damping "
        f"lambda {proto['damping']:g}, EMA {proto['ema']:g} (warm-started)"
        + ("; layer 1 follows its KFAC direction" if proto["first_layer"] == "kfac" else ""),
        "cosine of each method's direction to the block-Fisher direction, mean over iterations",
        "",
    ]
    header = (["method"] + [f"layer {layer}" for layer in layers]
              + ["mean 2-5", f"first {window}: 2-5"])
    rows = []
    for m in report["methods"]:
        per = report["per_layer"][m]
        rows.append([m] + [f"{per[layer]['all']:.3f}" for layer in layers]
                    + [f"{report['headline'][m]['all']:.3f}",
                       f"{report['headline'][m]['first_50']:.3f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for k, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    loss = report["loss"]
    lines += ["", f"batch loss {loss[0]:.4f} -> {loss[-1]:.4f}; "
                  f"computed in {report['seconds']:.1f} s"]
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG: per compared layer, the cosine along the trajectory for every method,
    and the batch loss.

    Raises:
        ImportError: matplotlib is not installed (the ``bench`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proto = report["protocol"]
    layers = [str(layer) for layer in proto["compared_layers"]]
    panels = len(layers) + 1
    cols = 3 if panels <= 6 else 4
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    colours = {"block Fisher": "black", "TNT": "tab:red", "KFAC": "tab:blue",
               "Shampoo": "tab:green", "Adam": "tab:purple", "SGD-m": "tab:orange"}
    for ax, layer in zip(flat, layers, strict=False):
        for m in report["methods"]:
            curve = report["curves"][m][layer]
            ax.plot(range(len(curve)), curve, lw=0.9, color=colours.get(m),
                    ls=":" if m == "block Fisher" else "-",
                    label=f"{m} ({report['per_layer'][m][layer]['all']:.2f})")
        mark = " (reported)" if int(layer) in REPORTED_LAYERS else ""
        ax.set_title(f"{proto['layers'][int(layer) - 1]}{mark}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("cosine to block Fisher", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    ax = flat[len(layers)]
    ax.plot(report["loss"], color="black", lw=0.9)
    ax.set_title("batch loss along the trajectory", fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"fisher-check: lambda = {proto['damping']:g}, lr = {proto['lr']:g}, "
                 f"seed {proto['seed']}, {proto['num_data']} digits 16x16, "
                 f"MLP {proto['architecture']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- the subcommand


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fisher-check`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "fisher-check",
        help="TNT's Figure 1 on digits 16x16: cosine of each method's direction to the "
             "block-Fisher direction along its trajectory",
        description=(
            "Follow the block-Fisher method on scikit-learn's digits upsampled to 16x16 with "
            "the 256-20-20-20-20-20-10 tanh MLP and measure, per layer and iteration, the "
            "cosine of the TNT, KFAC, Shampoo, Adam and SGD-m directions to the block-Fisher "
            "direction for the same averaged gradient (float64). Prints a table, writes a PNG "
            f"and optionally a JSON. Needs scikit-learn and matplotlib: {_BENCH_HINT}."),
    )
    parser.add_argument("--damping", type=_positive_float, default=DEFAULTS["damping"],
                        metavar="LAMBDA",
                        help="damping lambda > 0 of every method (default: 1e-3)")
    parser.add_argument("--iters", type=_positive_int, default=DEFAULTS["iters"], metavar="N",
                        help="iterations of the trajectory (default: 200)")
    parser.add_argument("--lr", type=_non_negative_float, default=DEFAULTS["lr"],
                        help="learning rate of the block-Fisher method (default: 0.005)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="seeds the weights, the batch order and the sampled labels "
                             "(default: 0)")
    parser.add_argument("--num-data", type=_positive_int, default=DIGITS_SIZE, metavar="N",
                        help=f"use the first N digits images, batch size..{DIGITS_SIZE} "
                             f"(default: all {DIGITS_SIZE}); for quick checks")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                        metavar="B", help="images per batch (default: 256)")
    parser.add_argument("--first-layer", choices=("exact", "kfac"),
                        default=DEFAULTS["first_layer"],
                        help="the first layer (a 5140x5140 block) follows its exact block "
                             "(default: one 5140x5140 Cholesky factorisation per iteration, "
                             "about 1 s on 2 cores) or its KFAC direction (fast; the layer "
                             "is then not compared)")
    parser.add_argument("--json", type=str, default=None, metavar="PATH",
                        help="write the results as JSON to PATH ({method: [mean cosine of "
                             "layers 2..5]} plus details)")
    parser.add_argument("--out", type=str, default=None, metavar="PNG",
                        help="where to write the plot (default: next to --json with .png, "
                             "else fisher_check.png in the current directory)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it goes to stderr)")
    parser.set_defaults(subparser=parser)
    return parser


_NUMBERS = re.compile(r"\[\s*([-+0-9.eE,\s]+?)\s*\]")


def dumps(report: dict[str, Any]) -> str:
    """``report`` as indented JSON with every list of numbers on one line."""
    text = json.dumps(report, indent=1)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(","))
                        + "]", text) + "\n"


def _plot_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.json is not None:
        return Path(args.json).with_suffix(".png")
    return Path("fisher_check.png")


def run(args: argparse.Namespace) -> int:
    """Run ``curvlib fisher-check`` with parsed ``args``; returns the exit code."""
    parser: argparse.ArgumentParser = args.subparser
    if args.num_data > DIGITS_SIZE:
        parser.error(f"--num-data must be at most {DIGITS_SIZE} (the size of digits)")
    if args.num_data < args.batch_size:
        parser.error(f"--num-data {args.num_data} is smaller than --batch-size "
                     f"{args.batch_size}: an epoch needs at least one full batch")
    plot_path = _plot_path(args)
    for path in ([Path(args.json)] if args.json else []) + [plot_path]:
        if not path.parent.exists():
            parser.error(f"the directory of {str(path)!r} does not exist")
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as error:
        print(f"curvlib fisher-check needs scikit-learn and matplotlib ({error.name} is "
              f"missing); install the bench extra: {_BENCH_HINT}", file=sys.stderr)
        return 1
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.iters, desc="fisher-check", unit="it", file=sys.stderr,
                       leave=False)
        except ImportError:
            bar = None

    def progress(index: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

    try:
        report = fisher_check(args.damping, args.iters, args.lr, args.seed,
                              num_data=args.num_data, batch_size=args.batch_size,
                              first_layer=args.first_layer, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(format_summary(report))
    if args.json is not None:
        Path(args.json).write_text(dumps(report), encoding="utf-8")
        print(f"wrote {args.json}")
    plot_curves(report, plot_path)
    print(f"wrote {plot_path}")
    return 0
