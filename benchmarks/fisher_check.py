"""Reproduction 2(a): TNT's Figure 1 on digits 16x16, three dampings and three seeds.

Runs :func:`curvlib.fisher_check.fisher_check` (the ``curvlib fisher-check`` protocol) for
``λ ∈ {1e-4, 1e-3, 1e-2}`` and seeds 0, 1, 2 with the defaults (200 iterations, lr 0.005, all
1797 images, batches of 256, float64), and writes

* ``benchmarks/results/fisher_check.json`` — per run the method lists ``{method: [mean cosine
  of layers 2..5]}``, the first-50 means, every compared layer's means, the loss at the start
  and the end, and the seconds; per damping the mean and standard deviation over the seeds;
  per damping and method the cosine curves of layers 2–5 averaged over the seeds (4 decimals);
* ``benchmarks/results/fisher_check.png`` — those seed-averaged curves, one row per damping,
  one column per reported layer;

and prints the tables of ``benchmarks/README.md``. The first layer follows its exact
5140 × 5140 block (one Cholesky factorisation per iteration, about 1 s on 2 cores);
``--first-layer kfac`` lets it follow its KFAC direction instead and writes
``fisher_check_kfac.json``/``.png``; ``--quick`` is a smoke run (5 iterations, seed 0, no files
unless ``--out`` is given).

    python benchmarks/fisher_check.py                     # ~35 min on 2 idle cores
    python benchmarks/fisher_check.py --first-layer kfac  # ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import shrink_png

from curvlib.fisher_check import METHODS, REPORTED_LAYERS, dumps, fisher_check

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DAMPINGS = (1e-4, 1e-3, 1e-2)
SEEDS = (0, 1, 2)


def summarise_runs(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every method's per-layer and headline
    values, for the runs of one damping."""
    out: dict = {}
    for key in ("all", "first_50"):
        per_method = {}
        for m in METHODS:
            lists = [r[m] if key == "all" else r["first_50"][m] for r in runs]
            layers = [statistics.fmean(v[i] for v in lists) for i in range(len(REPORTED_LAYERS))]
            heads = [statistics.fmean(v) for v in lists]
            per_method[m] = {
                "layers": layers,
                "layers_std": [statistics.pstdev([v[i] for v in lists])
                               for i in range(len(REPORTED_LAYERS))],
                "mean": statistics.fmean(heads),
                "std": statistics.pstdev(heads),
            }
        out[key] = per_method
    return out


def mean_curves(runs: list[dict]) -> dict:
    """Method → reported layer → the cosine at every iteration, averaged over the runs (every
    method but the block Fisher, whose cosine is 1)."""
    out: dict = {}
    for m in METHODS[1:]:  # not the block Fisher itself (1 throughout)
        out[m] = {}
        for layer in map(str, REPORTED_LAYERS):
            curves = [r["curves"][m][layer] for r in runs]
            out[m][layer] = [round(statistics.fmean(c[i] for c in curves), 4)
                             for i in range(len(curves[0]))]
    return out


def table(summary: dict, damping: float) -> str:
    """A markdown table: per method, layers 2–5 and the mean (± std over seeds), all
    iterations and the first 50."""
    lines = [f"λ = {damping:g}", "",
             "| method | layer 2 | layer 3 | layer 4 | layer 5 | mean 2–5 (± seeds) | "
             "first 50: mean 2–5 (± seeds) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        a, f = summary["all"][m], summary["first_50"][m]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in a["layers"])
                     + f" | {a['mean']:.3f} ± {a['std']:.3f} | {f['mean']:.3f} ± "
                       f"{f['std']:.3f} |")
    return "\n".join(lines)


def plot(curves: dict, path: pathlib.Path, title: str) -> None:
    """One row per damping, one column per reported layer; seed-averaged curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"block Fisher": "black", "TNT": "tab:red", "KFAC": "tab:blue",
               "Shampoo": "tab:green", "Adam": "tab:purple", "SGD-m": "tab:orange"}
    dampings = list(curves)
    fig, axes = plt.subplots(len(dampings), len(REPORTED_LAYERS),
                             figsize=(3.4 * len(REPORTED_LAYERS), 2.6 * len(dampings)),
                             squeeze=False, sharex=True, sharey=True)
    for row, damping in enumerate(dampings):
        for col, layer in enumerate(map(str, REPORTED_LAYERS)):
            ax = axes[row][col]
            for m in METHODS[1:]:
                c = curves[damping][m][layer]
                ax.plot(range(len(c)), c, lw=0.9, color=colours[m], label=m)
            ax.set_ylim(0.0, 1.0)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"λ = {damping}\ncosine to block Fisher", fontsize=8)
            if row == len(dampings) - 1:
                ax.set_xlabel("iteration", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    shrink_png(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-layer", choices=("exact", "kfac"), default="exact")
    parser.add_argument("--quick", action="store_true", help="5 iterations, seed 0 (smoke)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON path (default: benchmarks/results/fisher_check[_kfac].json; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    iters, seeds = (5, (0,)) if args.quick else (200, SEEDS)
    suffix = "" if args.first_layer == "exact" else "_kfac"
    out = args.out if args.out is not None else (
        None if args.quick else RESULTS / f"fisher_check{suffix}.json")
    result: dict = {"command": "python benchmarks/fisher_check.py"
                    + ("" if args.first_layer == "exact" else " --first-layer kfac"),
                    "first_layer": args.first_layer, "iters": iters, "seeds": list(seeds),
                    "runs": [], "summary": {}, "mean_curves": {}}
    start = time.perf_counter()
    for damping in DAMPINGS:
        runs = []
        for seed in seeds:
            r = fisher_check(damping, iters, 0.005, seed, first_layer=args.first_layer)
            runs.append(r)
            keep = {k: r[k] for k in (*METHODS, "first_50", "headline", "per_layer",
                                      "protocol", "seconds")}
            keep["loss_first"], keep["loss_last"] = r["loss"][0], r["loss"][-1]
            result["runs"].append(keep)
            print(f"λ={damping:g} seed={seed}: " + ", ".join(
                f"{m} {r['headline'][m]['all']:.3f}" for m in METHODS[1:])
                + f"  ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        key = f"{damping:g}"
        result["summary"][key] = summarise_runs(runs)
        result["mean_curves"][key] = mean_curves(runs)
        print(table(result["summary"][key], damping) + "\n")
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        out.write_text(dumps(result))
        title = (f"fisher-check, digits 16x16, MLP 256-20-20-20-20-20-10, lr 0.005, "
                 f"{iters} iterations, mean of seeds {list(seeds)}; first layer: "
                 f"{args.first_layer}")
        plot(result["mean_curves"], out.with_suffix(".png"), title)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    ok = all(math.isfinite(result["summary"][k]["all"][m]["mean"])
             for k in result["summary"] for m in METHODS)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
