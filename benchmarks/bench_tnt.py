r"""Cost of a TNT step compared with an SGD-with-momentum step, its parts, and ASDL's K-FAC.

Everything runs in one process and is reported as a ratio to an SGD-m step of the same
network on the same batch (forward, mean Bernoulli loss, ``zero_grad``, backward,
``torch.optim.SGD(momentum=0.9).step``), because absolute times on a shared machine drift.

Network: the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU; the code layer and
the output layer are linear), Bernoulli likelihood (BCE-with-logits summed over the 784 outputs,
averaged over the batch), batch 1000, float32. The data are **random**: inputs drawn uniformly
from [0, 1] and used as their own targets (no MNIST download here); the cost of a step does
not depend on the values as long as they stay finite, which the script checks.

1. **Whole cycles.** ``curvlib.TNT`` with ``(T1, T2) = (1, 20)`` and ``(10, 100)`` is timed
   over whole cycles of ``T2`` steps (each cycle holds ``T2/T1`` statistics steps and one
   refresh of the inverses), after one warm-up cycle (TNT also refreshes on every statistics
   step while ``t < T2``). The time per step is the cycle time over ``T2``. SGD-m is timed in
   cycles of 20 steps, once before each other variant in every round. The parameters are reset
   to their initial values before every cycle (untimed), so that the runs stay finite.
2. **ASDL's K-FAC** (``asdfghjkl``; ``KfacGradientMaker`` with the MC Fisher of one sample of
   the same Bernoulli loss, EMA 0.9 of the factors, the same ``T1``, ``T2`` and damping, then
   ``torch.optim.SGD(momentum=0.9)``) in the same rounds, if it imports.
3. **Parts**, each timed alone on the same network and batch: forward (model + mean loss), the
   ordinary backward, the SGD-m update, and for TNT the sampled backward, the mode statistics,
   the inverses (one refresh) and the mode products (the direction). Each TNT part is timed
   twice: as curvlib runs it (``TrueFisher.collect``, ``TensorNormal.update``, ``.refresh``,
   ``.direction``) and as a bare reference written here with plain torch calls (bernoulli
   sampling + ``autograd.grad``; ``addmm_``/``addr_`` into the EMA; normalisation, damping,
   batched ``cholesky_ex`` + ``cholesky_inverse``; two ``mm`` per matrix, ``mv`` per bias).
   The sum of the parts per step is
   ``fwd + bwd + update + direction + (sampled bwd + statistics)/T1 + inverses/T2``;
   the report compares TNT's measured step with it (target ≤ 1.1×).
4. **Memory**: bytes of the statistics ``H_i`` and inverses per parameter tensor, against the
   parameter's own bytes (TNT's Table 1: ``O(Σ_i d_i²)`` beyond SGD), and ASDL's K-FAC factors.

Correctness checks (the bare parts compute what curvlib computes) run after the timing; the
exit status is 1 if one fails.

Run ``python benchmarks/bench_tnt.py`` (about 5 minutes on 2 idle cores);
``python benchmarks/bench_tnt.py --rounds 1 --part-rounds 2`` is a smoke run (~1 minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import sys
import time

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
    asdl_probe,
    bare_tnt_direction,
    cycle_record,
    interleave,
    loadavg,
    paired_rounds,
    rel_diff,
)

import curvlib
from curvlib.sources import TrueFisher

# the setting shared with bench_baselines.py (see _common.py)
WIDTHS, BATCH, SCHEDULES, SGD_CYCLE = AE_WIDTHS, AE_BATCH, AE_SCHEDULES, AE_SGD_CYCLE
LR, MOMENTUM, DAMPING, EMA = AE_LR, AE_MOMENTUM, AE_DAMPING, AE_EMA  # timing only
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CHECK_TOL = 1e-3  # float32 against float32 computed in another order


# --------------------------------------------------------------------------------------------
# whole training cycles


class Trainer(CycleTrainer):
    """A model copy with its optimizer (``kind``: ``"sgd"``, ``"tnt"`` or ``"asdl"``);
    ``cycle()`` runs ``steps`` training steps (see :class:`_common.CycleTrainer`)."""

    def __init__(self, kind: str, init: nn.Module, x: Tensor, steps: int,
                 t1: int = 1, t2: int = 1, seed: int = 0):
        def make(model: nn.Module):
            return curvlib.TNT(model, "bernoulli", lr=LR, damping=DAMPING, momentum=MOMENTUM,
                               ema=EMA, stat_every=t1, inverse_every=t2,
                               generator=torch.Generator().manual_seed(seed))

        super().__init__("curvlib" if kind == "tnt" else kind, init, x, steps, lr=LR,
                         momentum=MOMENTUM, make=make, t1=t1, t2=t2, damping=DAMPING, ema=EMA)


# --------------------------------------------------------------------------------------------
# parts


class Parts:
    """The pieces of a TNT step, timed one by one on a warmed-up TNT optimizer."""

    def __init__(self, init: nn.Module, x: Tensor, seed: int = 0):
        self.x = x
        self.lik = curvlib.as_likelihood("bernoulli")
        self.model = copy.deepcopy(init)
        self.params = [p for p in self.model.parameters()]
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.opt = curvlib.TNT(self.model, "bernoulli", lr=0.0, damping=DAMPING,
                               momentum=MOMENTUM, ema=EMA, stat_every=1, inverse_every=20,
                               generator=torch.Generator().manual_seed(seed))
        for _ in range(3):  # state: statistics, inverses, momentum buffers
            self._train_step()
        self.items = [(n, p, self.opt.state[p]) for n, p in self.model.named_parameters()]
        self.structure = self.opt.structure
        # SGD-m on its own copy (its update must not move the TNT copy)
        self.sgd_model = copy.deepcopy(init)
        self.sgd = torch.optim.SGD(self.sgd_model.parameters(), lr=0.0, momentum=MOMENTUM)
        self.lik.mean_loss(self.sgd_model(x), x).backward()
        self.sgd.step()
        # graph and statistics the timed parts start from
        self.out = self.loss = None
        self.stats = None
        self._build()
        self.stats = TrueFisher().collect(self.model, self.lik, self.out, x, generator=self.gen)
        self.grads = {n: g[0] for n, g in self.stats.batch_grads().items()}
        # bare copies of the EMA statistics (so the bare update does not touch curvlib's)
        self.bare_h = {n: [st[f"tnt_H{i}"].clone() for i in range(p.dim())]
                       for n, p, st in self.items}

    def _train_step(self) -> None:
        self.opt.zero_grad()
        out = self.model(self.x)
        self.opt.backward(out, self.x)
        self.opt.step()

    def _build(self) -> None:
        for p in self.params:
            p.grad = None
        self.out = self.model(self.x)
        self.loss = self.lik.mean_loss(self.out, self.x)

    # -- ordinary step pieces ---------------------------------------------------------------

    def forward(self) -> None:
        self.lik.mean_loss(self.model(self.x), self.x)

    def backward(self) -> None:
        self.loss.backward()

    def sgd_update(self) -> None:
        self.sgd.step()

    # -- curvlib's pieces ---------------------------------------------------------------------

    def collect(self) -> None:
        TrueFisher().collect(self.model, self.lik, self.out, self.x, generator=self.gen)

    def update(self) -> None:
        self.structure.update(self.items, self.stats, ema=EMA)

    def refresh(self) -> None:
        value = DAMPING
        self.structure.refresh(self.items, solver=self.opt.solver,
                               damping=lambda mats: self.opt.damping_rule(value, mats))

    def direction(self) -> None:
        for _, p, st in self.items:
            self.structure.direction(p, st, st["momentum_buffer"])

    # -- bare references -------------------------------------------------------------------

    def bare_sampled_backward(self) -> None:
        y = torch.bernoulli(self.out.detach().sigmoid(), generator=self.gen)
        torch.autograd.grad(self.lik.mean_loss(self.out, y), self.params, retain_graph=True)

    def bare_statistics(self) -> None:
        """EMA of the mode statistics, written into the EMA buffers by one BLAS call each."""
        a = 1.0 - EMA
        for name, g in self.grads.items():
            hs = self.bare_h[name]
            if g.dim() == 2:
                hs[0].addmm_(g, g.T, beta=EMA, alpha=a)
                hs[1].addmm_(g.T, g, beta=EMA, alpha=a)
            else:
                hs[0].addr_(g, g, beta=EMA, alpha=a)

    def bare_inverses(self) -> dict[int, Tensor]:
        """Eq. (5) normalisation, damping, one batched Cholesky inverse per factor size."""
        by_size: dict[int, list[Tensor]] = {}
        for _, p, st in self.items:
            hs = [st[f"tnt_H{i}"] for i in range(p.dim())]
            dims = tuple(p.shape)
            k = len(dims)
            traces = torch.stack([h.diagonal().sum() for h in hs])
            c0 = (traces.mean() / math.prod(dims)).clamp_min(0).pow(1.0 / k)
            for i, h in enumerate(hs):
                scale = c0.pow(k - 1) * (math.prod(dims) // dims[i])
                by_size.setdefault(dims[i], []).append(h / scale)
        out = {}
        for d, mats in by_size.items():
            a = torch.stack(mats)
            a.diagonal(dim1=-2, dim2=-1).add_(DAMPING)
            factor, _ = torch.linalg.cholesky_ex(a)
            out[d] = torch.cholesky_inverse(factor)
        return out

    def bare_direction(self) -> list[Tensor]:
        return bare_tnt_direction(self.items)

    # -- checks ---------------------------------------------------------------------------

    def checks(self) -> dict[str, float]:
        res = {}
        self._build()  # a fresh graph (the timed ordinary backward frees the last one)
        # direction
        bare = self.bare_direction()
        worst = max(rel_diff(b, self.structure.direction(p, st, st["momentum_buffer"]))
                    for b, (_, p, st) in zip(bare, self.items, strict=True))
        res["bare direction == TensorNormal.direction"] = worst
        # statistics: one EMA step from the same H and the same sampled gradient
        before = {n: [st[f"tnt_H{i}"].clone() for i in range(p.dim())]
                  for n, p, st in self.items}
        self.bare_h = {n: [h.clone() for h in hs] for n, hs in before.items()}
        self.structure.update(self.items, self.stats, ema=EMA)
        self.bare_statistics()
        res["bare statistics (addmm_) == TensorNormal.update"] = max(
            rel_diff(self.bare_h[n][i], st[f"tnt_H{i}"])
            for n, p, st in self.items for i in range(p.dim()))
        # inverses
        bare_inv = self.bare_inverses()
        self.refresh()
        seen: dict[int, int] = {}
        worst = 0.0
        for _, p, st in self.items:
            for i, d in enumerate(p.shape):
                j = seen.get(d, 0)
                seen[d] = j + 1
                worst = max(worst, rel_diff(bare_inv[d][j], st[f"tnt_inv{i}"]))
        res["bare inverses == TensorNormal.refresh"] = worst
        # sampled backward: same targets as curvlib's collect
        gen_state = self.gen.get_state()
        stats = TrueFisher().collect(self.model, self.lik, self.out, self.x, generator=self.gen)
        self.gen.set_state(gen_state)
        y = torch.bernoulli(self.out.detach().sigmoid(), generator=self.gen)
        grads = torch.autograd.grad(self.lik.mean_loss(self.out, y), self.params,
                                    retain_graph=True)
        names = [n for n, _ in self.model.named_parameters()]
        res["bare sampled backward == TrueFisher.collect"] = max(
            rel_diff(g, stats.batch_grads()[n][0]) for n, g in zip(names, grads, strict=True))
        return res


# --------------------------------------------------------------------------------------------
# memory


def memory_rows(trainer: Trainer) -> list[dict]:
    rows = []
    for name, p in trainer.model.named_parameters():
        st = trainer.opt.state[p]
        h = sum(v.numel() * v.element_size() for k, v in st.items()
                if k.startswith("tnt_H"))
        inv = sum(v.numel() * v.element_size() for k, v in st.items()
                  if k.startswith("tnt_inv"))
        pbytes = p.numel() * p.element_size()
        rows.append({"param": name, "shape": list(p.shape), "param_bytes": pbytes,
                     "factor_bytes": h, "inverse_bytes": inv,
                     "sum_d2": sum(d * d for d in p.shape),
                     "ratio": (h + inv) / pbytes})
    return rows


# --------------------------------------------------------------------------------------------
# main


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of whole cycles (default 5)")
    ap.add_argument("--part-rounds", type=int, default=15,
                    help="samples of every part (default 15)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-asdl", action="store_true", help="leave ASDL's K-FAC out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(RESULTS / "bench_tnt.json"),
                    help="where to write the results (default benchmarks/results/bench_tnt.json;"
                         " '' for none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    meta = ae_metadata(WIDTHS, BATCH,
                       hyper={"lr": LR, "momentum": MOMENTUM, "damping": DAMPING, "ema": EMA})
    print(f"# bench_tnt — {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['cpu']}, curvlib at {meta['curvlib_commit']}; load average at start "
          f"{meta['loadavg_start']}")
    x, init = ae_problem(args.seed, WIDTHS, BATCH)

    asdl_note = "not requested (--no-asdl)"
    use_asdl = False
    if not args.no_asdl:
        use_asdl, asdl_note = asdl_probe(init, x, lr=LR, momentum=MOMENTUM, damping=DAMPING,
                                         ema=EMA)
    meta["asdl"] = asdl_note
    print(f"# ASDL: {asdl_note}")

    # 1-2: whole cycles ------------------------------------------------------------------------
    trainers: dict[str, Trainer] = {}
    labels: dict[str, str] = {}
    for t1, t2 in SCHEDULES:
        trainers[f"tnt_{t1}_{t2}"] = Trainer("tnt", init, x, t2, t1, t2, args.seed)
        labels[f"tnt_{t1}_{t2}"] = f"TNT (T1={t1}, T2={t2})"
        if use_asdl:
            trainers[f"asdl_{t1}_{t2}"] = Trainer("asdl", init, x, t2, t1, t2)
            labels[f"asdl_{t1}_{t2}"] = f"ASDL K-FAC (T1={t1}, T2={t2})"
    sgd = Trainer("sgd", init, x, SGD_CYCLE)
    print("# warm-up cycles ...", flush=True)
    sgd.cycle()
    for tr in trainers.values():
        tr.cycle()  # one warm-up cycle: TNT's t < T2 phase, ASDL's first inverses
    sgd_timed = Timed("sgd", "SGD-m", sgd.cycle, prepare=sgd.reset, per=SGD_CYCLE)
    others = [Timed(k, labels[k], tr.cycle, prepare=tr.reset, per=tr.steps)
              for k, tr in trainers.items()]
    sgd_round = paired_rounds(sgd_timed, others, args.rounds)  # SGD samples of each round
    finite = all(math.isfinite(v) for tr in [sgd, *trainers.values()] for v in tr.losses)

    # 3: parts ----------------------------------------------------------------------------------
    print("# parts ...", flush=True)
    parts = Parts(init, x, args.seed)
    part_items = [
        Timed("fwd", "forward (model + mean loss)", parts.forward),
        Timed("bwd", "ordinary backward", parts.backward, prepare=parts._build),
        Timed("upd", "SGD-m update (torch.optim.SGD.step)", parts.sgd_update),
        Timed("collect", "sampled backward: TrueFisher.collect", parts.collect,
              prepare=parts._build),
        Timed("bare_sampled", "sampled backward: bernoulli + autograd.grad",
              parts.bare_sampled_backward, prepare=parts._build),
        Timed("update", "mode statistics: TensorNormal.update", parts.update),
        Timed("bare_stats", "mode statistics: addmm_/addr_ into the EMA",
              parts.bare_statistics),
        Timed("refresh", "inverses: TensorNormal.refresh (one refresh)", parts.refresh),
        Timed("bare_inv", "inverses: normalise + damp + batched cholesky_inverse",
              parts.bare_inverses),
        Timed("direction", "mode products: TensorNormal.direction", parts.direction),
        Timed("bare_dir", "mode products: two mm per matrix, mv per bias",
              parts.bare_direction),
    ]
    interleave(part_items, args.part_rounds)
    checks = parts.checks()
    meta["loadavg_end"] = loadavg()

    # report ------------------------------------------------------------------------------------
    sgd_ms = sgd_timed.median * 1e3
    by_key = {o.key: o for o in others}
    print()
    print(f"# {meta['model']}, batch {BATCH}, float32, {meta['data']}; "
          f"load average {meta['loadavg_start']} → {meta['loadavg_end']}")
    print()
    print("| variant | ms / step (median) | IQR | × SGD-m | per-round × SGD-m (median, range) "
          "| cycles |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []

    def cycle_row(item: Timed) -> dict:
        row = cycle_record(item, sgd_round, sgd_ms)
        q1, q3 = row["q1_ms"] / 1e3, row["q3_ms"] / 1e3
        print(f"| {item.label} | {row['ms_per_step']:.1f} | {q1 * 1e3:.1f}–{q3 * 1e3:.1f} | "
              f"{row['ratio_sgd']:.2f} | {row['per_round_ratio_median']:.2f} "
              f"({row['per_round_ratio_min']:.2f}–{row['per_round_ratio_max']:.2f}) | "
              f"{len(item.samples)}×{item.per} |")
        return row

    rows.append(cycle_row(sgd_timed))
    for o in others:
        rows.append(cycle_row(o))

    ratios = []
    if use_asdl:
        print()
        print("| comparison | ratio |")
        print("|---|---:|")
        for t1, t2 in SCHEDULES:
            tnt, asdl = by_key[f"tnt_{t1}_{t2}"], by_key[f"asdl_{t1}_{t2}"]
            r = tnt.median / asdl.median
            ratios.append({"name": f"TNT / ASDL K-FAC (T1={t1}, T2={t2})", "ratio": r})
            print(f"| TNT / ASDL K-FAC (T1={t1}, T2={t2}) | {r:.2f} |")

    p = {t.key: t.median * 1e3 for t in part_items}
    print()
    print("| part | ms (median) | IQR | × SGD-m step |")
    print("|---|---:|---:|---:|")
    part_rows = []
    for t in part_items:
        q1, q3 = t.quartiles()
        part_rows.append({"key": t.key, "label": t.label, "ms": t.median * 1e3,
                          "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                          "ratio_sgd": t.median * 1e3 / sgd_ms})
        print(f"| {t.label} | {t.median * 1e3:.2f} | {q1 * 1e3:.2f}–{q3 * 1e3:.2f} | "
              f"{t.median * 1e3 / sgd_ms:.3f} |")
    sgd_parts = p["fwd"] + p["bwd"] + p["upd"]
    print()
    print("| schedule | TNT ms/step | Σ curvlib parts | TNT / Σ curvlib parts | Σ bare parts | "
          "TNT / Σ bare parts | target ≤ 1.1 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    sums = []
    for t1, t2 in SCHEDULES:
        tnt_ms = by_key[f"tnt_{t1}_{t2}"].median * 1e3
        cur = sgd_parts + p["direction"] + (p["collect"] + p["update"]) / t1 + p["refresh"] / t2
        bare = (sgd_parts + p["bare_dir"] + (p["bare_sampled"] + p["bare_stats"]) / t1
                + p["bare_inv"] / t2)
        ok = "meets" if tnt_ms / bare <= 1.1 else "MISSES"
        sums.append({"schedule": [t1, t2], "tnt_ms": tnt_ms, "sum_curvlib_ms": cur,
                     "sum_bare_ms": bare, "tnt_over_curvlib": tnt_ms / cur,
                     "tnt_over_bare": tnt_ms / bare, "verdict": ok})
        print(f"| ({t1}, {t2}) | {tnt_ms:.1f} | {cur:.1f} | {tnt_ms / cur:.2f} | {bare:.1f} | "
              f"{tnt_ms / bare:.2f} | {ok} |")
    sums.append({"schedule": "sgd", "sgd_ms": sgd_ms, "sum_parts_ms": sgd_parts,
                 "sgd_over_parts": sgd_ms / sgd_parts})
    print(f"| SGD-m (check of the method) | {sgd_ms:.1f} | fwd+bwd+update {sgd_parts:.1f} | "
          f"{sgd_ms / sgd_parts:.2f} | | | |")

    mem = memory_rows(trainers[f"tnt_{SCHEDULES[0][0]}_{SCHEDULES[0][1]}"])
    asdl_mem = asdl_factor_bytes(trainers[f"asdl_{SCHEDULES[0][0]}_{SCHEDULES[0][1]}"].model) \
        if use_asdl else {}
    print()
    print("| parameter | shape | Σ d_i² | param MB | TNT H_i MB | TNT inverses MB | "
          "(H + inv) / param |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m in mem:
        print(f"| {m['param']} | {'×'.join(map(str, m['shape']))} | {m['sum_d2']} | "
              f"{fmt_mb(m['param_bytes'])} | {fmt_mb(m['factor_bytes'])} | "
              f"{fmt_mb(m['inverse_bytes'])} | {m['ratio']:.2f} |")
    tot_p = sum(m["param_bytes"] for m in mem)
    tot_h = sum(m["factor_bytes"] for m in mem)
    tot_i = sum(m["inverse_bytes"] for m in mem)
    tot_w = sum(m["factor_bytes"] + m["inverse_bytes"] for m in mem if len(m["shape"]) == 2)
    tot_wp = sum(m["param_bytes"] for m in mem if len(m["shape"]) == 2)
    print(f"| **all** | | | {fmt_mb(tot_p)} | {fmt_mb(tot_h)} | {fmt_mb(tot_i)} | "
          f"{(tot_h + tot_i) / tot_p:.2f} |")
    print(f"| weights only | | | {fmt_mb(tot_wp)} | | | {tot_w / tot_wp:.2f} |")
    if asdl_mem:
        a = sum(asdl_mem.values())
        print(f"| ASDL K-FAC (A, B, A⁻¹, B⁻¹ of all layers) | | | {fmt_mb(tot_p)} | | "
              f"{fmt_mb(a)} | {a / tot_p:.2f} |")

    print()
    print("| check | relative difference | ok |")
    print("|---|---:|---|")
    check_rows = {}
    for name, d in checks.items():
        ok = d <= CHECK_TOL
        check_rows[name] = {"rel_diff": d, "tolerance": CHECK_TOL, "ok": ok}
        print(f"| {name} | {d:.1e} | {'yes' if ok else 'NO'} |")
    print(f"| losses finite in every timed cycle | {'yes' if finite else 'NO'} | "
          f"{'yes' if finite else 'NO'} |")
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(wall time {meta['wall_s']} s)")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "cycles": rows, "tnt_vs_asdl": ratios, "parts": part_rows,
                       "sums": sums, "memory": mem, "asdl_memory_bytes": asdl_mem,
                       "checks": check_rows,
                       "final_losses": {k: tr.losses[-1] for k, tr in
                                        [("sgd", sgd), *trainers.items()]}},
                      f, indent=2, ensure_ascii=False)
    return 0 if finite and all(c["ok"] for c in check_rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
