r"""Cost of curvlib's per-layer statistics, as multiples of a plain SGD step.

Everything is measured in one process and reported as a ratio to a plain SGD step of the
same MLP on the same batch (forward, mean cross-entropy, ``zero_grad``, backward,
``torch.optim.SGD.step``), because the absolute times on a shared machine drift.

Workloads (MLP 784-1000-500-250-10, batch 128, float32; inputs ``N(0, 1)`` and labels drawn
uniformly from the 10 classes, i.e. random data, not a real data set):

1. **Gram** of every Linear layer's per-sample gradients from captured ``X`` and ``Z``:
   ``LinearPlugin(gram_method="contract")`` (FNGD eq. 12, ``(ZZᵀ) ∗ (XXᵀ)``) against
   ``LinearPlugin(gram_method="materialise")`` (per-sample gradients, then inner products).
2. **Weighted gradient** ``Σ_n c_n g_n`` (``weighted_grads``, random ``c``) against the plain
   weight and bias gradient of the same ``X``, ``Z`` (``Zᵀ X`` and ``Σ Z``; for the conv
   layer ``torch.nn.grad.conv2d_weight``) and against autograd's backward of the layer, for
   the four Linear layers and for one ``Conv2d(32, 64, 3, padding=1)`` on 16×16 inputs.
3. **Training step with one extra sampled backward** (what TNT does on a statistics step):
   forward, ``TrueFisher().collect`` (a backward of the mean loss with targets sampled from
   the model, ``retain_graph=True``), the real backward and the SGD update.

Diagnostic rows (``--no-diagnostics`` drops them) split the figures into their causes:
float64 coefficients, a proposed conv fast path written here (not curvlib code), the
sampled backward without ``collect``'s bookkeeping, and forward / forward+backward alone.

Measurement: every variant is warmed up and calibrated to repeat itself often enough that one
sample lasts at least ``--min-sample-ms``; then the variants run interleaved in rounds (the
order rotates every round) so that drift affects all alike; medians over the rounds are
reported. A few very slow variants are sampled every k-th round only. The minor page faults
per call are reported too: large temporaries that the allocator hands back to the kernel are
faulted in again on the next call, which can cost more than the arithmetic. Correctness checks
(relative differences to references) run after the timing; the exit status is 1 if one fails.
``--only KEYS`` builds and times just those variants (and the SGD step).

Run ``python benchmarks/bench_sources.py`` (about 15 s on 2 idle cores, several times that
when other processes load the machine); ``--repeats 3`` is a smoke run of about 5 s.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlib
from curvlib.capture import Capture
from curvlib.layers import Conv2dPlugin, LinearPlugin
from curvlib.sources import TrueFisher

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SampleStats, cpu_model, rel_diff, tune_malloc

WIDTHS = (784, 1000, 500, 250, 10)
BATCH = 128
CONV = {"in": 32, "out": 64, "kernel": 3, "padding": 1, "size": 16}
CHECK_TOLERANCE = 1e-4  # float32 relative differences; anything larger is a bug, not round-off
VARIANT_KEYS = (
    "sgd", "step_sampled", "step_sampled_raw", "fwd", "fwd_bwd", "gram_contract",
    "gram_materialise", "lin_weighted", "lin_plain", "lin_autograd", "lin_weighted64",
    "conv_weighted", "conv_plain", "conv_autograd", "conv_proposed", "conv_weighted64",
)
SLOW = 10  # a variant costing more than SLOW SGD steps a call ...
SLOW_SAMPLES = 10  # ... is sampled about this many times (every k-th round)


# --------------------------------------------------------------------------------------------
# measurement


@dataclass
class Variant(SampleStats):
    """One timed operation."""

    key: str
    label: str
    group: str
    fn: Callable[[], object]
    diagnostic: bool = False
    inner: int = 1  # calls per sample
    stride: int = 1  # measured in every `stride`-th round (set for slow variants)
    samples: list[float] = field(default_factory=list)  # seconds per call
    faults: list[float] = field(default_factory=list)  # minor page faults per call


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def time_once(fn: Callable[[], object], inner: int, sync: Callable[[], None]
              ) -> tuple[float, float]:
    """Seconds and minor page faults per call of ``fn``, over ``inner`` back-to-back calls."""
    sync()
    faults = minor_faults()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    seconds = time.perf_counter() - start
    return seconds / inner, (minor_faults() - faults) / inner


def calibrate(variants: list[Variant], warmup: int, min_sample: float, repeats: int,
              sync: Callable[[], None]) -> None:
    """Warm every variant up; choose calls per sample and, for slow variants, a stride.

    A variant slower than ``SLOW`` SGD steps a call is measured in every k-th round only,
    about ``SLOW_SAMPLES`` times in all, still spread over the whole run.
    """
    per_call = {}
    for v in variants:
        best = math.inf
        for _ in range(max(1, warmup)):
            best = min(best, time_once(v.fn, 1, sync)[0])
        per_call[v.key] = best
        v.inner = max(1, min(100, math.ceil(min_sample / max(best, 1e-7))))
    sgd = per_call.get("sgd", min(per_call.values()))
    for v in variants:
        if per_call[v.key] > SLOW * sgd:
            v.stride = max(1, repeats // SLOW_SAMPLES)


def run_rounds(variants: list[Variant], repeats: int, sync: Callable[[], None]) -> None:
    """Interleave the variants, rotating their order every round."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            due = [v for v in variants if r % v.stride == 0]
            shift = r % len(due)
            for v in due[shift:] + due[:shift]:
                seconds, faults = time_once(v.fn, v.inner, sync)
                v.samples.append(seconds)
                v.faults.append(faults)
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# workloads


def mlp(activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(WIDTHS) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def capture_xz(model: nn.Module, inputs: Tensor, targets: Tensor):
    """Record ``X`` and ``Z`` (gradient of the summed per-sample losses) once."""
    lik = curvlib.as_likelihood("categorical")
    with Capture(model) as cap:
        outputs = model(inputs)
        cap.backward_to_outputs(lik.loss(outputs, targets).sum())
    cap.release_outputs()
    return cap


def proposed_conv_weighted(module: nn.Conv2d, x: Tensor, z: Tensor, c: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """Sketch of a cheaper conv ``weighted_grads`` (diagnostic only, not curvlib's code).

    One temporary (``c⊙Z``, in ``Z``'s dtype) and one ``convolution_backward`` call that
    returns the weight and the bias gradient together, as autograd's own conv backward does;
    no transposed copy of ``c⊙Z`` for the bias. (Zero padding given as numbers only, as in
    this benchmark; curvlib's ``padded_input`` would handle the other modes first.)
    """
    cz = z * c.to(dtype=z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
    weight = cz.new_empty(1).expand(module.weight.shape)  # only its shape is read
    _, w, b = torch.ops.aten.convolution_backward(
        cz, x, weight, [module.out_channels], module.stride, module.padding, module.dilation,
        False, [0] * (z.dim() - 2), module.groups, (False, True, True))
    return w, b


@dataclass
class Context:
    """What every workload shares: device, generator, the MLP batch."""

    device: torch.device
    activation: str
    gen: torch.Generator
    x: Tensor
    y: Tensor
    diagnostics: bool

    @property
    def lik(self):
        return curvlib.as_likelihood("categorical")


Checks = Callable[[], dict[str, float]]  # check name -> relative difference


def steps(ctx: Context) -> tuple[list[Variant], Checks]:
    """3. The SGD baseline and the step with one extra sampled backward."""
    x, y, lik, gen = ctx.x, ctx.y, ctx.lik, ctx.gen
    model = mlp(ctx.activation).to(ctx.device)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    source = TrueFisher()

    def sgd_step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def sampled_step() -> None:
        opt.zero_grad()
        outputs = model(x)
        source.collect(model, lik, outputs, None, generator=gen)
        F.cross_entropy(outputs, y).backward()
        opt.step()

    def sampled_step_raw() -> None:
        opt.zero_grad()
        outputs = model(x)
        drawn = lik.sample(outputs.detach(), generator=gen)
        torch.autograd.grad(lik.mean_loss(outputs, drawn), params, retain_graph=True)
        F.cross_entropy(outputs, y).backward()
        opt.step()

    def forward_only() -> None:
        model(x)

    def forward_backward() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    group = "3 sampled backward"
    variants = [
        Variant("sgd", "SGD step (fwd + CE + bwd + SGD.step)", "baseline", sgd_step),
        Variant("step_sampled", "step + sampled bwd via TrueFisher().collect", group,
                sampled_step),
    ]
    if ctx.diagnostics:
        variants += [
            Variant("step_sampled_raw", "step + sampled bwd via autograd.grad", group,
                    sampled_step_raw, diagnostic=True),
            Variant("fwd", "forward only (graph built)", group, forward_only, diagnostic=True),
            Variant("fwd_bwd", "forward + backward (no update)", group, forward_backward,
                    diagnostic=True),
        ]

    def checks() -> dict[str, float]:
        # collect's batch gradient is the gradient of the mean loss at the sampled targets
        probe = mlp(ctx.activation).to(ctx.device)
        out = probe(x)
        g0 = torch.Generator(device=ctx.device).manual_seed(123)
        got = source.collect(probe, lik, out, None, generator=g0).batch_grads()
        g1 = torch.Generator(device=ctx.device).manual_seed(123)
        drawn = lik.sample(out.detach(), generator=g1)
        ref = torch.autograd.grad(lik.mean_loss(out, drawn), list(probe.parameters()))
        names = [n for n, _ in probe.named_parameters()]
        return {"true_fisher collect == autograd.grad at sampled targets":
                max(rel_diff(got[n][0], r) for n, r in zip(names, ref, strict=True))}

    return variants, checks


def linear_workloads(ctx: Context, want: set[str]) -> tuple[list[Variant], Checks]:
    """1. Gram and 2a. weighted gradient of the four Linear layers from captured X, Z."""
    net = mlp(ctx.activation).to(ctx.device)
    cap = capture_xz(net, ctx.x, ctx.y)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    contract, materialise = LinearPlugin("contract"), LinearPlugin("materialise")
    coeff = torch.randn(BATCH, device=ctx.device, generator=ctx.gen)
    coeff64 = coeff.double()
    xs = {m: cap.calls[m][0].input for m in linears}
    zs = {m: cap.calls[m][0].grad_output for m in linears}
    layer_outs = [m(xs[m]) for m in linears]  # graphs for autograd's layer backward
    layer_params = [p for m in linears for p in (m.weight, m.bias)]
    grad_outs = [zs[m] for m in linears]

    def gram_contract() -> None:
        for m in linears:
            contract.gram(m, cap.calls[m])

    def gram_materialise() -> None:
        for m in linears:
            materialise.gram(m, cap.calls[m])

    def lin_weighted() -> None:
        for m in linears:
            contract.weighted_grads(m, cap.calls[m], coeff)

    def lin_weighted64() -> None:
        for m in linears:
            contract.weighted_grads(m, cap.calls[m], coeff64)

    def lin_plain() -> None:
        for m in linears:
            z = zs[m]
            z.T @ xs[m]
            z.sum(0)

    def lin_autograd() -> None:
        torch.autograd.grad(layer_outs, layer_params, grad_outs, retain_graph=True)

    group = "2 weighted grad, Linear"
    variants = [
        Variant("gram_contract", "Gram, all Linear: contract (ZZᵀ)∗(XXᵀ)", "1 Gram",
                gram_contract),
        Variant("gram_materialise", "Gram, all Linear: materialise", "1 Gram",
                gram_materialise),
        Variant("lin_weighted", "weighted_grads, 4 Linear (float32 c)", group, lin_weighted),
        Variant("lin_plain", "plain ZᵀX + ΣZ, 4 Linear", group, lin_plain),
        Variant("lin_autograd", "autograd layer backward, 4 Linear", group, lin_autograd),
    ]
    if ctx.diagnostics:
        variants.append(Variant("lin_weighted64", "weighted_grads, 4 Linear (float64 c)",
                                group, lin_weighted64, diagnostic=True))

    def checks() -> dict[str, float]:
        out = {}
        if want & {"gram_contract", "gram_materialise"}:
            worst = 0.0
            for m in linears:
                a = contract.gram(m, cap.calls[m])
                b = materialise.gram(m, cap.calls[m])
                worst = max(worst, *(rel_diff(a[k], b[k]) for k in b))
            out["Gram contract == materialise (4 Linear, weight and bias)"] = worst
        worst = 0.0
        for m in linears:
            got = contract.weighted_grads(m, cap.calls[m], coeff)
            cz = coeff64[:, None] * zs[m].double()
            worst = max(worst, rel_diff(got["weight"], cz.T @ xs[m].double()),
                        rel_diff(got["bias"], cz.sum(0)))
        out["Linear weighted_grads == (c⊙Z)ᵀX (float64 reference)"] = worst
        ones = torch.ones(BATCH, device=ctx.device)
        auto = torch.autograd.grad(layer_outs, layer_params, grad_outs, retain_graph=True)
        mine = []
        for m in linears:
            d = contract.weighted_grads(m, cap.calls[m], ones)
            mine += [d["weight"], d["bias"]]
        out["Linear weighted_grads(c=1) == autograd weight/bias grads"] = max(
            rel_diff(a, b) for a, b in zip(mine, auto, strict=True))
        return out

    return variants, checks


def conv_workloads(ctx: Context) -> tuple[list[Variant], Checks]:
    """2b. Weighted gradient of one Conv2d layer from captured X, Z."""
    device = ctx.device
    conv = nn.Conv2d(CONV["in"], CONV["out"], CONV["kernel"], padding=CONV["padding"]).to(device)
    inputs = torch.randn(BATCH, CONV["in"], CONV["size"], CONV["size"], device=device,
                         generator=ctx.gen)
    with Capture([conv]) as cap:
        out = conv(inputs)
        direction = torch.randn(out.shape, device=device, generator=ctx.gen)
        cap.backward_to_outputs((out * direction).sum())
    cap.release_outputs()
    calls = cap.calls[conv]
    X, Z = calls[0].input, calls[0].grad_output
    plugin = Conv2dPlugin()
    coeff = torch.randn(BATCH, device=device, generator=ctx.gen)
    coeff64 = coeff.double()
    conv_out = conv(X)
    conv_params = [conv.weight, conv.bias]

    def conv_weighted() -> None:
        plugin.weighted_grads(conv, calls, coeff)

    def conv_weighted64() -> None:
        plugin.weighted_grads(conv, calls, coeff64)

    def conv_plain() -> None:
        torch.nn.grad.conv2d_weight(X, conv.weight.shape, Z, padding=conv.padding)
        Z.sum(dim=(0, 2, 3))

    def conv_autograd() -> None:
        torch.autograd.grad(conv_out, conv_params, Z, retain_graph=True)

    def conv_proposed() -> None:
        proposed_conv_weighted(conv, X, Z, coeff)

    group = "2 weighted grad, Conv2d"
    variants = [
        Variant("conv_weighted", "weighted_grads, Conv2d (float32 c)", group, conv_weighted),
        Variant("conv_plain", "plain conv2d_weight(Z) + ΣZ, Conv2d", group, conv_plain),
        Variant("conv_autograd", "autograd layer backward, Conv2d", group, conv_autograd),
    ]
    if ctx.diagnostics:
        variants += [
            Variant("conv_proposed", "weighted, proposed fast path (bench-local)", group,
                    conv_proposed, diagnostic=True),
            Variant("conv_weighted64", "weighted_grads, Conv2d (float64 c)", group,
                    conv_weighted64, diagnostic=True),
        ]

    def checks() -> dict[str, float]:
        got = plugin.weighted_grads(conv, calls, coeff)
        cz64 = coeff64.reshape(-1, 1, 1, 1) * Z.double()
        ref_w = torch.nn.grad.conv2d_weight(X.double(), conv.weight.shape, cz64,
                                            padding=conv.padding)
        pw, pb = proposed_conv_weighted(conv, X, Z, coeff)
        got1 = plugin.weighted_grads(conv, calls, torch.ones(BATCH, device=device))
        auto = torch.autograd.grad(conv_out, conv_params, Z, retain_graph=True)
        return {
            "Conv2d weighted_grads == conv2d_weight(X, c⊙Z) (float64 reference)":
                max(rel_diff(got["weight"], ref_w), rel_diff(got["bias"],
                                                             cz64.sum(dim=(0, 2, 3)))),
            "Conv2d proposed fast path == weighted_grads":
                max(rel_diff(pw, got["weight"]), rel_diff(pb, got["bias"])),
            "Conv2d weighted_grads(c=1) == autograd weight/bias grads":
                max(rel_diff(got1["weight"], auto[0]), rel_diff(got1["bias"], auto[1])),
        }

    return variants, checks


GROUP_KEYS = {
    "steps": {"sgd", "step_sampled", "step_sampled_raw", "fwd", "fwd_bwd"},
    "linear": {"gram_contract", "gram_materialise", "lin_weighted", "lin_plain",
               "lin_autograd", "lin_weighted64"},
    "conv": {"conv_weighted", "conv_plain", "conv_autograd", "conv_proposed",
             "conv_weighted64"},
}


def build(args: argparse.Namespace) -> tuple[list[Variant], list[Checks]]:
    """The timed variants of the wanted workloads (all, or those ``--only`` names)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ctx = Context(device, args.activation, gen,
                  torch.randn(BATCH, WIDTHS[0], device=device, generator=gen),
                  torch.randint(0, WIDTHS[-1], (BATCH,), device=device, generator=gen),
                  not args.no_diagnostics)
    want = {"sgd", *args.only.split(",")} if args.only else set(VARIANT_KEYS)
    variants: list[Variant] = []
    checks: list[Checks] = []
    for name, make in (("steps", steps), ("linear", lambda c: linear_workloads(c, want)),
                       ("conv", conv_workloads)):
        if want & GROUP_KEYS[name]:
            vs, check = make(ctx)
            variants += [v for v in vs if v.key in want]
            checks.append(check)
    return variants, checks


def run_checks(checks: list[Checks], device: torch.device) -> dict[str, dict]:
    """Relative differences against references, with a verdict each."""
    tolerance = CHECK_TOLERANCE
    if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                  or torch.backends.cudnn.allow_tf32):
        tolerance = 5e-3  # TF32 convolutions / matmuls round to 10-bit mantissas
    out = {}
    for check in checks:
        for name, diff in check().items():
            out[name] = {"rel_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance}
    return out


# --------------------------------------------------------------------------------------------
# report

COMPARISONS = [
    # (key, numerator, denominator, expectation, test)
    ("Gram: materialise / contract", "gram_materialise", "gram_contract", "> 50×",
     lambda r: r > 50),
    ("Linear: weighted_grads / plain ZᵀX", "lin_weighted", "lin_plain", "≈ 1.0× (≤ 1.10)",
     lambda r: r <= 1.10),
    ("Linear: weighted_grads / autograd", "lin_weighted", "lin_autograd", "≈ 1.0× (≤ 1.10)",
     lambda r: r <= 1.10),
    ("Conv2d: weighted_grads / plain conv2d_weight", "conv_weighted", "conv_plain",
     "≈ 1.0× (≤ 1.10)", lambda r: r <= 1.10),
    ("Conv2d: weighted_grads / autograd", "conv_weighted", "conv_autograd", "≈ 1.0× (≤ 1.10)",
     lambda r: r <= 1.10),
    ("Step with sampled backward / SGD step", "step_sampled", "sgd", "≈ 1.4× (1.3–1.5)",
     lambda r: 1.3 <= r <= 1.5),
    # diagnostics
    ("[diag] Linear float64 c / float32 c", "lin_weighted64", "lin_weighted", "—", None),
    ("[diag] Conv2d float64 c / float32 c", "conv_weighted64", "conv_weighted", "—", None),
    ("[diag] Conv2d proposed fast path / plain", "conv_proposed", "conv_plain", "—", None),
    ("[diag] Conv2d proposed fast path / autograd", "conv_proposed", "conv_autograd", "—",
     None),
    ("[diag] sampled step: collect / raw autograd.grad", "step_sampled", "step_sampled_raw",
     "—", None),
]


def metadata(args: argparse.Namespace) -> dict:
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "activation": args.activation,
        "data": "random: inputs N(0,1), labels uniform over 10 classes",
        "model": "MLP " + "-".join(map(str, WIDTHS)),
        "batch": BATCH,
        "dtype": "float32",
        "repeats": args.repeats,
    }
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = round(os.getloadavg()[0], 2)
    return meta


def report(variants: list[Variant], checks: dict[str, dict], meta: dict) -> dict:
    by_key = {v.key: v for v in variants}
    sgd = by_key["sgd"].median
    print()
    print(f"# bench_sources — {meta['date']}, torch {meta['torch']}, {meta['device']}, "
          f"{meta['threads']} threads, {meta['cpu']}"
          + (f", {meta['gpu']}" if "gpu" in meta else ""))
    print(f"# {meta['model']} ({meta['activation']}), batch {meta['batch']}, {meta['dtype']}, "
          f"{meta['data']}; Conv2d({CONV['in']}, {CONV['out']}, {CONV['kernel']}, "
          f"padding={CONV['padding']}) on {CONV['size']}×{CONV['size']}")
    print(f"# allocator: {meta['allocator']}")
    if "loadavg_start" in meta:
        print(f"# load average (1 min) at start {meta['loadavg_start']}, at end "
              f"{meta.get('loadavg_end', '?')}")
    print()
    print("| group | variant | median ms | IQR ms | × SGD | page faults/call | samples |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for v in variants:
        q1, q3 = v.quartiles()
        ratio = v.median / sgd
        faults = statistics.median(v.faults)
        print(f"| {v.group} | {v.label} | {v.median * 1e3:.3f} | "
              f"{q1 * 1e3:.3f}–{q3 * 1e3:.3f} | {ratio:.2f} | {faults:.0f} | "
              f"{len(v.samples)}×{v.inner} |")
        rows.append({"key": v.key, "label": v.label, "group": v.group,
                     "diagnostic": v.diagnostic, "median_ms": v.median * 1e3,
                     "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "ratio_to_sgd": ratio,
                     "minor_faults_per_call": faults, "samples": len(v.samples),
                     "calls_per_sample": v.inner})
    print()
    print("| comparison | ratio | expected | verdict |")
    print("|---|---:|---|---|")
    comps = []
    for name, num, den, expected, test in COMPARISONS:
        if num not in by_key or den not in by_key:
            continue
        ratio = by_key[num].median / by_key[den].median
        verdict = "—" if test is None else ("meets" if test(ratio) else "MISSES")
        print(f"| {name} | {ratio:.2f} | {expected} | {verdict} |")
        comps.append({"name": name, "ratio": ratio, "expected": expected, "verdict": verdict})
    if {"fwd", "fwd_bwd", "sgd"} <= by_key.keys():
        backward = by_key["fwd_bwd"].median - by_key["fwd"].median
        floor = (sgd + backward) / sgd
        print(f"| [diag] floor: (SGD + one backward) / SGD | {floor:.2f} | — | — |")
        comps.append({"name": "[diag] floor: (SGD + one backward) / SGD", "ratio": floor,
                      "expected": "—", "verdict": "—"})
    print()
    print("| correctness check | relative difference | ok |")
    print("|---|---:|---|")
    for name, c in checks.items():
        print(f"| {name} | {c['rel_diff']:.1e} | {'yes' if c['ok'] else 'NO'} |")
    return {"meta": meta, "variants": rows, "comparisons": comps, "checks": checks}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=60,
                   help="measured rounds (default 60; 3 gives a smoke run of a few seconds)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--activation", choices=("relu", "tanh"), default="relu")
    p.add_argument("--min-sample-ms", type=float, default=5.0,
                   help="repeat fast variants so that one sample lasts at least this long")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="time only the headline variants")
    p.add_argument("--malloc-tuned", action="store_true",
                   help="make glibc keep freed memory (mallopt) so that large temporaries "
                        "are not page-faulted in again on every call")
    p.add_argument("--only", metavar="KEYS",
                   help="comma-separated variant keys to time (the SGD step is always "
                        "timed), e.g. conv_weighted; keys: " + ", ".join(VARIANT_KEYS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(VARIANT_KEYS)
        if unknown:
            p.error(f"--only: unknown keys {sorted(unknown)}; known: {', '.join(VARIANT_KEYS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tuned = tune_malloc() if args.malloc_tuned else False
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = metadata(args)
    meta["allocator"] = ("glibc, tuned with mallopt (no trimming, mmap threshold 1 GiB)"
                         if tuned else "default" + (" (--malloc-tuned had no effect)"
                                                    if args.malloc_tuned else ""))
    started = time.perf_counter()
    variants, check_fns = build(args)
    sync = make_sync(torch.device(args.device))
    calibrate(variants, args.warmup, args.min_sample_ms / 1e3, args.repeats, sync)
    run_rounds(variants, args.repeats, sync)
    # after the timing, so that their float64 temporaries do not change the allocator state
    checks = run_checks(check_fns, torch.device(args.device))
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    results = report(variants, checks, meta)
    print(f"\n(wall time {meta['wall_s']} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
