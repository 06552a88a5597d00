r"""The small grids behind the ``[G]`` defaults of ``curvlib compare`` (its ``DEFAULTS``).

Every grid point of a recipe is trained on the **validation split** of a task (80 % of the
training images; the other 20 % of them are the validation images; the test images are not
used), for two seeds, with the same epochs (the task's default), batch, constant learning
rate and seeding as ``curvlib compare``; the grid points of one recipe and seed train in
lockstep through ``curvlib.compare.train``. Score: classification: the mean over seeds of the
final validation accuracy (ties: lower mean final training loss); autoencoder: the lowest mean
final validation loss. A run that diverges scores worst.

Values that come from the earlier digits benchmarks (``[F]``, ``[A]`` in ``DEFAULTS``) are not
re-tuned here.

Run ``python benchmarks/compare_tune.py`` (about 15–25 min on 1 thread; writes
``benchmarks/results/compare_tune.json``); ``--tasks digits-mlp --recipes adam --epochs 2
--seeds 0 --out /tmp/t.json`` is a smoke run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import statistics
import sys
import time

import torch

from curvlib import compare as cmp


def product(**values: list[float]) -> list[dict[str, float]]:
    """Every combination of the listed values."""
    keys = list(values)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values.values())]


def along_damping(dampings: list[float], scales: list[float]) -> list[dict[str, float]]:
    """TNT-like grids: ``lr = c·damping²`` for each ``c``. When the damping dominates both
    Kronecker factors the direction is about ``g / damping²``, so ``c`` is the SGD learning
    rate it falls back to; a product grid in lr × damping wastes most points on runs that
    diverge (lr ≫ c·damping²) or do not move (lr ≪ c·damping²)."""
    return [{"lr": float(f"{c * d * d:.3g}"), "damping": d} for d in dampings for c in scales]


#: The grid points per recipe.
GRIDS: dict[str, list[dict[str, float]]] = {
    "adam": product(lr=[3e-4, 1e-3, 3e-3, 1e-2]),
    "kfac": product(lr=[3e-4, 1e-3, 1e-2, 1e-1], damping=[1e-4, 1e-3, 1e-2, 1e-1, 1.0]),
    "shampoo": product(lr=[1e-3, 3e-3, 1e-2, 3e-2], damping=[1e-5, 1e-4, 1e-3, 1e-2]),
    "tnt": along_damping([1e-2, 1e-1, 1.0], [0.03, 0.1, 0.3]),
    "empirical_tnt": along_damping([1e-2, 1e-1, 1.0], [0.03, 0.1, 0.3]),
    "fngd": product(lr=[0.01, 0.03, 0.1, 0.3], damping=[0.01, 0.1, 1.0]),
    "natural_gradient": product(lr=[0.01, 0.03, 0.1, 0.3], damping=[0.01, 0.1, 1.0]),
}
#: What is tuned here, per task (the rest of DEFAULTS comes from the digits benchmarks).
TUNED: dict[str, list[str]] = {
    "digits-mlp": ["adam", "kfac", "shampoo", "tnt", "empirical_tnt", "natural_gradient"],
    "digits-cnn": ["adam", "kfac", "shampoo", "tnt", "empirical_tnt", "natural_gradient"],
    "digits-autoencoder": ["kfac", "shampoo", "fngd", "empirical_tnt", "natural_gradient"],
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def score(task: str, recs: list[dict]) -> tuple[float, float]:
    """``(primary, tie-break)``, larger is better."""
    losses = [r["train_loss"][-1] for r in recs]
    tie = -statistics.fmean(losses) if all(math.isfinite(v) for v in losses) else -math.inf
    if cmp.TASKS[task].kind == "classification":
        accs = [r["test_accuracy"][-1] for r in recs]
        ok = all(math.isfinite(a) for a in accs) and all(r["diverged_at"] is None for r in recs)
        return (statistics.fmean(accs) if ok else -math.inf), tie
    vals = [r["test_loss"][-1] for r in recs]
    ok = all(math.isfinite(v) for v in vals)
    return (-statistics.fmean(vals) if ok else -math.inf), tie


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TUNED))
    ap.add_argument("--recipes", default=None, help="comma-separated (default: TUNED[task])")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per run (default: the task's default of curvlib compare)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "compare_tune.json"),
                    help="JSON path ('' for none)")
    ap.add_argument("--update", action="store_true",
                    help="replace only the tasks' recipes run now in an existing --out file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    out: dict = {"meta": {"seeds": seeds, "threads": args.threads,
                          "torch": torch.__version__, "grids": GRIDS,
                          "command": " ".join(["python", *sys.argv])},
                 "tasks": {}}
    chosen: dict[str, dict[str, dict]] = {}
    for task in args.tasks.split(","):
        data = cmp.load_task(task, validation=True)
        recipes = args.recipes.split(",") if args.recipes else TUNED[task]
        out["tasks"][task] = {"data": data.describe(),
                              "epochs": args.epochs or cmp.TASKS[task].epochs, "recipes": {}}
        chosen[task] = {}
        for recipe in recipes:
            specs = [cmp.RunSpec(f"{recipe} {p}", recipe, dict(p)) for p in GRIDS[recipe]]
            epochs = args.epochs or cmp.TASKS[task].epochs
            by_seed = [cmp.train(task, specs, epochs=epochs, seed=s, data=data)
                       for s in seeds]
            rows = []
            for spec in specs:
                recs = [b[spec.name] for b in by_seed]
                primary, tie = score(task, recs)
                rows.append({"hyper": spec.hyper, "score": primary, "tie": tie,
                             "final_val_accuracy": [r.get("test_accuracy", [None])[-1]
                                                    for r in recs],
                             "final_val_loss": [r["test_loss"][-1] for r in recs],
                             "final_train_loss": [r["train_loss"][-1] for r in recs],
                             "diverged_at": [r["diverged_at"] for r in recs]})
                print(f"  {task} {recipe} {spec.hyper}: score {primary:.4g}", flush=True)
            best = max(rows, key=lambda r: (r["score"], r["tie"]))
            chosen[task][recipe] = best["hyper"]
            out["tasks"][task]["recipes"][recipe] = {"grid": rows, "best": best["hyper"]}
            print(f"-> {task} {recipe}: {best['hyper']} (score {best['score']:.4g})",
                  flush=True)
    out["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    if args.update and args.out and pathlib.Path(args.out).exists():
        old = json.loads(pathlib.Path(args.out).read_text())
        for task, entry in out["tasks"].items():
            kept = old["tasks"].setdefault(task, entry)
            kept["recipes"].update(entry["recipes"])
            old["chosen"].setdefault(task, {}).update(chosen[task])
        old["meta"].setdefault("updates", []).append(
            {k: v for k, v in out["meta"].items() if k != "grids"})
        old["meta"]["grids"] = GRIDS
        out, chosen = old, old["chosen"]
    else:
        out["chosen"] = chosen
    print(json.dumps(chosen, indent=1))
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(cmp._json_ready(out), f, indent=1)
        print(f"wrote {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
