r"""KFAC and Shampoo step times next to TNT and ASDL's K-FAC, as ratios to an SGD-m step.

Everything runs in one process and every time is reported as a ratio to an SGD-m step of the
same network on the same batch (forward, mean Bernoulli loss, ``zero_grad``, backward,
``torch.optim.SGD(momentum=0.9).step``), because absolute times on a shared machine drift.

Setting: the one of ``bench_tnt.py`` (shared through ``_common.py``): the MNIST autoencoder
784-1000-500-250-30-250-500-1000-784 (ReLU; the code layer and the output layer are linear),
Bernoulli likelihood (BCE-with-logits summed over the 784 outputs, averaged over the batch),
batch 1000, float32, **random** data (inputs uniform in [0, 1], used as their own targets),
lr 1e-4, momentum 0.9, damping 0.1, EMA 0.9 for every method (the cost of a step does not
depend on these values while the losses stay finite, which the script checks).

Methods, each at ``(T1, T2) = (1, 20)`` and ``(10, 100)`` (statistics every ``T1`` steps,
inverses / inverse roots every ``T2`` steps):

* ``curvlib.TNT`` — ``TrueFisher`` (one sampled target per example, batch gradient),
  ``tensor_normal``, Cholesky;
* ``curvlib.KFAC`` — ``TrueFisher(per_sample=True)`` (one sampled target per example, per-layer
  Kronecker factors from the layer plugins), ``kfac`` (bias folded into ``A``, ``√damping``
  added to each factor), Cholesky;
* ``curvlib.Shampoo`` — ``empirical`` (the data's targets), ``shampoo`` with ``as_is``
  reshape, inverse roots ``(H_i + εI)^{-1/(2k)}`` by ``eigh``; and the same with
  ``solver="newton"`` (coupled Newton iteration);
* ASDL's K-FAC (``asdfghjkl``: ``KfacGradientMaker`` with the MC Fisher of one sample of the
  same Bernoulli loss, EMA 0.9 of the factors, the same ``T1``, ``T2`` and damping, then
  ``torch.optim.SGD(momentum=0.9)``), as in ``bench_tnt.py``, if it imports.

Timing. Each method is timed over whole cycles of ``T2`` steps (``T2/T1`` statistics steps
and one refresh each), after one untimed warm-up cycle (curvlib refreshes at every statistics
step while ``t < T2``; ASDL computes its first inverses). ms/step = cycle time / ``T2``. In
every round each cycle is timed right after one SGD-m cycle of 20 steps, and the order of the
methods rotates by one per round; medians over the rounds. Parameters are reset to their
initial values before every cycle (untimed; the optimizer state stays). "× SGD-m" is the
ratio of the medians; "× TNT" the ratio of the method's median to TNT's at the same
``(T1, T2)``; per-round ratios (median and range) are in the second table and the JSON.

Memory: the bytes of each method's curvature state — every tensor in ``opt.state`` except
``momentum_buffer`` (factors, inverses or roots, counters) for curvlib; ASDL's ``A``, ``B``,
``A⁻¹``, ``B⁻¹`` — over the bytes of the parameters.

Checks (exit status 1 if one fails):

* after one statistics step on the same batch with the same sampled targets, curvlib's KFAC
  factors of every layer equal ASDL's, up to two conventions: ASDL's ``A`` has no bias
  row/column (curvlib folds the bias into ``A``; the leading ``D × D`` block is compared), and
  ASDL's EMA starts from zero, so after one update it holds ``(1 − ema)·A_batch`` where
  curvlib's first update sets ``A_batch`` (curvlib's factors are multiplied by ``1 − ema``);
* after one statistics step from the same parameters (empirical source: identical ``H_i``),
  Shampoo's inverse roots by ``newton`` equal those by ``eigh`` (float32; ``NEWTON_TOL``);
* each timed cycle held ``T2/T1`` statistics steps (curvlib's update counters);
* every timed cycle ended with a finite loss.

Run ``python benchmarks/bench_baselines.py`` on an idle machine (about 15 minutes on 2 cores,
an estimate: the Newton refreshes dominate the warm-up); ``--quick`` is a smoke run on a tiny
autoencoder (one round, every check, writes nothing unless ``--json`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    AE_BATCH,
    AE_DAMPING,
    AE_EMA,
    AE_LR,
    AE_MOMENTUM,
    AE_SCHEDULES,
    AE_SGD_CYCLE,
    AE_WIDTHS,
    CycleTrainer,
    Timed,
    ae_metadata,
    ae_problem,
    asdl_factor_bytes,
    asdl_kfac,
    asdl_probe,
    bernoulli_sum_loss,
    cycle_record,
    loadavg,
    paired_rounds,
    rel_diff,
)

import curvlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
QUICK_WIDTHS = (64, 48, 32, 16, 8, 16, 32, 48, 64)  # --quick: same shape of network, tiny
QUICK_BATCH = 64
FACTOR_TOL = 1e-5  # the same float32 products, summed in another order
NEWTON_TOL = 1e-4  # an iteration against eigh in float32 (2.5e-6 on the full network)

#: curvlib methods: key → (label, recipe keyword arguments besides the shared ones)
CURVLIB: dict[str, tuple[str, Callable[..., object], dict]] = {
    "tnt": ("TNT", curvlib.TNT, {}),
    "kfac": ("KFAC", curvlib.KFAC, {}),
    "shampoo": ("Shampoo (eigh)", curvlib.Shampoo, {"solver": "eigh"}),
    "shampoo_newton": ("Shampoo (newton)", curvlib.Shampoo, {"solver": "newton"}),
}


def maker(method: str, t1: int, t2: int, seed: int) -> Callable[[nn.Module], object]:
    """``model → optimizer`` for a curvlib method at ``(T1, T2)``, with the shared
    hyperparameters passed explicitly (the recipes' own EMA defaults differ: TNT 0.9,
    KFAC and Shampoo 0.95)."""
    _, recipe, extra = CURVLIB[method]

    def make(model: nn.Module):
        return recipe(model, "bernoulli", lr=AE_LR, damping=AE_DAMPING, momentum=AE_MOMENTUM,
                      ema=AE_EMA, stat_every=t1, inverse_every=t2,
                      generator=torch.Generator().manual_seed(seed), **extra)

    return make


# --------------------------------------------------------------------------------------------
# memory


def curvature_state(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in ``opt.state`` except the momentum buffers, by key family
    (trailing mode digits dropped: ``tnt_H0``, ``tnt_H1`` → ``tnt_H``)."""
    out: dict[str, int] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if key == "momentum_buffer" or not isinstance(value, Tensor):
                continue
            family = re.sub(r"\d+$", "", key)
            out[family] = out.get(family, 0) + value.numel() * value.element_size()
    return out


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# checks


def check_kfac_vs_asdl(init: nn.Module, x: Tensor, t2: int, seed: int) -> dict[str, float]:
    """One statistics step of curvlib's KFAC (a whole training step) and of ASDL's K-FAC
    (``update_curvature`` alone) from the same parameters, with the targets curvlib sampled
    given to ASDL: worst relative difference of ``A`` and of ``B`` over the layers, after the
    convention changes of the module docstring."""
    model_c = copy.deepcopy(init)
    opt = maker("kfac", 1, t2, seed)(model_c)
    before = opt.generator.get_state()
    opt.zero_grad()
    out = model_c(x)
    opt.backward(out, x)
    opt.step()
    lik = curvlib.as_likelihood("bernoulli")
    y = lik.sample(out.detach(), generator=torch.Generator().set_state(before))

    def fixed(logits: Tensor) -> Tensor:
        if logits.shape != y.shape:
            raise RuntimeError(f"ASDL's logits {tuple(logits.shape)} vs targets "
                               f"{tuple(y.shape)}")
        return y

    # ASDL's statistics step alone: its refresh (the first step's other half) adds the
    # damping to each factor's diagonal in place and subtracts it again, which rounds the
    # diagonal of the stored factor (relative 2e-5 on the quick network)
    model_a = copy.deepcopy(init)
    gm = asdl_kfac(model_a, batch=x.shape[0], damping=AE_DAMPING, t1=1, t2=t2, ema=AE_EMA,
                   sampler=fixed)
    dummy = gm.setup_model_call(model_a, x)
    gm.setup_loss_call(bernoulli_sum_loss, dummy, x)
    gm.update_curvature()

    worst_a = worst_b = 0.0
    layers = 0
    modules_a = dict(model_a.named_modules())
    for name, module in model_c.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        state = opt.state[module.weight]
        kron = modules_a[name].fisher.kron
        d = module.in_features
        a_c = state["kfac_A"][0, :d, :d] * (1 - AE_EMA)
        b_c = state["kfac_B"][0] * (1 - AE_EMA)
        worst_a = max(worst_a, rel_diff(kron.A, a_c))
        worst_b = max(worst_b, rel_diff(kron.B, b_c))
        layers += 1
    if layers == 0:
        raise RuntimeError("no Linear layer compared")
    return {f"KFAC input factor A == ASDL's A ({layers} layers; D×D block, × (1 − ema))":
            worst_a,
            f"KFAC output-gradient factor B == ASDL's B ({layers} layers, × (1 − ema))":
            worst_b}


def check_newton_vs_eigh(init: nn.Module, x: Tensor, t2: int) -> float:
    """One statistics step of Shampoo with each solver from the same parameters on the same
    batch (the empirical source makes the statistics identical): worst relative difference
    of the inverse roots ``shampoo_P*`` over all tensors and modes."""
    roots = []
    for method in ("shampoo", "shampoo_newton"):
        model = copy.deepcopy(init)
        opt = maker(method, 1, t2, 0)(model)
        opt.zero_grad()
        opt.backward(model(x), x)
        opt.step()
        roots.append({(n, k): v for n, p in model.named_parameters()
                      for k, v in opt.state[p].items() if k.startswith("shampoo_P")})
    eigh, newton = roots
    if not eigh or eigh.keys() != newton.keys():
        raise RuntimeError("the two Shampoo optimizers hold different roots")
    return max(rel_diff(newton[k], eigh[k]) for k in eigh)


def statistics_steps(opt: torch.optim.Optimizer) -> float:
    """The largest curvlib update counter (``*_updates``) in the optimizer state."""
    counts = [float(v) for st in opt.state.values() for k, v in st.items()
              if k.endswith("_updates")]
    return max(counts) if counts else float("nan")


# --------------------------------------------------------------------------------------------
# main


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of whole cycles (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one round on a tiny autoencoder "
                         f"({'-'.join(map(str, QUICK_WIDTHS))}, batch {QUICK_BATCH}); every "
                         "check runs; timings meaningless; writes no JSON unless --json")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-asdl", action="store_true", help="leave ASDL's K-FAC out")
    ap.add_argument("--no-newton", action="store_true",
                    help="leave Shampoo with the newton solver out (its refreshes are slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None,
                    help="where to write the results (default benchmarks/results/"
                         "bench_baselines.json, but nothing with --quick; '' for none)")
    args = ap.parse_args(argv)
    widths, batch = (QUICK_WIDTHS, QUICK_BATCH) if args.quick else (AE_WIDTHS, AE_BATCH)
    if args.quick:
        args.rounds = 1
    if args.json is None:
        args.json = "" if args.quick else str(RESULTS / "bench_baselines.json")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    meta = ae_metadata(widths, batch, quick=args.quick,
                       hyper={"lr": AE_LR, "momentum": AE_MOMENTUM, "damping": AE_DAMPING,
                              "ema": AE_EMA})
    print(f"# bench_baselines — {meta['date']}, torch {meta['torch']}, {meta['threads']} "
          f"threads, {meta['cpu']}, curvlib at {meta['curvlib_commit']}; load average at start "
          f"{meta['loadavg_start']}" + ("; QUICK smoke run (tiny network)" if args.quick else ""))
    x, init = ae_problem(args.seed, widths, batch)

    asdl_note = "not requested (--no-asdl)"
    use_asdl = False
    if not args.no_asdl:
        use_asdl, asdl_note = asdl_probe(init, x, lr=AE_LR, momentum=AE_MOMENTUM,
                                         damping=AE_DAMPING, ema=AE_EMA)
    meta["asdl"] = asdl_note
    print(f"# ASDL: {asdl_note}")

    methods = [m for m in CURVLIB if not (args.no_newton and m == "shampoo_newton")]
    trainers: dict[str, CycleTrainer] = {}
    labels: dict[str, str] = {}
    schedule_of: dict[str, tuple[int, int]] = {}
    for t1, t2 in AE_SCHEDULES:
        for m in methods:
            key = f"{m}_{t1}_{t2}"
            trainers[key] = CycleTrainer("curvlib", init, x, t2, lr=AE_LR,
                                         momentum=AE_MOMENTUM, make=maker(m, t1, t2, args.seed))
            labels[key] = CURVLIB[m][0]
            schedule_of[key] = (t1, t2)
        if use_asdl:
            key = f"asdl_{t1}_{t2}"
            trainers[key] = CycleTrainer("asdl", init, x, t2, lr=AE_LR, momentum=AE_MOMENTUM,
                                         t1=t1, t2=t2, damping=AE_DAMPING, ema=AE_EMA)
            labels[key] = "ASDL K-FAC"
            schedule_of[key] = (t1, t2)
    sgd = CycleTrainer("sgd", init, x, AE_SGD_CYCLE, lr=AE_LR, momentum=AE_MOMENTUM)

    print("# warm-up cycles ...", flush=True)
    sgd.cycle()
    for key, tr in trainers.items():
        start = time.perf_counter()
        tr.cycle()  # curvlib's t < T2 phase, ASDL's first inverses
        print(f"#   {key}: {time.perf_counter() - start:.1f} s", flush=True)
    sgd_timed = Timed("sgd", "SGD-m", sgd.cycle, prepare=sgd.reset, per=AE_SGD_CYCLE)
    others = [Timed(k, labels[k], tr.cycle, prepare=tr.reset, per=tr.steps)
              for k, tr in trainers.items()]
    sgd_round = paired_rounds(sgd_timed, others, args.rounds)
    finite = all(math.isfinite(v) for tr in [sgd, *trainers.values()] for v in tr.losses)
    meta["loadavg_end"] = loadavg()

    # rows ----------------------------------------------------------------------------------------
    sgd_ms = sgd_timed.median * 1e3
    by_key = {o.key: o for o in others}
    rows = [cycle_record(sgd_timed, sgd_round, sgd_ms)]
    for o in others:
        row = cycle_record(o, sgd_round, sgd_ms)
        t1, t2 = schedule_of[o.key]
        tnt = by_key[f"tnt_{t1}_{t2}"]
        per_round = [s / t for s, t in zip(o.samples, tnt.samples, strict=True)]
        row.update({"method": o.label, "schedule": [t1, t2], "ratio_tnt": o.median / tnt.median,
                    "per_round_ratio_tnt_median": statistics.median(per_round),
                    "per_round_ratio_tnt_min": min(per_round),
                    "per_round_ratio_tnt_max": max(per_round)})
        rows.append(row)

    print()
    print(f"# {meta['model']}, batch {batch}, float32, {meta['data']}; load average "
          f"{meta['loadavg_start']} → {meta['loadavg_end']}")
    print()
    print("| method | T1/T2 | step ms | × SGD-m | × TNT |")
    print("|---|---|---:|---:|---:|")
    print(f"| SGD-m | — | {sgd_ms:.1f} | 1.00 | |")
    for row in rows[1:]:
        t1, t2 = row["schedule"]
        print(f"| {row['method']} | {t1}/{t2} | {row['ms_per_step']:.1f} | "
              f"{row['ratio_sgd']:.2f} | {row['ratio_tnt']:.2f} |")
    print()
    print("| method | T1/T2 | IQR ms | per-round × SGD-m: median (range) | "
          "per-round × TNT: median (range) | cycles |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows[1:]:
        t1, t2 = row["schedule"]
        print(f"| {row['method']} | {t1}/{t2} | {row['q1_ms']:.1f}–{row['q3_ms']:.1f} | "
              f"{row['per_round_ratio_median']:.2f} ({row['per_round_ratio_min']:.2f}–"
              f"{row['per_round_ratio_max']:.2f}) | {row['per_round_ratio_tnt_median']:.2f} "
              f"({row['per_round_ratio_tnt_min']:.2f}–{row['per_round_ratio_tnt_max']:.2f}) | "
              f"{row['cycles']}×{row['steps_per_cycle']} |")

    # memory --------------------------------------------------------------------------------------
    t1, t2 = AE_SCHEDULES[0]
    pbytes = param_bytes(init)
    memory = []
    for m in methods:
        parts = curvature_state(trainers[f"{m}_{t1}_{t2}"].opt)
        memory.append({"method": CURVLIB[m][0], "bytes": sum(parts.values()), "by_key": parts})
    if use_asdl:
        parts = asdl_factor_bytes(trainers[f"asdl_{t1}_{t2}"].model)
        memory.append({"method": "ASDL K-FAC", "bytes": sum(parts.values()),
                       "by_key": {"A, B, A_inv, B_inv of " + k: v for k, v in parts.items()}})
    print()
    print(f"| method | curvature state MB | × parameter bytes ({fmt_mb(pbytes)} MB) | held in |")
    print("|---|---:|---:|---|")
    for mem in memory:
        mem["ratio_params"] = mem["bytes"] / pbytes
        if mem["method"] == "ASDL K-FAC":
            held = "A, B, A⁻¹, B⁻¹ per layer (on the modules)"
        else:  # the matrices; counters and markers (a few bytes) are in the total
            held = ", ".join(f"{k} {fmt_mb(v)}" for k, v in mem["by_key"].items()
                             if v >= 0.01 * mem["bytes"])
        print(f"| {mem['method']} | {fmt_mb(mem['bytes'])} | {mem['ratio_params']:.2f} | "
              f"{held} |")

    # checks --------------------------------------------------------------------------------------
    print("# checks ...", flush=True)
    checks: dict[str, dict] = {}
    if use_asdl:
        for name, d in check_kfac_vs_asdl(init, x, AE_SCHEDULES[0][1], args.seed).items():
            checks[name] = {"value": d, "tolerance": FACTOR_TOL, "ok": d <= FACTOR_TOL}
    if not args.no_newton:
        d = check_newton_vs_eigh(init, x, AE_SCHEDULES[0][1])
        checks["Shampoo inverse roots: newton == eigh (one statistics step)"] = {
            "value": d, "tolerance": NEWTON_TOL, "ok": d <= NEWTON_TOL}
    for key, tr in trainers.items():
        if tr.kind != "curvlib":
            continue
        t1, t2 = schedule_of[key]
        expected = (1 + len(by_key[key].samples)) * (t2 // t1)  # warm-up + timed cycles
        got = statistics_steps(tr.opt)
        checks[f"{key}: statistics steps = cycles × T2/T1 ({expected})"] = {
            "value": got, "tolerance": 0, "ok": got == expected}
    checks["losses finite in every timed cycle"] = {"value": float(finite), "tolerance": None,
                                                    "ok": finite}
    print()
    print("| check | value | tolerance | ok |")
    print("|---|---:|---:|---|")
    for name, c in checks.items():
        value = f"{c['value']:.1e}" if isinstance(c["value"], float) and c["tolerance"] else \
            f"{c['value']:g}"
        tol = "" if c["tolerance"] is None else f"{c['tolerance']:g}"
        print(f"| {name} | {value} | {tol} | {'yes' if c['ok'] else 'NO'} |")
    ok = all(c["ok"] for c in checks.values())
    if not ok:
        print("A CORRECTNESS CHECK FAILED", file=sys.stderr)

    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(wall time {meta['wall_s']} s)")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "cycles": rows, "memory": memory,
                       "param_bytes": pbytes, "checks": checks,
                       "final_losses": {k: tr.losses[-1] for k, tr in
                                        [("sgd", sgd), *trainers.items()]}},
                      f, indent=2, ensure_ascii=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
