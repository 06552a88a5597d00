r"""Micro-benchmarks of candidate savings in TNT's parts (before: curvlib as it is; after: a
change written here, not in curvlib), on the tensors of the MNIST autoencoder of
``bench_tnt.py`` (784-1000-500-250-30-250-500-1000-784, batch 1000, float32, random data).

Every candidate is timed as a before/after pair over **all 16 parameter tensors of the
network** (what one step or one refresh costs), interleaved in rounds with rotating order;
medians are reported with the ratio after/before, and each pair is checked to compute the same
result (relative difference, float32). The candidates:

A. mode statistics: curvlib's ``mode_statistics`` (up to 7dd0f5f: opt_einsum, then ``/ S``;
   from da5d61b: ``mm``/``outer`` for one draw) vs ``torch.mm(G, Gᵀ)``, ``torch.mm(Gᵀ, G)``
   (``torch.outer`` for a bias);
B. statistics + EMA as ``TensorNormal.update`` does them (up to 7dd0f5f: statistic,
   ``isfinite`` of each statistic, ``mul_`` + ``add_``; from da5d61b: ``mm``, finiteness
   from the traces, ``lerp_``) vs one fused ``addmm_(G, Gᵀ, beta=ema, alpha=1-ema)`` per
   factor (``addr_`` for a bias) after one finiteness check of ``G`` (no statistic tensor);
C. finiteness check alone: ``isfinite(S).all()`` on every statistic (curvlib up to 7dd0f5f;
   da5d61b checks the traces instead) vs ``isfinite(G).all()`` on the gradient vs
   ``isfinite(G.sum())``;
D. direction: ``TensorNormal.direction`` (one opt_einsum contraction at 7dd0f5f) vs
   ``inv₀ @ M @ inv₁ᵀ`` with two ``torch.mm`` (``torch.mv`` for a bias);
E. refresh: ``TensorNormal.refresh`` (normalise, stack, stack of previous inverses,
   symmetrise + damp, ``robust_inverse``: element-wise ``isfinite`` and mask-indexed copies,
   ``cholesky_ex``, ``cholesky_inverse``, ``isfinite`` of the result, index_put, copy back) vs
   a lean refresh (stack the raw statistics once, normalise and damp that copy in place,
   ``cholesky_ex`` + ``cholesky_inverse``, success = ``info == 0`` and a finite sum per
   inverse, copy back; the previous inverses and the recovery policy only where a matrix
   failed);
F. the inverse kernel alone, per factor size present in the network (batched as curvlib
   groups them): ``cholesky_ex`` + ``cholesky_inverse`` vs ``cholesky_ex`` +
   ``cholesky_solve(I)`` vs ``torch.linalg.inv_ex``, and batched vs one matrix at a time;
G. target sampling in ``Bernoulli.sample``: ``torch.bernoulli(σ(f))`` vs
   ``(torch.rand_like < σ(f))`` (same distribution, not the same draws);
H. ``TrueFisher.collect``'s extra ``mean_loss(outputs.detach(), targets)`` (the loss the
   optimizer already has): its cost alone;
I. the per-call overhead on a small network (the digits autoencoder
   64-128-64-32-8-32-64-128-64, batch 100, of ``digits_autoencoder.py``): ``TensorNormal.update``
   + ``TensorNormal.direction`` for all 16 tensors vs the plain torch calls of B and D, next to
   a whole SGD-m step of that network.

Run ``python benchmarks/micro_tnt.py`` (about 2 minutes on 2 idle cores);
``--rounds 3`` is a smoke run. ``--threads 1`` is steadier on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    Timed,
    autoencoder,
    bare_tnt_direction,
    bare_tnt_ema,
    interleave,
    loadavg,
    metadata,
    rel_diff,
)

import curvlib
from curvlib.solvers import robust_inverse
from curvlib.sources import TrueFisher
from curvlib.structures.tensor_normal import mode_statistics, normalise

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
SMALL = (64, 128, 64, 32, 8, 32, 64, 128, 64)
BATCH = 1000
EMA, DAMPING = 0.9, 0.1
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CHECK_TOL = 1e-4


def setup(seed: int, widths=WIDTHS, batch: int = BATCH):
    """A TNT optimizer with statistics and inverses, and one sampled gradient per tensor."""
    torch.manual_seed(seed)
    x = torch.rand(batch, widths[0])
    model = autoencoder(widths)
    lik = curvlib.as_likelihood("bernoulli")
    opt = curvlib.TNT(model, "bernoulli", lr=0.0, damping=DAMPING, ema=EMA, stat_every=1,
                      inverse_every=20, generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model(x), x)
        opt.step()
    out = model(x)
    stats = TrueFisher().collect(model, lik, out, x, generator=torch.Generator().manual_seed(1))
    items = [(n, p, opt.state[p]) for n, p in model.named_parameters()]
    grads = {n: g for n, g in stats.batch_grads().items()}  # (1, *shape)
    return model, opt, lik, x, out, stats, items, grads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="samples per variant (default 21)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(RESULTS / "micro_tnt.json"),
                    help="output JSON ('' for none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = metadata(model="autoencoder " + "-".join(map(str, WIDTHS)), batch=BATCH,
                    dtype="float32", data="random: inputs uniform in [0, 1], targets = inputs")
    print(f"# micro_tnt — {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['cpu']}, curvlib at {meta['curvlib_commit']}; load average at start "
          f"{meta['loadavg_start']}", flush=True)
    model, opt, lik, x, out, stats, items, grads = setup(args.seed)
    structure = opt.structure
    pairs: list[tuple[str, list[Timed], dict[str, float]]] = []

    # A. mode statistics ---------------------------------------------------------------------
    def stats_before():
        return {n: mode_statistics(g) for n, g in grads.items()}

    def stats_after():
        res = {}
        for n, g in grads.items():
            m = g[0]
            res[n] = [torch.mm(m, m.T), torch.mm(m.T, m)] if m.dim() == 2 else [torch.outer(m, m)]
        return res

    b, a = stats_before(), stats_after()
    check = max(rel_diff(a[n][i], b[n][i]) for n in b for i in range(len(b[n])))
    pairs.append(("A mode statistics (all tensors)",
                  [Timed("A_before", "curvlib mode_statistics", stats_before),
                   Timed("A_after", "torch.mm(G, Gᵀ), torch.mm(Gᵀ, G); outer for bias",
                         stats_after)],
                  {"after == before": check}))

    # B. statistics + EMA ---------------------------------------------------------------------
    h_before = {n: [st[f"tnt_H{i}"].clone() for i in range(p.dim())] for n, p, st in items}
    h_after = {n: [h.clone() for h in hs] for n, hs in h_before.items()}
    b_items = [(n, p, {**st, **{f"tnt_H{i}": h_before[n][i] for i in range(p.dim())}})
               for n, p, st in items]

    def ema_before():
        structure.update(b_items, stats, ema=EMA)

    def ema_after():
        bare_tnt_ema(grads, h_after, EMA)

    # one step of each from equal states, for the check
    ema_before()
    ema_after()
    check = max(rel_diff(h_after[n][i], h_before[n][i]) for n in h_before
                for i in range(len(h_before[n])))
    pairs.append(("B statistics + EMA (TensorNormal.update)",
                  [Timed("B_before", "TensorNormal.update", ema_before),
                   Timed("B_after", "isfinite(G) + addmm_/addr_(beta=ema, alpha=1-ema)",
                         ema_after)],
                  {"after == before (one EMA step)": check}))

    # C. finiteness checks ---------------------------------------------------------------------
    s_all = [s for v in stats_after().values() for s in v]

    def fin_s():
        return all(bool(torch.isfinite(s).all()) for s in s_all)

    def fin_g():
        return all(bool(torch.isfinite(g).all()) for g in grads.values())

    def fin_sum():
        return all(bool(torch.isfinite(g.sum())) for g in grads.values())

    pairs.append(("C finiteness check (all tensors)",
                  [Timed("C_stats", "isfinite(S).all() per statistic (curvlib to 7dd0f5f)",
                         fin_s),
                   Timed("C_grad", "isfinite(G).all() per gradient", fin_g),
                   Timed("C_sum", "isfinite(G.sum()) per gradient", fin_sum)],
                  {}))

    # D. direction -------------------------------------------------------------------------------
    def dir_before():
        return [structure.direction(p, st, st["momentum_buffer"]) for _, p, st in items]

    def dir_after():
        return bare_tnt_direction(items)

    check = max(rel_diff(a_, b_) for a_, b_ in zip(dir_after(), dir_before(), strict=True))
    pairs.append(("D direction (all tensors)",
                  [Timed("D_before", "TensorNormal.direction", dir_before),
                   Timed("D_after", "two torch.mm per matrix, torch.mv per bias", dir_after)],
                  {"after == before": check}))

    # E. refresh ---------------------------------------------------------------------------------
    e_items = [(n, p, {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()})
               for n, p, st in items]
    e_items2 = [(n, p, {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()})
                for n, p, st in items]
    damping_rule = opt.damping_rule

    def refresh_before():
        structure.refresh(e_items, solver=opt.solver,
                          damping=lambda mats: damping_rule(DAMPING, mats))

    def refresh_after():
        lean_refresh(structure, e_items2, opt.solver, DAMPING)

    refresh_before()
    refresh_after()
    check = max(rel_diff(st2[f"tnt_inv{i}"], st1[f"tnt_inv{i}"])
                for (_, p, st1), (_, _, st2) in zip(e_items, e_items2, strict=True)
                for i in range(p.dim()))
    pairs.append(("E refresh (all factors)",
                  [Timed("E_before", "TensorNormal.refresh", refresh_before),
                   Timed("E_after", "lean refresh (one stacked copy, in-place normalise + "
                                    "damp, sum-based finiteness)", refresh_after)],
                  {"after == before": check}))

    # F. the inverse kernel, per size --------------------------------------------------------
    groups: dict[int, list[Tensor]] = {}
    for _, p, st in items:
        hs = [st[f"tnt_H{i}"] for i in range(p.dim())]
        for u in normalise(hs, tuple(p.shape)):
            groups.setdefault(u.shape[0], []).append(u)
    damped = {}
    for d, mats in groups.items():
        a_ = torch.stack(mats)
        a_.diagonal(dim1=-2, dim2=-1).add_(DAMPING)
        damped[d] = a_

    def inv_chol_inverse():
        return {d: torch.cholesky_inverse(torch.linalg.cholesky_ex(a_)[0])
                for d, a_ in damped.items()}

    def inv_chol_solve():
        res = {}
        for d, a_ in damped.items():
            eye = torch.eye(d).expand_as(a_)
            res[d] = torch.cholesky_solve(eye, torch.linalg.cholesky_ex(a_)[0])
        return res

    def inv_lu():
        return {d: torch.linalg.inv_ex(a_)[0] for d, a_ in damped.items()}

    def inv_loop():
        return {d: torch.stack([torch.cholesky_inverse(torch.linalg.cholesky_ex(m)[0])
                                for m in a_]) for d, a_ in damped.items()}

    ref = inv_chol_inverse()
    checks_f = {
        "cholesky_solve(I) == cholesky_inverse": max(rel_diff(v, ref[d])
                                                     for d, v in inv_chol_solve().items()),
        "linalg.inv_ex == cholesky_inverse": max(rel_diff(v, ref[d]) for d, v in inv_lu().items()),
        "one at a time == batched": max(rel_diff(v, ref[d]) for d, v in inv_loop().items()),
    }
    sizes = ", ".join(f"{len(v)}×{d}" for d, v in sorted(groups.items(), reverse=True))
    pairs.append((f"F inverse kernel ({sizes})",
                  [Timed("F_chol_inverse", "cholesky_ex + cholesky_inverse, batched (now)",
                         inv_chol_inverse),
                   Timed("F_chol_solve", "cholesky_ex + cholesky_solve(I), batched",
                         inv_chol_solve),
                   Timed("F_lu", "linalg.inv_ex (LU), batched", inv_lu),
                   Timed("F_loop", "cholesky_ex + cholesky_inverse, one matrix at a time",
                         inv_loop)],
                  checks_f))

    # G. sampling --------------------------------------------------------------------------------
    probs_src = out.detach()
    gen = torch.Generator().manual_seed(3)

    def sample_bernoulli():
        return torch.bernoulli(probs_src.sigmoid(), generator=gen)

    def sample_rand():
        p_ = probs_src.sigmoid()
        return (torch.rand(p_.shape, generator=gen) < p_).to(p_.dtype)

    m1 = torch.stack([sample_bernoulli() for _ in range(20)]).mean(0)
    m2 = torch.stack([sample_rand() for _ in range(20)]).mean(0)
    pairs.append(("G target sampling (1000×784 Bernoulli)",
                  [Timed("G_before", "torch.bernoulli(σ(f), generator)", sample_bernoulli),
                   Timed("G_after", "(torch.rand(generator) < σ(f)).float()", sample_rand)],
                  {"mean of 20 draws, |after − before| (same distribution)":
                   float((m1.mean() - m2.mean()).abs())}))

    # H. collect's extra loss ------------------------------------------------------------------
    def extra_loss():
        with torch.no_grad():
            return lik.mean_loss(out.detach(), x)

    graph_out = out

    def collect_only():
        TrueFisher().collect(model, lik, graph_out, x, generator=gen)

    pairs.append(("H TrueFisher.collect's extra loss",
                  [Timed("H_loss", "mean_loss(outputs.detach(), targets) alone", extra_loss),
                   Timed("H_collect", "TrueFisher.collect as a whole", collect_only)],
                  {}))

    # I. small network: per-call overhead -----------------------------------------------------
    _, s_opt, s_lik, s_x, _, s_stats, s_items, s_grads = setup(args.seed, SMALL, 100)
    s_h = {n: [st[f"tnt_H{i}"].clone() for i in range(p.dim())] for n, p, st in s_items}
    s_before_items = [(n, p, {**st, **{f"tnt_H{i}": st[f"tnt_H{i}"].clone()
                                       for i in range(p.dim())}}) for n, p, st in s_items]

    def small_before():
        s_opt.structure.update(s_before_items, s_stats, ema=EMA)
        return [s_opt.structure.direction(p, st, st["momentum_buffer"])
                for _, p, st in s_items]

    def small_after():
        bare_tnt_ema(s_grads, s_h, EMA)
        return bare_tnt_direction(s_items)

    small_sgd_model = autoencoder(SMALL)
    small_sgd = torch.optim.SGD(small_sgd_model.parameters(), lr=0.0, momentum=0.9)

    def small_sgd_step():
        small_sgd.zero_grad()
        s_lik.mean_loss(small_sgd_model(s_x), s_x).backward()
        small_sgd.step()

    check = max(rel_diff(a_, b_) for a_, b_ in zip(small_after(), small_before(), strict=True))
    pairs.append(("I small network (64-…-64, batch 100): update + direction",
                  [Timed("I_before", "TensorNormal.update + .direction (16 tensors)",
                         small_before),
                   Timed("I_after", "addmm_/addr_ + two mm / mv (16 tensors)", small_after),
                   Timed("I_sgd", "reference: one whole SGD-m step of that network",
                         small_sgd_step)],
                  {"direction after == before": check}))

    # timing: all variants interleaved -------------------------------------------------------
    everything = [t for _, ts, _ in pairs for t in ts]
    interleave(everything, args.rounds, warmup=2)
    meta["loadavg_end"] = loadavg()

    print(f"# load average {meta['loadavg_start']} → {meta['loadavg_end']}")
    print()
    print("| candidate | variant | ms (median) | IQR | × first |")
    print("|---|---|---:|---:|---:|")
    rows = []
    failed = []
    for name, ts, checks in pairs:
        first = ts[0].median
        for t in ts:
            q1, q3 = t.quartiles()
            print(f"| {name} | {t.label} | {t.median * 1e3:.2f} | "
                  f"{q1 * 1e3:.2f}–{q3 * 1e3:.2f} | {t.median / first:.2f} |")
            rows.append({"candidate": name, "key": t.key, "label": t.label,
                         "ms": t.median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                         "ratio_to_first": t.median / first})
        for cname, d in checks.items():
            tol = 0.02 if name.startswith("G") else CHECK_TOL
            if d > tol:
                failed.append(f"{name}: {cname} = {d:.1e}")
    print()
    print("| check | value | ok |")
    print("|---|---:|---|")
    check_rows = {}
    for name, _, checks in pairs:
        for cname, d in checks.items():
            tol = 0.02 if name.startswith("G") else CHECK_TOL
            check_rows[f"{name}: {cname}"] = {"value": d, "tolerance": tol, "ok": d <= tol}
            print(f"| {name}: {cname} | {d:.1e} | {'yes' if d <= tol else 'NO'} |")
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(wall time {meta['wall_s']} s)")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows, "checks": check_rows}, f, indent=2,
                      ensure_ascii=False)
    return 1 if failed else 0


def lean_refresh(structure, items, solver, damping: float) -> None:
    """What ``TensorNormal.refresh`` does, with fewer passes over the matrices: the raw
    statistics are stacked once and normalised (eq. 5) and damped in place in that copy
    (Cholesky reads one triangle, so no symmetrisation is needed); success is ``info == 0``
    and a finite sum per inverse (one reduction instead of ``isfinite`` over every entry);
    the previous inverses are stacked and the recovery policy run only for a group where a
    matrix failed."""
    groups: dict[tuple, list[tuple[dict, int, Tensor, Tensor]]] = {}
    for _, param, state in items:
        if state["tnt_updates"] == 0:
            continue
        dims = structure.dims(param.shape)
        k = len(dims)
        hs = [state[f"tnt_H{i}"] for i in range(k)]
        traces = torch.stack([h.diagonal().sum() for h in hs])
        c0 = (traces.mean() / math.prod(dims)).clamp_min(0).pow(1.0 / k)
        for i, h in enumerate(hs):
            denom = (c0.pow(k - 1) * (math.prod(dims) // dims[i])).clamp_min(
                torch.finfo(h.dtype).tiny)
            groups.setdefault((h.shape[0], h.dtype, h.device), []).append((state, i, h, denom))
    for entries in groups.values():
        a = torch.stack([h for _, _, h, _ in entries])
        a.div_(torch.stack([d for _, _, _, d in entries]).reshape(-1, 1, 1))
        a.diagonal(dim1=-2, dim2=-1).add_(damping)
        factor, info = torch.linalg.cholesky_ex(a)
        inverse = torch.cholesky_inverse(factor)
        ok = (info == 0) & torch.isfinite(inverse.sum(dim=(-2, -1)))
        if not bool(ok.all()):  # rare: the full policy for this group
            a.diagonal(dim1=-2, dim2=-1).sub_(damping)
            previous = torch.stack([st[f"tnt_inv{i}"] for st, i, _, _ in entries])
            inverse = robust_inverse(solver, a, damping, 1.0, previous).inverse
        for j, (st, i, _, _) in enumerate(entries):
            st[f"tnt_inv{i}"].copy_(inverse[j])


if __name__ == "__main__":
    sys.exit(main())
