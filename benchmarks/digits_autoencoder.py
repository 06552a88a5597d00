r"""TNT vs SGD with momentum vs Adam on a small autoencoder of scikit-learn's digits.

The check: the TNT paper (Ren & Goldfarb, 2021, Figure 2) reports that on autoencoder
problems TNT reaches a lower training loss than SGD with momentum and Adam at equal epochs and
at equal process time. This script repeats that comparison at a size that runs on 2 CPU cores
in a few minutes; it is not the paper's MNIST/FACES experiment.

Setup: ``sklearn.datasets.load_digits`` (1797 images of 8×8 pixels, values 0–16 scaled to
[0, 1]), all of them used for training; autoencoder 64-128-64-32-8-32-64-128-64 (ReLU; the
code layer and the output layer are linear), Bernoulli likelihood (BCE-with-logits summed over
the 64 pixels, averaged over the batch: curvlib's ``bernoulli`` ``mean_loss``); batch 100,
reshuffled every epoch; float32. Methods, each on a small grid, 3 seeds (the seed sets the
initial weights, the batch order and TNT's sampling):

* SGD-m: ``torch.optim.SGD(momentum=0.9)``, lr grid;
* Adam: ``torch.optim.Adam`` (default betas), lr grid;
* TNT: ``curvlib.TNT`` with the paper's autoencoder settings (``T1 = 1``, ``T2 = 20``, EMA 0.9,
  momentum 0.9) and a warm start of the statistics over one pass of the data at the initial
  point (Algorithm 3 of the paper; its time is counted), lr × damping grid.

For each method the configuration with the lowest mean final training loss is reported (the
paper's criterion: minimal training loss); runs that diverge count as infinite loss. The
training loss is evaluated on all 1797 images after every epoch (not timed); the time axis is
the cumulative training time. For the comparison at equal time, SGD-m and Adam (with the lr
chosen at equal epochs) are run again, on the same seeds, for as many epochs as fit in TNT's
training time (+10 %), and every method's loss at TNT's time is reported.

Output: a table (best configuration, final training loss mean ± std over the seeds, the loss
at a few epochs, time per epoch as a ratio to SGD-m), ``benchmarks/results/digits_autoencoder.png``
(loss against epochs and against time, mean ± std bands) and
``benchmarks/results/digits_autoencoder.json`` (every run's curve).

Run ``python benchmarks/digits_autoencoder.py`` (about 2–3 minutes on 2 cores);
``--epochs 2 --seeds 1`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import autoencoder, loadavg, metadata

import curvlib

WIDTHS = (64, 128, 64, 32, 8, 32, 64, 128, 64)
BATCH = 100
GRIDS = {
    "SGD-m": [{"lr": lr} for lr in (0.01, 0.03, 0.1, 0.2)],
    "Adam": [{"lr": lr} for lr in (0.001, 0.003, 0.01, 0.03)],
    "TNT": [{"lr": lr, "damping": d} for lr in (1e-5, 3e-5, 1e-4, 3e-4)
            for d in (0.003, 0.01, 0.03, 0.1)],
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load_data() -> torch.Tensor:
    from sklearn.datasets import load_digits
    return torch.tensor(load_digits().data / 16.0, dtype=torch.float32)


def run(method: str, hyper: dict, data: torch.Tensor, epochs: int, seed: int) -> dict:
    """One training run; the training loss on all data after every epoch, and times."""
    torch.manual_seed(seed)
    model = autoencoder(WIDTHS)
    lik = curvlib.as_likelihood("bernoulli")
    order = torch.Generator().manual_seed(seed + 1000)
    n = data.shape[0]
    if method == "SGD-m":
        opt = torch.optim.SGD(model.parameters(), lr=hyper["lr"], momentum=0.9)
    elif method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=hyper["lr"])
    else:
        opt = curvlib.TNT(model, "bernoulli", lr=hyper["lr"], damping=hyper["damping"],
                          momentum=0.9, ema=0.9, stat_every=1, inverse_every=20,
                          generator=torch.Generator().manual_seed(seed + 2000))

    def batches():
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            yield data[idx], data[idx]

    def train_loss() -> float:
        with torch.no_grad():
            return float(lik.mean_loss(model(data), data))

    losses, times = [train_loss()], [0.0]
    elapsed = 0.0
    if method == "TNT":
        start = time.perf_counter()
        opt.warm_start(batches())  # the paper's warm start at the initial point
        elapsed += time.perf_counter() - start
    diverged = False
    for _ in range(epochs):
        start = time.perf_counter()
        try:
            for x, y in batches():
                opt.zero_grad()
                out = model(x)
                if method == "TNT":
                    loss = opt.backward(out, y)
                else:
                    loss = lik.mean_loss(out, y)
                    loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    raise FloatingPointError
        except (FloatingPointError, RuntimeError):
            # a NaN/inf loss, or TNT's Bernoulli sampling refusing NaN probabilities
            diverged = True
        elapsed += time.perf_counter() - start
        loss_now = math.inf if diverged else train_loss()
        if not math.isfinite(loss_now):
            diverged = True
        losses.append(loss_now)
        times.append(elapsed)
        if diverged:
            losses += [math.inf] * (epochs + 1 - len(losses))
            times += [elapsed] * (epochs + 1 - len(times))
            break
    if method == "TNT":
        opt.close()
    return {"losses": losses, "times": times, "diverged": diverged}


def _loss_at_time(r: dict, t: float) -> tuple[float, int]:
    """The training loss of run ``r`` after the last epoch that ended by time ``t``."""
    e = max(i for i, ti in enumerate(r["times"]) if ti <= t * (1 + 1e-9))
    return r["losses"][e], e


def mean_std(values: list[float]) -> tuple[float, float]:
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the layers are tiny, a second thread only "
                         "adds synchronisation, and timings are steadier on a shared machine)")
    ap.add_argument("--out", default=str(RESULTS / "digits_autoencoder"),
                    help="path prefix of the .json and .png results ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_data()
    meta = metadata(model="autoencoder " + "-".join(map(str, WIDTHS)) + " (ReLU, linear code "
                    "and output)", data=f"sklearn load_digits, {data.shape[0]} images, "
                    "pixels / 16", batch=BATCH, epochs=args.epochs, seeds=args.seeds,
                    likelihood="bernoulli (BCE-with-logits summed over 64 pixels, batch mean)",
                    grids=GRIDS)
    print(f"# digits_autoencoder — {meta['date']}, torch {meta['torch']}, {meta['threads']} "
          f"thread(s), {meta['cpu']}; load average at start {meta['loadavg_start']}",
          flush=True)
    seeds = list(range(args.seeds))
    results: dict[str, list[dict]] = {}
    for method, grid in GRIDS.items():
        results[method] = []
        for hyper in grid:
            runs = [run(method, hyper, data, args.epochs, s) for s in seeds]
            final = [r["losses"][-1] for r in runs]
            m, s = mean_std(final)
            results[method].append({"hyper": hyper, "runs": runs, "final_mean": m,
                                    "final_std": s})
            print(f"  {method:5s} {hyper}: final train loss {m:.3f} ± {s:.3f}", flush=True)
    meta["loadavg_end"] = loadavg()

    best = {m: min(cfgs, key=lambda c: c["final_mean"]) for m, cfgs in results.items()}

    def per_epoch_time(cfg: dict) -> float:
        # median over seeds of (training time of the epochs after the first) / epochs;
        # the first epoch (and TNT's warm start) is reported separately
        vals = [(r["times"][-1] - r["times"][1]) / max(1, args.epochs - 1)
                for r in cfg["runs"] if not r["diverged"]]
        return statistics.median(vals) if vals else math.nan

    sgd_epoch = per_epoch_time(best["SGD-m"])
    marks = sorted({1, 5, 10, args.epochs} & set(range(1, args.epochs + 1)))
    print()
    print(f"# {meta['model']}, {meta['data']}, batch {BATCH}, {args.epochs} epochs, "
          f"{args.seeds} seeds; load average {meta['loadavg_start']} → {meta['loadavg_end']}")
    print()
    head = " | ".join(f"loss @ {e}" for e in marks)
    print(f"| method | best hyper-parameters | {head} | final train loss (mean ± std) | "
          f"s / epoch | × SGD-m | first epoch s (incl. warm start) |")
    print("|---|---|" + "---:|" * len(marks) + "---:|---:|---:|---:|")
    table = []
    for method, cfg in best.items():
        curves = [r["losses"] for r in cfg["runs"]]
        at = [mean_std([c[e] for c in curves])[0] for e in marks]
        t_ep = per_epoch_time(cfg)
        first = statistics.median(r["times"][1] for r in cfg["runs"])
        hyper = ", ".join(f"{k}={v}" for k, v in cfg["hyper"].items())
        print(f"| {method} | {hyper} | " + " | ".join(f"{v:.2f}" for v in at)
              + f" | {cfg['final_mean']:.2f} ± {cfg['final_std']:.2f} | {t_ep:.3f} | "
              f"{t_ep / sgd_epoch:.2f} | {first:.3f} |")
        table.append({"method": method, "hyper": cfg["hyper"],
                      "loss_at_epochs": dict(zip(marks, at, strict=True)),
                      "final_mean": cfg["final_mean"], "final_std": cfg["final_std"],
                      "s_per_epoch": t_ep, "ratio_sgd": t_ep / sgd_epoch,
                      "first_epoch_s": first})

    # the paper's claim, at equal epochs: is TNT's mean loss below SGD-m's, and from when on?
    tnt = [mean_std([r["losses"][e] for r in best["TNT"]["runs"]])[0]
           for e in range(args.epochs + 1)]
    sgd = [mean_std([r["losses"][e] for r in best["SGD-m"]["runs"]])[0]
           for e in range(args.epochs + 1)]
    lower = [e for e in range(1, args.epochs + 1) if tnt[e] < sgd[e]]
    since = next((e for e in range(1, args.epochs + 1)
                  if all(tnt[j] < sgd[j] for j in range(e, args.epochs + 1))), None)
    # separated by more than the seeds' spread at the end?
    t_m, t_s = best["TNT"]["final_mean"], best["TNT"]["final_std"]
    s_m, s_s = best["SGD-m"]["final_mean"], best["SGD-m"]["final_std"]
    separated = math.isfinite(t_m) and math.isfinite(s_m) and t_m + t_s < s_m - s_s
    holds = separated and since is not None and since <= max(1, args.epochs // 4)
    print()
    print(f"Claim 'TNT reaches a lower training loss than SGD-m at equal epochs': TNT's mean "
          f"is lower at {len(lower)}/{args.epochs} epochs"
          + (f", at every epoch from {since} on" if since else "")
          + f"; final {t_m:.2f} ± {t_s:.2f} vs {s_m:.2f} ± {s_s:.2f} "
          f"({'separated' if separated else 'NOT separated'} by the seeds' spread) -> "
          f"{'holds' if holds else 'does not hold clearly'} here")

    # equal time: SGD-m and Adam (best lr as chosen above) run on until TNT's training time
    tnt_time = statistics.median(r["times"][-1] for r in best["TNT"]["runs"])
    equal_time = []
    print()
    print(f"| at TNT's training time ({tnt_time:.2f} s, {args.epochs} TNT epochs) | epochs run | "
          f"train loss (mean ± std) |")
    print("|---|---:|---:|")
    for method in best:
        cfg = best[method]
        if method != "TNT" and math.isfinite(cfg["final_mean"]):
            own = statistics.median(r["times"][-1] for r in cfg["runs"])
            long_epochs = math.ceil(args.epochs * tnt_time / own * 1.1)
            cfg["long_runs"] = [run(method, cfg["hyper"], data, long_epochs, s) for s in seeds]
        runs = cfg.get("long_runs", cfg["runs"])
        at = ([(r["losses"][-1], args.epochs) for r in runs] if method == "TNT"
              else [_loss_at_time(r, tnt_time) for r in runs])
        m, s_ = mean_std([a[0] for a in at])
        ep = statistics.median(a[1] for a in at)
        equal_time.append({"method": method, "hyper": cfg["hyper"], "epochs": ep,
                           "loss_mean": m, "loss_std": s_})
        print(f"| {method} ({', '.join(f'{k}={v}' for k, v in cfg['hyper'].items())}) | "
              f"{ep} | {m:.2f} ± {s_:.2f} |")
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(wall time {meta['wall_s']} s)")

    if args.out:
        prefix = pathlib.Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        summary = {"meta": meta, "best": table, "equal_time": equal_time,
                   "tnt_training_time_s": tnt_time,
                   "long_runs": {m: c.get("long_runs") for m, c in best.items()
                                 if c.get("long_runs")},
                   "claim": {"epochs_tnt_lower": len(lower), "epochs": args.epochs,
                             "tnt_lower_from_epoch": since,
                             "final_separated_by_std": separated, "holds": holds},
                   "configs": {m: [{"hyper": c["hyper"], "final_mean": c["final_mean"],
                                    "final_std": c["final_std"],
                                    "runs": c["runs"]} for c in cfgs]
                               for m, cfgs in results.items()}}
        with open(prefix.with_suffix(".json"), "w") as f:
            json.dump(_finite_or_none(summary), f, indent=1)
        plot(best, prefix.with_suffix(".png"), meta)
        print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.png')}")
    return 0


def _finite_or_none(o):
    """JSON has no inf/nan: a diverged run's losses are written as null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_none(v) for v in o]
    return o


def plot(best: dict, path: pathlib.Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"SGD-m": "tab:blue", "Adam": "tab:green", "TNT": "tab:red"}
    t_max = max(r["times"][-1] for r in best["TNT"]["runs"])
    for method, cfg in best.items():
        runs = [r for r in cfg["runs"] if not r["diverged"]]
        if not runs:
            continue
        curves = torch.tensor([r["losses"] for r in runs], dtype=torch.float64)
        mean, std = curves.mean(0), (curves.std(0) if len(runs) > 1 else curves[0] * 0)
        epochs = torch.arange(curves.shape[1])
        hyper = ", ".join(f"{k}={v}" for k, v in cfg["hyper"].items())
        label = f"{method} ({hyper})"
        c = colors.get(method)
        ax1.plot(epochs, mean, color=c, label=label)
        ax1.fill_between(epochs, mean - std, mean + std, color=c, alpha=0.2)
        long = [r for r in cfg.get("long_runs", cfg["runs"]) if not r["diverged"]]
        lc = torch.tensor([r["losses"] for r in long], dtype=torch.float64)
        lt = torch.tensor([r["times"] for r in long], dtype=torch.float64).mean(0)
        lm, ls = lc.mean(0), (lc.std(0) if len(long) > 1 else lc[0] * 0)
        keep = lt <= t_max * 1.02
        ax2.plot(lt[keep], lm[keep], color=c, label=label)
        ax2.fill_between(lt[keep], (lm - ls)[keep], (lm + ls)[keep], color=c, alpha=0.2)
    for ax, xl in ((ax1, "epoch"), (ax2, "training time, s (SGD-m and Adam run on to TNT's time)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (BCE summed over pixels)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"digits autoencoder {'-'.join(map(str, WIDTHS))}, batch {BATCH}, "
                 f"{meta['seeds']} seeds (mean ± std), torch {meta['torch']}, "
                 f"{meta['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
