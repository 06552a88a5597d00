r"""FNGD vs per-batch EF-NGD vs SGD with momentum on scikit-learn's digits (classification).

The check: FNGD (Ou et al.) computes the per-layer SMW coefficients of the empirical-Fisher
natural gradient during the first epoch and reuses them afterwards; the paper reports (its
Fig. 4) that the reuse does not cost accuracy against recomputing them on every batch, and
that it makes an epoch cost about as much as an SGD epoch. Target here: FNGD's final test
accuracy within 1 point of EF-NGD's (mean over the seeds).

Setup: ``sklearn.datasets.load_digits`` (1797 images of 8×8 pixels, 10 classes), one fixed
split (a seeded permutation: 1438 training, 359 test images), pixels standardised with the
training set's mean and standard deviation. Two networks, float32:

* ``mlp``: 64-128-64-10, ReLU;
* ``cnn``: 1×8×8 → Conv2d(1, 16, 3, padding=1)-ReLU-Conv2d(16, 32, 3, padding=1)-ReLU-
  MaxPool2 → Flatten → Linear(32·4·4, 10).

Batch 64 (23 batches an epoch, the last one of 30), reshuffled every epoch from a seeded
``torch.Generator``; mean cross-entropy; momentum 0.9 for every method; the learning rate is
multiplied by 0.1 at 50 % and 75 % of the epochs (the paper's image-classification schedule).
Methods:

* ``SGD-m``: ``torch.optim.SGD(momentum=0.9)``;
* ``EF-NGD``: ``curvlib.assemble(model, "categorical", source="gram", structure="smw",
  lr=…, damping=α, momentum=0.9)``, coefficients recomputed on every batch;
* ``FNGD``: ``curvlib.FNGD(model, "categorical", lr=…, alpha=α, momentum=0.9,
  steps_per_epoch=23)``: epoch 1 refreshes (the EF-NGD computation), later epochs reuse the
  coefficient vector stored for each batch position.

Besides each method at its tuned hyper-parameters, EF-NGD and FNGD also run at α = 0.001 (one
learning rate for both, the grid value with the best mean of their validation accuracies at
that α): there the coefficients differ much from the SGD-like ``1/M``, so whether sharing
them costs accuracy is actually tested.

The runs of one seed train in lockstep, one epoch each in turn (order rotated every epoch,
garbage collector off while an epoch is timed), so that machine drift hits them alike.
After every epoch (not timed): test accuracy, and the training loss on all 1438 training
images. Time per epoch is reported as a ratio to SGD-m's epoch of the same seed and epoch
(median); FNGD's first (refresh) epoch and its later (shared) epochs separately.

Hyper-parameters: the defaults below were chosen with ``--tune``, which trains every grid
point on 80 % of the training set (3 seeds, the same epochs) and picks the best mean final
accuracy on the remaining 20 % (the test set is not used for tuning; ties go to the lower
final training loss). Grids: SGD-m lr ∈ {0.01, 0.03, 0.1, 0.3}; EF-NGD and FNGD, each tuned
on its own, lr ∈ {0.01, 0.03, 0.1, 0.3, 1.0} × α ∈ {0.001, 0.01, 0.1, 1.0}.

Outputs: a table per network, ``PREFIX.json`` (every run's curves, times, metadata) and
``PREFIX.png`` (test accuracy against epochs and against training time, training loss against
epochs; mean over the seeds, bands from the lowest to the highest seed). ``--out PREFIX`` (default
``benchmarks/results/digits_fngd``; running without ``--out`` overwrites the committed
results).

Run ``python benchmarks/digits_fngd.py`` (about 2–3 minutes on one core);
``--epochs 2 --seeds 1 --out /tmp/x`` is a smoke run; ``--tune`` runs the grid (~20–25 min).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import loadavg, metadata, shrink_png

import curvlib
from curvlib.compare import digits_cnn, digits_mlp, load_digits_classification

BATCH = 64
MOMENTUM = 0.9
METHODS = ("SGD-m", "EF-NGD", "FNGD")
GRIDS = {
    "SGD-m": [{"lr": lr} for lr in (0.01, 0.03, 0.1, 0.3)],
    "EF-NGD": [{"lr": lr, "alpha": a} for lr in (0.01, 0.03, 0.1, 0.3, 1.0)
               for a in (0.001, 0.01, 0.1, 1.0)],
}
GRIDS["FNGD"] = GRIDS["EF-NGD"]
# chosen by `--tune` (results/digits_fngd_tune.json, README): network → run label → hyper-
# parameters. The α = 0.001 pair uses one learning rate for both methods: the grid value
# with the best mean of EF-NGD's and FNGD's validation accuracies at α = 0.001.
DEFAULTS = {
    "mlp": {"SGD-m": {"lr": 0.1}, "EF-NGD": {"lr": 0.1, "alpha": 1.0},
            "FNGD": {"lr": 0.1, "alpha": 1.0},
            "EF-NGD α=0.001": {"lr": 0.3, "alpha": 0.001},
            "FNGD α=0.001": {"lr": 0.3, "alpha": 0.001}},
    "cnn": {"SGD-m": {"lr": 0.1}, "EF-NGD": {"lr": 0.1, "alpha": 0.1},
            "FNGD": {"lr": 0.1, "alpha": 0.1},
            "EF-NGD α=0.001": {"lr": 0.1, "alpha": 0.001},
            "FNGD α=0.001": {"lr": 0.1, "alpha": 0.001}},
}
# FNGD against EF-NGD: the tuned pair (the target) and the pair at the strong-curvature α
PAIRS = [("FNGD", "EF-NGD"), ("FNGD α=0.001", "EF-NGD α=0.001")]
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# data and networks


def load_data(validation: bool = False) -> dict[str, Tensor]:
    """Standardised train/test tensors (images as ``(N, 1, 8, 8)``), one fixed split:
    ``curvlib.compare.load_digits_classification`` (``curvlib compare`` uses the same).

    ``validation=True`` splits the training images again (80/20) and returns the second part
    as ``test``: what ``--tune`` selects on.
    """
    return load_digits_classification(validation)


# the networks of ``curvlib compare``'s digits-mlp and digits-cnn tasks; called without a
# generator they take torch's default initialisation (``Run`` seeds the global generator)
mlp = digits_mlp
cnn = digits_cnn


NETWORKS = {"mlp": (mlp, "MLP 64-128-64-10 (ReLU)"),
            "cnn": (cnn, "CNN conv3x3(1→16)-ReLU-conv3x3(16→32)-ReLU-pool2-Linear(512→10)")}


# --------------------------------------------------------------------------------------------
# one training run, advanced an epoch at a time


class Run:
    """One method on one network and seed; :meth:`epoch` trains one epoch (timed) and
    evaluates (not timed)."""

    def __init__(self, label: str, net: str, hyper: dict, data: dict[str, Tensor],
                 epochs: int, seed: int, decay: bool):
        method = kind(label)
        self.label, self.hyper, self.data, self.epochs = label, hyper, data, epochs
        self.decay = decay
        torch.manual_seed(seed)  # the same initial weights for every method of a seed
        self.model = NETWORKS[net][0]()
        self.order = torch.Generator().manual_seed(seed + 1000)  # the same batch order too
        n = data["x_train"].shape[0]
        self.steps_per_epoch = math.ceil(n / BATCH)
        lr = hyper["lr"]
        if method == "SGD-m":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=MOMENTUM)
        elif method == "EF-NGD":
            self.opt = curvlib.assemble(self.model, "categorical", source="gram",
                                        structure="smw", lr=lr, damping=hyper["alpha"],
                                        momentum=MOMENTUM)
        elif method == "FNGD":
            self.opt = curvlib.FNGD(self.model, "categorical", lr=lr, alpha=hyper["alpha"],
                                    momentum=MOMENTUM, steps_per_epoch=self.steps_per_epoch)
        else:
            raise ValueError(method)
        self.curvlib = method != "SGD-m"
        self.done = 0
        self.diverged = False
        self.kinds: list[dict[str, int]] = []  # FNGD: refreshed/shared steps per epoch
        acc, loss = self.evaluate()
        self.test_acc, self.train_loss, self.batch_loss = [acc], [loss], [loss]
        self.times = [0.0]  # cumulative training seconds after each epoch

    def lr_factor(self, epoch: int) -> float:
        """0.1 from 50 % of the epochs on, 0.01 from 75 % (epoch counts from 0)."""
        if not self.decay:
            return 1.0
        return 0.1 ** ((epoch >= self.epochs // 2) + (epoch >= (3 * self.epochs) // 4))

    def evaluate(self) -> tuple[float, float]:
        if self.diverged:
            return 0.1, math.inf  # chance accuracy (reported as such)
        d = self.data
        with torch.no_grad():
            acc = float((self.model(d["x_test"]).argmax(1) == d["y_test"]).float().mean())
            loss = float(F.cross_entropy(self.model(d["x_train"]), d["y_train"]))
        return 100.0 * acc, loss

    def epoch(self) -> None:
        d = self.data
        for group in self.opt.param_groups:
            group["lr"] = self.hyper["lr"] * self.lr_factor(self.done)
        perm = torch.randperm(d["x_train"].shape[0], generator=self.order)
        batches = [(d["x_train"][idx], d["y_train"][idx]) for idx in perm.split(BATCH)]
        kinds = {"refreshed": 0, "shared": 0}
        total = 0.0
        elapsed = 0.0
        if not self.diverged:
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                for x, y in batches:
                    self.opt.zero_grad()
                    out = self.model(x)
                    if self.curvlib:
                        loss = self.opt.backward(out, y)
                        for k in kinds:
                            kinds[k] += int(self.opt.last_refresh.get(k, 0))
                    else:
                        loss = F.cross_entropy(out, y)
                        loss.backward()
                        loss = loss.detach()
                    self.opt.step()
                    total += float(loss)
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            if not math.isfinite(total):
                self.diverged = True
        self.done += 1
        self.kinds.append(kinds)
        self.times.append(self.times[-1] + elapsed)
        acc, loss = self.evaluate()
        if not math.isfinite(loss):
            self.diverged = True
            acc, loss = self.evaluate()
        self.test_acc.append(acc)
        self.train_loss.append(loss)
        self.batch_loss.append(total / len(batches) if not self.diverged else math.inf)

    def record(self) -> dict:
        return {"test_acc": self.test_acc, "train_loss": self.train_loss,
                "batch_loss": self.batch_loss, "times": self.times,
                "epoch_times": [b - a for a, b in zip(self.times, self.times[1:], strict=False)],
                "diverged": self.diverged, "steps": self.kinds if self.curvlib else None}


def kind(label: str) -> str:
    """The method of a run label ("FNGD", "FNGD α=0.001" → "FNGD")."""
    return label.split(" ")[0]


def train_lockstep(net: str, configs: dict[str, dict], data: dict[str, Tensor], epochs: int,
                   seed: int, decay: bool) -> dict[str, dict]:
    """Train one run per method, one epoch each in turn (order rotated every epoch)."""
    runs = [Run(m, net, h, data, epochs, seed, decay) for m, h in configs.items()]
    for e in range(epochs):
        shift = e % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.epoch()
    return {r.label: r.record() for r in runs}


# --------------------------------------------------------------------------------------------
# summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values or any(not math.isfinite(v) for v in values):
        return math.inf if values else math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def epoch_ratios(runs: list[dict[str, dict]], method: str, epochs: list[int]) -> float:
    """Median over seeds and the given epochs (1-based) of the method's epoch time over
    SGD-m's epoch time in the same seed and epoch."""
    vals = []
    for seed_runs in runs:
        sgd, own = seed_runs["SGD-m"], seed_runs[method]
        if sgd["diverged"] or own["diverged"]:
            continue
        for e in epochs:
            vals.append(own["epoch_times"][e - 1] / sgd["epoch_times"][e - 1])
    return statistics.median(vals) if vals else math.nan


def summarise(net: str, runs: list[dict[str, dict]], configs: dict[str, dict],
              epochs: int) -> dict:
    out = {}
    later = list(range(2, epochs + 1)) or [1]
    for method in configs:
        finals = [r[method]["test_acc"][-1] for r in runs]
        best = [max(r[method]["test_acc"][1:]) for r in runs]
        losses = [r[method]["train_loss"][-1] for r in runs]
        times = [statistics.fmean(r[method]["epoch_times"][1:] or r[method]["epoch_times"])
                 for r in runs]
        first = [r[method]["epoch_times"][0] for r in runs]
        acc_m, acc_s = mean_std(finals)
        loss_m, loss_s = mean_std(losses)
        out[method] = {
            "hyper": configs[method], "final_test_acc_mean": acc_m, "final_test_acc_std": acc_s,
            "final_test_acc": finals, "best_test_acc_mean": statistics.fmean(best),
            "final_train_loss_mean": loss_m, "final_train_loss_std": loss_s,
            "first_epoch_s": statistics.median(first),
            "later_epoch_s": statistics.median(times),
            "ratio_sgd_first_epoch": epoch_ratios(runs, method, [1]),
            "ratio_sgd_later_epochs": epoch_ratios(runs, method, later),
            "ratio_sgd_all_epochs": epoch_ratios(runs, method, list(range(1, epochs + 1))),
            "diverged": sum(r[method]["diverged"] for r in runs),
        }
    return out


def print_summary(net: str, summary: dict, epochs: int, seeds: int) -> None:
    print(f"\n## {net}: {NETWORKS[net][1]}, batch {BATCH}, {epochs} epochs, {seeds} seeds\n")
    print("| method | hyper-parameters | final test acc % (mean ± std) | best-epoch acc % | "
          "final train loss | s / epoch (1st; later) | × SGD-m epoch (1st; later) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, s in summary.items():
        hyper = ", ".join(f"{k}={v}" for k, v in s["hyper"].items())
        print(f"| {method} | {hyper} | {s['final_test_acc_mean']:.2f} ± "
              f"{s['final_test_acc_std']:.2f} | {s['best_test_acc_mean']:.2f} | "
              f"{s['final_train_loss_mean']:.4f} | {s['first_epoch_s'] * 1e3:.1f} ms; "
              f"{s['later_epoch_s'] * 1e3:.1f} ms | {s['ratio_sgd_first_epoch']:.2f}; "
              f"{s['ratio_sgd_later_epochs']:.2f} |")
    print()
    for fngd, ef in PAIRS:
        if fngd in summary and ef in summary:
            gap = pair_gap(summary, fngd, ef)
            ok = math.isfinite(gap) and abs(gap) <= 1.0
            print(f"{fngd} − {ef} final test accuracy: {gap:+.2f} points (target: within 1 "
                  f"point) → {'meets' if ok else 'MISSES'}")


def pair_gap(summary: dict, a: str, b: str) -> float:
    return summary[a]["final_test_acc_mean"] - summary[b]["final_test_acc_mean"]


# --------------------------------------------------------------------------------------------
# tuning


def tune(nets: list[str], epochs: int, seeds: list[int], decay: bool) -> dict:
    """Every grid point on a validation split; the best mean final validation accuracy."""
    data = load_data(validation=True)
    out: dict = {}
    for net in nets:
        out[net] = {}
        for method, grid in GRIDS.items():
            rows = []
            for hyper in grid:
                accs, losses = [], []
                for seed in seeds:
                    rec = train_lockstep(net, {method: hyper}, data, epochs, seed,
                                         decay)[method]
                    accs.append(rec["test_acc"][-1])
                    losses.append(rec["train_loss"][-1])
                m, s = mean_std(accs)
                rows.append({"hyper": hyper, "val_acc_mean": m, "val_acc_std": s,
                             "val_acc": accs, "train_loss": losses})
                print(f"  {net} {method:6s} {hyper}: validation accuracy {m:.2f} ± {s:.2f}",
                      flush=True)
            # best mean accuracy; ties → lower final training loss
            best = max(rows, key=lambda r: (r["val_acc_mean"],
                                            -statistics.fmean(r["train_loss"])))
            out[net][method] = {"grid": rows, "best": best["hyper"]}
            print(f"  → {net} {method}: {best['hyper']} ({best['val_acc_mean']:.2f} %)",
                  flush=True)
    return out


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the layers are tiny, and timings are "
                         "steadier on a shared machine)")
    ap.add_argument("--no-decay", action="store_true",
                    help="constant learning rate (default: ×0.1 at 50 %% and 75 %% of the "
                         "epochs)")
    ap.add_argument("--tune", action="store_true",
                    help="run the grids on a validation split and report the best "
                         "configurations (writes PREFIX_tune.json)")
    ap.add_argument("--out", default=str(RESULTS / "digits_fngd"),
                    help="path prefix of the .json and .png results ('' for none); the "
                         "default overwrites the committed results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in nets:
        if k not in NETWORKS:
            ap.error(f"unknown model {k!r}; choose from {sorted(NETWORKS)}")
    seeds = list(range(args.seeds))
    decay = not args.no_decay
    started = time.perf_counter()
    sizes = {k: int(v.shape[0]) for k, v in load_data().items() if k.startswith("x_")}
    meta = metadata(data=f"sklearn load_digits, 8×8, split {sizes['x_train']} train / "
                    f"{sizes['x_test']} test (seeded permutation), standardised with the "
                    "training statistics",
                    batch=BATCH, epochs=args.epochs, seeds=args.seeds, momentum=MOMENTUM,
                    lr_schedule="×0.1 at 50 % and 75 % of the epochs" if decay else "constant",
                    networks={k: NETWORKS[k][1] for k in nets})
    print(f"# digits_fngd — {meta['date']}, torch {meta['torch']}, {meta['threads']} "
          f"thread(s), {meta['cpu']}, curvlib at {meta['curvlib_commit']}; load average at "
          f"start {meta['loadavg_start']}", flush=True)

    if args.tune:
        meta["grids"] = GRIDS
        result = tune(nets, args.epochs, seeds, decay)
        meta["loadavg_end"] = loadavg()
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        print("\nchosen (paste into DEFAULTS):")
        print(json.dumps({n: {m: r["best"] for m, r in v.items()} for n, v in result.items()}))
        if args.out:
            path = pathlib.Path(args.out + "_tune.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                json.dump(_finite_or_none({"meta": meta, "tuning": result}), f, indent=1)
            print(f"wrote {path}")
        return 0

    data = load_data()
    results: dict = {}
    ok = True
    for net in nets:
        configs = DEFAULTS[net]
        runs = []
        for seed in seeds:
            runs.append(train_lockstep(net, configs, data, args.epochs, seed, decay))
            print(f"  {net} seed {seed}: final test accuracy "
                  + ", ".join(f"{m} {r['test_acc'][-1]:.2f}" for m, r in runs[-1].items()),
                  flush=True)
        summary = summarise(net, runs, configs, args.epochs)
        print_summary(net, summary, args.epochs, args.seeds)
        gaps = {f"{a} − {b}": pair_gap(summary, a, b) for a, b in PAIRS
                if a in summary and b in summary}
        results[net] = {"summary": summary, "fngd_minus_efngd": gaps,
                        "target_met": {k: math.isfinite(g) and abs(g) <= 1.0
                                       for k, g in gaps.items()},
                        "runs": runs}
        ok &= all(all(math.isfinite(v) for v in r[m]["test_acc"]) for r in runs for m in r)
    meta["loadavg_end"] = loadavg()
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(load average {meta['loadavg_start']} → {meta['loadavg_end']}; wall time "
          f"{meta['wall_s']} s)")
    if args.out:
        prefix = pathlib.Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        json_path = prefix.parent / (prefix.name + ".json")
        png_path = prefix.parent / (prefix.name + ".png")
        with open(json_path, "w") as f:
            json.dump(_finite_or_none({"meta": meta, "results": results}), f, indent=1)
        plot(results, png_path, meta, args.epochs)
        print(f"wrote {json_path} and {png_path}")
    return 0 if ok else 1


def _finite_or_none(o):
    """JSON has no inf/nan: such values are written as null; floats rounded to 6 digits."""
    if isinstance(o, float):
        return float(f"{o:.6g}") if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_none(v) for v in o]
    return o


def plot(results: dict, path: pathlib.Path, meta: dict, epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(results)
    fig, axes = plt.subplots(len(nets), 3, figsize=(14, 3.9 * len(nets)), squeeze=False)
    colors = {"SGD-m": "tab:blue", "EF-NGD": "tab:orange", "FNGD": "tab:red"}
    for row, net in zip(axes, nets, strict=True):
        runs = results[net]["runs"]
        summary = results[net]["summary"]
        for method in summary:
            recs = [r[method] for r in runs if not r[method]["diverged"]]
            if not recs:
                continue
            acc = torch.tensor([r["test_acc"] for r in recs], dtype=torch.float64)
            loss = torch.tensor([r["train_loss"] for r in recs], dtype=torch.float64)
            t = torch.tensor([r["times"] for r in recs], dtype=torch.float64).mean(0)
            ep = torch.arange(acc.shape[1])
            hyper = ", ".join(f"{k}={v}" for k, v in summary[method]["hyper"].items())
            label = f"{method} ({hyper})"
            c = colors.get(kind(method))
            style = "--" if "α" in method else "-"
            for ax, xs, ys in ((row[0], ep, acc), (row[1], t, acc), (row[2], ep, loss)):
                ax.plot(xs, ys.mean(0), color=c, label=label, linestyle=style,
                        marker="." if ax is not row[2] else None)
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=c, alpha=0.15)
        row[0].set_xlabel("epoch")
        row[1].set_xlabel("training time, s (mean over seeds)")
        row[2].set_xlabel("epoch")
        for ax in row[:2]:
            ax.set_ylabel(f"{net}: test accuracy %")
            ax.set_ylim(80, 100)
        row[2].set_ylabel(f"{net}: training loss (all training images)")
        row[2].set_yscale("log")
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"digits classification, batch {BATCH}, {meta['seeds']} seeds (mean; band: "
                 f"min–max over the seeds), "
                 f"{meta['lr_schedule']}; torch {meta['torch']}, {meta['threads']} thread(s), "
                 f"curvlib {meta['curvlib_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    shrink_png(path)


if __name__ == "__main__":
    sys.exit(main())
