r"""Does TNT gain from per-sample mode statistics? A small study on sklearn digits.

``TensorNormal(statistics="batch")`` (the TNT paper) builds each mode statistic from the
batch-averaged sampled gradient ``Ḡ``: ``S_i = mat_i(Ḡ) mat_i(Ḡ)ᵀ``, one outer product per
batch. ``TensorNormal(statistics="per_sample")`` (beyond the paper) averages
``mat_i(g_n) mat_i(g_n)ᵀ`` over the ``N`` per-sample sampled gradients and divides by ``N``.
For sampled targets ``E[g_n] = 0``, so both have the expectation ``P_i(F)/N``, where ``F``
is the exact Fisher of the batch's data and ``P_i`` the partial trace that keeps mode ``i``;
they differ only in variance. This script measures what that buys.

Part 1 — estimator quality at fixed parameters. An MLP 64-32-32-10 (tanh, categorical) is
trained with SGD (lr 0.1, momentum 0.9, batch 128, neither TNT variant) and frozen at a few
epochs. At each snapshot a reference set ``A`` of 256 training examples is fixed, and per
parameter tensor we take the exact Fisher block ``F`` of ``A``
(:func:`curvlib.testing.oracles.exact_fisher` and ``oracles.blocks``, float64) and the gradient
``g`` of the mean loss over ``A`` with the data's labels. The statistics come from a batch of
``N`` examples drawn from ``A`` without replacement with one sampled target each (both
options from the *same* draw: a ``TrueFisher(per_sample=True)`` statistics object serves both
``batch_grads`` and ``mode_statistics``), fed through curvlib's own ``TensorNormal.update``
(first update, so ``H_i = S_i``, no EMA), ``refresh`` (Cholesky, constant damping) and
``direction``. Compared:

* ``cos``: cosine between TNT's direction ``⊗_i(Ũ_i + εI)^{-1} g`` (Ũ from eq. (5), damping ε
  added to every factor, exactly what the optimizer applies) and the damped block-Fisher
  direction ``(F/N + λI)^{-1} g``. ``F/N`` is the matrix both estimators target (their
  expectation is the Kronecker model of ``E[vec Ḡ vec Ḡᵀ] = F/N``), and ``λ`` is the mean
  eigenvalue that the per-factor damping adds when the factors are exact:
  ``λ = (c₀* + ε)^k − c₀*^k`` with ``c₀* = (tr(F/N)/∏d_j)^{1/k}`` (``2εc₀* + ε²`` for a
  matrix, ``ε`` for a bias). Comparing against ``(F/N + εI)^{-1} g`` instead would compare a
  nearly undamped TNT direction with a nearly pure gradient, since ε is far above most
  eigenvalues of ``F/N`` here.
* ``cos→oracle``: cosine to the same TNT direction built from the exact partial traces
  ``P_i(F)/N`` (the infinite-sample limit of both estimators): estimation noise only.
* ``frob``: ``min_c ‖c·⊗_iŨ_i − F‖_F / ‖F‖_F`` (best scalar multiple, no damping).
* ``scale``: ``tr(⊗_iŨ_i) / tr(F/N)`` — how well the overall scale, which decides how strong
  ε is, is estimated (``log10`` reported).
* ``norm_oracle``: ``‖d‖ / ‖d_oracle‖`` of the whole-model direction (``log10`` reported).

``ε`` runs over the damping values of the training grid. Rows ``oracle`` use the exact
partial traces. A second variant (``ema``) folds 20 batches into the statistics with TNT's
EMA (0.9) at the same parameters, closer to what training sees. Means ± standard deviations
are over model seeds × snapshots × draws.

Part 2 — training. TNT as the paper runs it (``curvlib.TNT``: batch statistics, EMA 0.9,
T1 = 1, T2 = 20, momentum 0.9, Cholesky) against the same with
``TrueFisher(per_sample=True)`` + ``TensorNormal(statistics="per_sample")``, on the same MLP
(float32), 80/20 stratified split of digits (pixels/16), batch 128, 20 epochs, 3 seeds
(seed = model init, data order and target sampling; the two options share all three), on a
coarse grid of dampings × learning rates and then on a finer learning-rate grid (factors
2^(±1/2), 2^(±1)) around each option's best coarse cell. Training loss is the mean
cross-entropy over the whole training set after each epoch; test accuracy is that of the final
model; time per epoch counts only the optimisation steps (the two options of one
(config, seed) run back to back, alternating which goes first).

Run ``python benchmarks/tnt_statistics_study.py`` (about 2–3 minutes on 2 cores);
``--quick`` is a smoke run (~20 s). Results go to
``benchmarks/results/tnt_statistics_study.json`` (``--json`` to change) and the Markdown
tables are printed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import curvlib
from curvlib.capture import Capture
from curvlib.damping import Constant
from curvlib.likelihoods import as_likelihood
from curvlib.solvers import as_solver
from curvlib.sources import TrueFisher
from curvlib.structures import TensorNormal
from curvlib.testing import oracles

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "tnt_statistics_study.json"
OPTIONS = ("batch", "per_sample")
REACH = 1e-2  # training loss for the "epochs to reach" column
WIDTHS = (64, 32, 32, 10)


# -- data and model ------------------------------------------------------------------------------

def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits pixels/16, 80/20 stratified split with a fixed seed (float32)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    xtr, xte, ytr, yte = train_test_split(digits.data / 16.0, digits.target, test_size=0.2,
                                          random_state=0, stratify=digits.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(xtr), torch.tensor(ytr), as_x(xte), torch.tensor(yte)


def make_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batches(n: int, size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        yield perm[i:i + size]


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


# -- part 1: estimator quality ----------------------------------------------------------------

def sgd_snapshots(seed: int, epochs: list[int], xtr, ytr) -> dict[int, nn.Module]:
    """Copies of the MLP along an SGD (lr 0.1, momentum 0.9, batch 128) trajectory."""
    model = make_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for epoch in range(max(epochs) + 1):
        if epoch in epochs:
            out[epoch] = copy.deepcopy(model)
        if epoch == max(epochs):
            break
        for idx in batches(len(xtr), 128, order):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return out


def partial_traces(block: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """``P_i(F)``: the mode-``i`` statistic of a Gaussian with covariance ``block``."""
    k = len(dims)
    f = block.reshape(*dims, *dims)
    letters = "abcdefgh"[:k]
    upper = letters.upper()
    out = []
    for i in range(k):
        right = "".join(upper[j] if j == i else letters[j] for j in range(k))
        out.append(torch.einsum(f"{letters}{right}->{letters[i]}{upper[i]}", f))
    return out


def kron_all(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


class Snapshot:
    """Exact Fisher blocks, the gradient and eigendecompositions at one parameter point."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model = model
        self.x, self.y = x, y
        fisher = oracles.exact_fisher(model, "categorical", x)
        self.blocks = oracles.blocks(fisher, model)
        del fisher
        grad = oracles.gradient(model, "categorical", x, y)
        self.names, self.params, self.grads, self.eigs = [], [], [], []
        start = 0
        for (name, p), block in zip(model.named_parameters(), self.blocks, strict=True):
            self.names.append(name)
            self.params.append(p)
            self.grads.append(grad[start:start + p.numel()].reshape(p.shape))
            start += p.numel()
            self.eigs.append(torch.linalg.eigh(block))

    def reference(self, j: int, n: int, eps: float, dims: tuple[int, ...]) -> torch.Tensor:
        """``(F/N + λI)^{-1} g`` with ``λ = (c₀* + ε)^k − c₀*^k`` (see the module)."""
        w, q = self.eigs[j]
        k = len(dims)
        c0 = (self.blocks[j].trace() / n / math.prod(dims)).clamp_min(0) ** (1.0 / k)
        lam = (c0 + eps) ** k - c0 ** k
        g = self.grads[j].flatten()
        return q @ ((q.T @ g) / (w.clamp_min(0) / n + lam))


def factors(structure: TensorNormal, state: dict, dims: tuple[int, ...]) -> list[torch.Tensor]:
    from curvlib.structures.tensor_normal import normalise

    return normalise([state[f"tnt_H{i}"] for i in range(len(dims))], dims)


def measure(structure: TensorNormal, snap: Snapshot, states: list[dict], n: int,
            epsilons: list[float], oracle_dirs: dict | None, solver) -> dict:
    """Metrics of one set of TNT states (one per parameter tensor) against ``snap``."""
    items = list(zip(snap.names, snap.params, states, strict=True))
    out: dict = {"per_tensor": {name: {"cos": {}, "cos_oracle": {}} for name in snap.names},
                 "model": {"cos": {}, "cos_oracle": {}, "norm_oracle": {}}, "recovered": 0}
    dirs: dict = {}
    for eps in epsilons:
        report = structure.refresh(items, solver=solver,
                                   damping=lambda mats, e=eps: Constant()(e, mats))
        out["recovered"] += report["recovered"] + report["kept"]
        tnt, ref, orc = [], [], []
        for j, (name, p, state) in enumerate(items):
            dims = structure.dims(p.shape)
            d = structure.direction(p, state, snap.grads[j]).flatten()
            r = snap.reference(j, n, eps, dims)
            out["per_tensor"][name]["cos"][eps] = cosine(d, r)
            tnt.append(d)
            ref.append(r)
            dirs[(name, eps)] = d
            if oracle_dirs is not None:
                out["per_tensor"][name]["cos_oracle"][eps] = cosine(d, oracle_dirs[(name, eps)])
                orc.append(oracle_dirs[(name, eps)])
        out["model"]["cos"][eps] = cosine(torch.cat(tnt), torch.cat(ref))
        if oracle_dirs is not None:
            out["model"]["cos_oracle"][eps] = cosine(torch.cat(tnt), torch.cat(orc))
            out["model"]["norm_oracle"][eps] = float(torch.cat(tnt).norm()
                                                     / torch.cat(orc).norm())
    for j, (name, p, state) in enumerate(items):
        dims = structure.dims(p.shape)
        k_mat = kron_all(factors(structure, state, dims))
        block = snap.blocks[j]
        inner = (k_mat * block).sum()
        frob = math.sqrt(max(0.0, 1.0 - float(inner ** 2 / ((k_mat ** 2).sum()
                                                             * (block ** 2).sum()))))
        out["per_tensor"][name]["frob"] = frob
        out["per_tensor"][name]["log10_scale"] = math.log10(
            max(float(k_mat.trace() / (block.trace() / n)), 1e-300))
    out["dirs"] = dirs
    return out


def estimator_study(args, xtr, ytr) -> dict:
    lik = as_likelihood("categorical")
    solver = as_solver("cholesky")
    records = []
    for seed in args.est_seeds:
        snaps = sgd_snapshots(seed, args.epochs_at, xtr, ytr)
        for epoch, model32 in snaps.items():
            model = copy.deepcopy(model32).double()
            pick = torch.Generator().manual_seed(20_000 + 100 * seed + epoch)
            ref_idx = torch.randperm(len(xtr), generator=pick)[:args.ref_size]
            xa, ya = xtr[ref_idx].double(), ytr[ref_idx]
            snap = Snapshot(model, xa, ya)
            train_loss = full_loss(model32, xtr, ytr)
            for n in args.stat_batches:
                # oracle: the exact partial traces (the expectation of both estimators)
                oracle = TensorNormal()
                ostates = []
                for j, p in enumerate(snap.params):
                    st = oracle.init_state(p)
                    for i, h in enumerate(partial_traces(snap.blocks[j] / n,
                                                         oracle.dims(p.shape))):
                        st[f"tnt_H{i}"].copy_(h)
                    st["tnt_updates"] = st["tnt_updates"] + 1
                    ostates.append(st)
                om = measure(oracle, snap, ostates, n, args.epsilons, None, solver)
                odirs = om.pop("dirs")
                records.append(dict(seed=seed, epoch=epoch, n=n, variant="oracle",
                                    option="oracle", draw=0, train_loss=train_loss, **om))
                gen = torch.Generator().manual_seed(30_000 + 1000 * seed + 10 * epoch + n)
                for draw in range(args.draws):
                    for variant, count in (("one", 1), ("ema", args.ema_batches)):
                        if variant == "ema" and not args.ema_batches:
                            continue
                        structs = {o: TensorNormal(statistics=o) for o in OPTIONS}
                        states = {o: [structs[o].init_state(p) for p in snap.params]
                                  for o in OPTIONS}
                        for _ in range(count):
                            sub = torch.randperm(len(xa), generator=gen)[:n]
                            with Capture(model) as cap:
                                outputs = model(xa[sub])
                                stats = TrueFisher(per_sample=True).collect(
                                    model, lik, outputs, None, capture=cap, generator=gen)
                                for o in OPTIONS:
                                    items = list(zip(snap.names, snap.params, states[o],
                                                     strict=True))
                                    structs[o].update(items, stats, ema=0.9)
                        for o in OPTIONS:
                            m = measure(structs[o], snap, states[o], n, args.epsilons, odirs,
                                        solver)
                            m.pop("dirs")
                            records.append(dict(seed=seed, epoch=epoch, n=n, variant=variant,
                                                option=o, draw=draw, train_loss=train_loss,
                                                **m))
            print(f"  estimator: seed {seed} epoch {epoch} done "
                  f"(train loss {train_loss:.3f})", flush=True)
    return {"records": records, "tensors": [n for n, _ in make_mlp(0).named_parameters()]}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_estimator(est: dict, args) -> dict:
    recs = est["records"]
    out: dict = {}
    variants = ["one"] + (["ema"] if args.ema_batches else [])
    for n in args.stat_batches:
        for variant in variants:
            key = f"N={n},{variant}"
            summ: dict = {}
            for option in (*OPTIONS, "oracle"):
                rs = [r for r in recs if r["n"] == n and r["option"] == option
                      and r["variant"] == ("oracle" if option == "oracle" else variant)]
                s: dict = {"count": len(rs), "tensors": {}, "model": {}}
                for eps in args.epsilons:
                    s["model"][f"cos@{eps:g}"] = mean_std([r["model"]["cos"][eps] for r in rs])
                    if option != "oracle":
                        s["model"][f"cos_oracle@{eps:g}"] = mean_std(
                            [r["model"]["cos_oracle"][eps] for r in rs])
                        s["model"][f"log10_norm_oracle@{eps:g}"] = mean_std(
                            [math.log10(r["model"]["norm_oracle"][eps]) for r in rs])
                for t in est["tensors"]:
                    ts: dict = {}
                    for eps in args.epsilons:
                        ts[f"cos@{eps:g}"] = mean_std([r["per_tensor"][t]["cos"][eps]
                                                       for r in rs])
                        if option != "oracle":
                            ts[f"cos_oracle@{eps:g}"] = mean_std(
                                [r["per_tensor"][t]["cos_oracle"][eps] for r in rs])
                    ts["frob"] = mean_std([r["per_tensor"][t]["frob"] for r in rs])
                    ts["log10_scale"] = mean_std([r["per_tensor"][t]["log10_scale"]
                                                  for r in rs])
                    s["tensors"][t] = ts
                by_epoch = {}
                for e in args.epochs_at:
                    re_ = [r for r in rs if r["epoch"] == e]
                    by_epoch[e] = {f"cos@{eps:g}": mean_std([r["model"]["cos"][eps]
                                                             for r in re_])
                                   for eps in args.epsilons}
                s["model_by_epoch"] = by_epoch
                summ[option] = s
            # paired: fraction of draws where per-sample beats batch (whole-model cos)
            pairs = {}
            for eps in args.epsilons:
                wins = total = 0
                for rb in recs:
                    if rb["n"] != n or rb["variant"] != variant or rb["option"] != "batch":
                        continue
                    rp = next(r for r in recs if r["n"] == n and r["variant"] == variant
                              and r["option"] == "per_sample" and r["seed"] == rb["seed"]
                              and r["epoch"] == rb["epoch"] and r["draw"] == rb["draw"])
                    wins += rp["model"]["cos"][eps] > rb["model"]["cos"][eps]
                    total += 1
                pairs[f"{eps:g}"] = [wins, total]
            summ["per_sample_wins_model_cos"] = pairs
            out[key] = summ
    return out


# -- part 2: training -----------------------------------------------------------------------

def make_optimizer(option: str, model: nn.Module, lr: float, damping: float, seed: int):
    generator = torch.Generator().manual_seed(40_000 + seed)
    if option == "batch":
        return curvlib.TNT(model, "categorical", lr=lr, damping=damping, generator=generator)
    return curvlib.assemble(model, "categorical", source=TrueFisher(per_sample=True),
                            structure=TensorNormal(statistics="per_sample"), solver="cholesky",
                            lr=lr, damping=damping, stat_every=1, inverse_every=20,
                            generator=generator)


def train_one(option: str, lr: float, damping: float, seed: int, epochs: int, data) -> dict:
    xtr, ytr, xte, yte = data
    model = make_mlp(seed)
    opt = make_optimizer(option, model, lr, damping, seed)
    order = torch.Generator().manual_seed(50_000 + seed)
    losses, epoch_times = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(epochs):
            t0 = time.perf_counter()
            for idx in batches(len(xtr), 128, order):
                opt.zero_grad()
                out = model(xtr[idx])
                opt.backward(out, ytr[idx])
                opt.step()
            epoch_times.append(time.perf_counter() - t0)
            losses.append(full_loss(model, xtr, ytr))
    if hasattr(opt, "close"):
        opt.close()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    finite = [v for v in losses if math.isfinite(v)]
    reach = next((e + 1 for e, v in enumerate(losses) if v < REACH), None)
    return dict(option=option, lr=lr, damping=damping, seed=seed, losses=losses,
                epochs_to_reach=reach, final=losses[-1],
                best=min(finite) if finite else float("nan"),
                test_acc=acc, epoch_time_s=statistics.median(epoch_times),
                warnings=len([w for w in caught if issubclass(w.category, RuntimeWarning)]))


LIMIT = math.log(10)  # a final training loss above the uniform prediction's: diverged


def diverged(run: dict) -> bool:
    return not math.isfinite(run["final"]) or run["final"] > LIMIT


def run_grid(configs: list[tuple[float, float]], stage: str, args, data) -> list[dict]:
    """Both options on every (damping, lr) and seed; the option run first alternates."""
    runs = []
    for k, (damping, lr) in enumerate(configs):
        for j, seed in enumerate(args.train_seeds):
            order = OPTIONS if (k + j) % 2 == 0 else OPTIONS[::-1]
            for option in order:
                run = train_one(option, lr, damping, seed, args.train_epochs, data)
                runs.append(dict(stage=stage, **run))
        print(f"  training ({stage}): damping {damping:g} lr {lr:g} done", flush=True)
    return runs


def grid_cells(runs: list[dict]) -> dict:
    cells: dict = {}
    for r in runs:
        key = f"lr={r['lr']:g},damping={r['damping']:g}"
        cells.setdefault(key, dict(lr=r["lr"], damping=r["damping"]))
    for cell in cells.values():
        for option in OPTIONS:
            rs = [r for r in runs if r["option"] == option and r["lr"] == cell["lr"]
                  and r["damping"] == cell["damping"]]
            cell[option] = dict(final=mean_std([r["final"] for r in rs]),
                                best=mean_std([r["best"] for r in rs]),
                                test_acc=mean_std([r["test_acc"] for r in rs]),
                                epochs_to_reach=mean_std([r["epochs_to_reach"] for r in rs]),
                                reached=sum(r["epochs_to_reach"] is not None for r in rs),
                                diverged=sum(diverged(r) for r in rs), seeds=len(rs))
    return cells


def best_cells(cells: dict) -> dict:
    """Per option, the cell with the lowest mean final training loss and no divergence."""
    def score(key, option):
        c = cells[key][option]
        return math.inf if c["diverged"] else c["final"][0]

    out = {}
    for option in OPTIONS:
        key = min(cells, key=lambda k: score(k, option))
        out[option] = dict(config=key, lr=cells[key]["lr"], damping=cells[key]["damping"],
                           **cells[key][option])
    return out


def training_study(args, data) -> dict:
    """The coarse grid, then a finer lr grid (factors 2^(±1/2), 2^(±1)) around each option's
    best coarse cell, both options on every fine cell."""
    init = full_loss(make_mlp(args.train_seeds[0]), data[0], data[1])
    coarse = run_grid([(d, lr) for d in args.dampings for lr in args.lrs], "coarse", args, data)
    best = best_cells(grid_cells(coarse))
    fine_configs = []
    for option in OPTIONS:
        b = best[option]
        for step in args.fine_steps:
            cfg = (b["damping"], float(f"{b['lr'] * 2 ** step:.3g}"))
            if cfg not in fine_configs:
                fine_configs.append(cfg)
    fine = run_grid(sorted(fine_configs), "fine", args, data)
    return {"runs": coarse + fine, "initial_loss": init}


def paired(runs: list[dict]) -> dict:
    """Per (config, seed): does per-sample end lower? Only pairs where neither diverged."""
    wins = total = 0
    log_ratios, time_ratios = [], []
    for rb in runs:
        if rb["option"] != "batch":
            continue
        rp = next(r for r in runs if r["option"] == "per_sample" and r["lr"] == rb["lr"]
                  and r["damping"] == rb["damping"] and r["seed"] == rb["seed"])
        time_ratios.append(rp["epoch_time_s"] / rb["epoch_time_s"])
        if diverged(rb) or diverged(rp):
            continue
        total += 1
        wins += rp["final"] < rb["final"]
        log_ratios.append(math.log(rp["final"] / rb["final"]))
    return dict(per_sample_lower=wins, both_stable=total,
                geomean_final_ratio=math.exp(statistics.fmean(log_ratios))
                if log_ratios else float("nan"),
                time_ratios=time_ratios)


def summarise_training(tr: dict, args) -> dict:
    runs = tr["runs"]
    out: dict = {"initial_loss": tr["initial_loss"]}
    for stage in ("coarse", "fine"):
        rs = [r for r in runs if r["stage"] == stage]
        cells = grid_cells(rs)
        pair = paired(rs)
        pair.pop("time_ratios")
        out[stage] = dict(grid=cells, best=best_cells(cells), paired_final=pair,
                          diverged={o: sum(diverged(r) for r in rs if r["option"] == o)
                                    for o in OPTIONS},
                          runs_per_option=sum(r["option"] == "batch" for r in rs))
    times = {o: [r["epoch_time_s"] for r in runs if r["option"] == o] for o in OPTIONS}
    ratios = paired(runs)["time_ratios"]
    out["epoch_time_ms"] = {o: 1e3 * statistics.median(times[o]) for o in OPTIONS}
    out["time_ratio_median_of_pairs"] = statistics.median(ratios)
    out["time_ratio_quartiles"] = (statistics.quantiles(ratios, n=4) if len(ratios) > 1
                                   else ratios)
    out["warnings"] = {o: sum(r["warnings"] for r in runs if r["option"] == o)
                       for o in OPTIONS}
    return out


# -- reporting --------------------------------------------------------------------------------

def pm(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def sci(ms: tuple[float, float]) -> str:
    m, s = ms
    return "—" if not math.isfinite(m) else f"{m:.2e} ± {s:.1e}"


def tables(summary: dict, args) -> str:
    lines = []
    est, tr = summary["estimator"], summary["training"]
    for key, s in est.items():
        lines += [f"Estimator, {key} (means ± std over {s['batch']['count']} draws); "
                  f"`cos` against the damped block Fisher, whole model:", ""]
        head = "| statistics | " + " | ".join(f"cos, ε={e:g}" for e in args.epsilons)
        head += " | " + " | ".join(f"cos→oracle, ε={e:g}" for e in args.epsilons) + " |"
        lines += [head, "|---|" + "---:|" * (2 * len(args.epsilons))]
        for option in (*OPTIONS, "oracle"):
            m = s[option]["model"]
            cells = [pm(m[f"cos@{e:g}"]) for e in args.epsilons]
            cells += ["1" if option == "oracle" else pm(m[f"cos_oracle@{e:g}"])
                      for e in args.epsilons]
            lines.append(f"| {option} | " + " | ".join(cells) + " |")
        lines += ["", "Length of the whole-model direction relative to the oracle's, "
                  "log10 ‖d‖/‖d_oracle‖:", "",
                  "| statistics | " + " | ".join(f"ε={e:g}" for e in args.epsilons) + " |",
                  "|---|" + "---:|" * len(args.epsilons)]
        for option in OPTIONS:
            lines.append(f"| {option} | " + " | ".join(
                pm(s[option]["model"][f"log10_norm_oracle@{e:g}"], 2) for e in args.epsilons)
                + " |")
        wins = s["per_sample_wins_model_cos"]
        lines += ["", "per-sample cos > batch cos in " + ", ".join(
            f"{w}/{t} draws at ε={e}" for e, (w, t) in wins.items()), ""]
        mid = args.epsilons[len(args.epsilons) // 2]
        lines += [f"Per tensor ({key}; cos at ε={mid:g}; frob = best-multiple relative "
                  f"Frobenius error; scale = log10 tr(⊗Ũ)/tr(F/N)):", "",
                  "| tensor | cos batch | cos per-sample | cos oracle | frob batch | "
                  "frob per-sample | frob oracle | scale batch | scale per-sample |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in summary["tensors"]:
            b, p, o = (s[x]["tensors"][t] for x in (*OPTIONS, "oracle"))
            lines.append(
                f"| {t} | {pm(b[f'cos@{mid:g}'])} | {pm(p[f'cos@{mid:g}'])} | "
                f"{pm(o[f'cos@{mid:g}'])} | {pm(b['frob'])} | {pm(p['frob'])} | "
                f"{pm(o['frob'])} | {pm(b['log10_scale'], 2)} | {pm(p['log10_scale'], 2)} |")
        lines += ["", f"Whole-model cos at ε={mid:g} by snapshot epoch ({key}):", "",
                  "| epoch | " + " | ".join((*OPTIONS, "oracle")) + " |", "|---:|---:|---:|---:|"]
        for e in args.epochs_at:
            lines.append(f"| {e} | " + " | ".join(
                pm(s[x]["model_by_epoch"][e][f"cos@{mid:g}"]) for x in (*OPTIONS, "oracle"))
                + " |")
        lines.append("")
    def fmt(c):
        return f"div {c['diverged']}/{c['seeds']}" if c["diverged"] else sci(c["final"])

    for stage, title in (("coarse", "coarse grid"),
                         ("fine", "finer lr grid around each option's best coarse cell")):
        st = tr[stage]
        lines += [f"Training, {title}: final training loss (mean ± std over seeds; `div k/n` "
                  f"= k seeds ended above ln 10) and final test accuracy:", "",
                  "| damping ε | lr | loss, batch (paper) | loss, per-sample | "
                  "test acc, batch | test acc, per-sample |", "|---:|---:|---:|---:|---:|---:|"]
        for cell in sorted(st["grid"].values(), key=lambda c: (c["damping"], c["lr"])):
            lines.append(f"| {cell['damping']:g} | {cell['lr']:.3g} | {fmt(cell['batch'])} | "
                         f"{fmt(cell['per_sample'])} | {pm(cell['batch']['test_acc'])} | "
                         f"{pm(cell['per_sample']['test_acc'])} |")
        pf = st["paired_final"]
        lines += ["", f"Per-sample ends lower in {pf['per_sample_lower']}/{pf['both_stable']} "
                  f"(config, seed) pairs where neither diverged; geometric mean of the "
                  f"final-loss ratio per-sample/batch {pf['geomean_final_ratio']:.2f}; "
                  "diverged runs: " + ", ".join(f"{o} {v}/{st['runs_per_option']}"
                                                for o, v in st["diverged"].items()) + ".", ""]
    lines += ["Best cell of each option over both grids (lowest mean final training loss, "
              "no seed diverged):", "",
              "| statistics | damping ε | lr | final train loss | best train loss | "
              f"epochs to loss < {REACH:g} | test acc | time / epoch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for option in OPTIONS:
        cands = [tr[stage]["best"][option] for stage in ("coarse", "fine")]
        b = min(cands, key=lambda c: math.inf if c["diverged"] else c["final"][0])
        lines.append(f"| {option} | {b['damping']:g} | {b['lr']:.3g} | {sci(b['final'])} | "
                     f"{sci(b['best'])} | {pm(b['epochs_to_reach'], 1)} | {pm(b['test_acc'])} | "
                     f"{tr['epoch_time_ms'][option]:.1f} ms |")
    q = tr["time_ratio_quartiles"]
    lines += ["", "Time per epoch (optimisation steps only, median over all runs), "
              f"per-sample / batch: median of paired ratios {tr['time_ratio_median_of_pairs']:.2f} "
              "(quartiles " + ", ".join(f"{v:.2f}" for v in q) + ")."]
    return "\n".join(lines)


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    return obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~20 s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--json", type=pathlib.Path, default=DEFAULT_JSON)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.epsilons = [1e-3, 3e-3, 1e-2]
    args.ref_size = 256
    if args.quick:
        args.est_seeds, args.epochs_at, args.stat_batches = [0], [0, 5], [128]
        args.draws, args.ema_batches = 2, 0
        args.dampings, args.lrs, args.train_seeds, args.train_epochs = [1e-3, 1e-2], \
            [1e-5, 1e-4], [0], 5
        args.fine_steps = [-0.5, 0.5]
    else:
        args.est_seeds, args.epochs_at, args.stat_batches = [0, 1], [0, 1, 5, 20], [32, 128]
        args.draws, args.ema_batches = 6, 20
        args.dampings, args.lrs, args.train_seeds, args.train_epochs = \
            [1e-3, 3e-3, 1e-2], [3e-6, 1e-5, 3e-5, 1e-4], [0, 1, 2], 20
        args.fine_steps = [-1, -0.5, 0.5, 1]
    start = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    data = load_data()
    print("part 1: estimator quality", flush=True)
    est = estimator_study(args, data[0], data[1])
    print("part 2: training", flush=True)
    tr = training_study(args, data)
    summary = dict(tensors=est["tensors"], estimator=summarise_estimator(est, args),
                   training=summarise_training(tr, args))
    text = tables(summary, args)
    print()
    print(text)
    wall = time.perf_counter() - start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nwall time {wall:.0f} s; load average {load0} -> {load1}")
    if not args.no_json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "no_json")}
        payload = dict(
            study="tnt_statistics_study", quick=args.quick,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(["python", "benchmarks/tnt_statistics_study.py", *sys.argv[1:]]),
            environment=dict(python=platform.python_version(), torch=torch.__version__,
                             machine=platform.machine(), threads=args.threads,
                             cpus=os.cpu_count(), load_average_start=load0,
                             load_average_end=load1, wall_time_s=wall),
            config=config, summary=summary, markdown=text,
            estimator_records=[{k: v for k, v in r.items()} for r in est["records"]],
            training_runs=tr["runs"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_jsonable(payload), separators=(",", ":")) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
