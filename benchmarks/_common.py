"""Helpers shared by the benchmark scripts (``bench_sources.py``, ``bench_tnt.py``,
``bench_baselines.py``, ``micro_tnt.py``, ``digits_autoencoder.py``, ``bench_fngd.py``,
``digits_fngd.py``).

Not a benchmark by itself: the autoencoder builder, a timer that interleaves variants and
keeps medians (and minor page faults per sample), glibc malloc tuning, the ASDL adapter (a
Bernoulli MC Fisher for its K-FAC), the run metadata, and the setting of the autoencoder
step-time benchmarks (``bench_tnt.py``, ``bench_baselines.py``): the problem, a trainer that
runs whole cycles of steps, and the rounds that time each variant right after an SGD-m cycle.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# models


def autoencoder(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]`` with ReLU between them, except after the
    code layer (the narrowest, in the middle) and after the output layer: both are linear.
    ``curvlib.compare.autoencoder`` with torch's default initialisation."""
    from curvlib.compare import autoencoder as build

    return build(widths)


def bare_tnt_ema(grads: dict[str, Tensor], factors: dict[str, list[Tensor]], ema: float) -> None:
    """TNT's EMA of the mode statistics of 1-D/2-D parameters, written with plain torch:
    ``H_0 ← ema·H_0 + (1−ema)·G Gᵀ`` (and ``Gᵀ G`` for ``H_1``) from each first draw ``G``;
    non-finite draws are skipped, as curvlib does."""
    for n, g in grads.items():
        m = g[0]
        if not torch.isfinite(m).all():
            continue
        hs = factors[n]
        if m.dim() == 2:
            hs[0].addmm_(m, m.T, beta=ema, alpha=1 - ema)
            hs[1].addmm_(m.T, m, beta=ema, alpha=1 - ema)
        else:
            hs[0].addr_(m, m, beta=ema, alpha=1 - ema)


def bare_tnt_direction(items) -> list[Tensor]:
    """``A⁻¹ M B⁻ᵀ`` (2-D) or ``A⁻¹ m`` (1-D) for each ``(name, param, state)`` item, from
    the inverses in its TNT state: the direction with plain torch, to time against curvlib's."""
    out = []
    for _, p, st in items:
        m = st["momentum_buffer"]
        if p.dim() == 2:
            out.append(torch.mm(torch.mm(st["tnt_inv0"], m), st["tnt_inv1"].T))
        else:
            out.append(torch.mv(st["tnt_inv0"], m))
    return out


def rel_diff(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# timing


try:
    import resource
except ImportError:  # not on every platform
    resource = None  # type: ignore[assignment]


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def tune_malloc() -> bool:
    """Make glibc keep freed memory (no per-allocation mmap, no trimming).

    The same as ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``:
    large temporaries are then reused instead of being returned to the kernel and faulted
    in again on the next call. Returns whether it took effect (glibc only).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        return libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok
    except (OSError, AttributeError):
        return False


class SampleStats:
    """Median and quartiles of a ``samples`` list (mixed into the timing records)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


@dataclass
class Timed(SampleStats):
    """One timed thing: ``run`` is timed, ``prepare`` (if any) runs untimed before each sample.

    ``per`` divides a sample (e.g. the number of steps in a timed cycle) to give the reported
    time per unit.
    """

    key: str
    label: str
    run: Callable[[], object]
    prepare: Callable[[], object] | None = None
    per: int = 1
    samples: list[float] = field(default_factory=list)  # seconds per unit
    faults: list[float] = field(default_factory=list)  # minor page faults per unit

    def sample(self) -> float:
        if self.prepare is not None:
            self.prepare()
        faults = minor_faults()
        start = time.perf_counter()
        self.run()
        seconds = (time.perf_counter() - start) / self.per
        self.faults.append((minor_faults() - faults) / self.per)
        self.samples.append(seconds)
        return seconds


def interleave(items: Sequence[Timed], rounds: int, warmup: int = 1,
               progress: Callable[[int], None] | None = None) -> None:
    """Warm every item up, then sample them in rounds, rotating their order every round, with
    the garbage collector off while timing (it runs between rounds)."""
    for item in items:
        for _ in range(warmup):
            if item.prepare is not None:
                item.prepare()
            item.run()
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            shift = r % len(items)
            for item in list(items[shift:]) + list(items[:shift]):
                item.sample()
        finally:
            gc.enable()
        if progress is not None:
            progress(r)


def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (not Linux): fall back to what platform knows
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit (the curvlib code that was measured), or None."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip() or None
    except Exception:
        return None


def metadata(**extra) -> dict:
    meta = {
        "curvlib_commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["python", *sys.argv]),
        "loadavg_start": loadavg(),
    }
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------------------------
# ASDL (pip package ``asdfghjkl``, imported as ``asdl``)


def bernoulli_sum_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """BCE-with-logits summed over the outputs of each sample; ``"mean"`` averages over the
    batch (curvlib's Bernoulli ``mean_loss``), ``"sum"`` sums over it (what ASDL's Fisher
    makers ask for, dividing the gradients by ``data_size`` afterwards)."""
    total = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    return total if reduction == "sum" else total / logits.shape[0]


def load_asdl() -> tuple[types.ModuleType | None, str]:
    """Import ASDL and make it usable here; ``(module, note)`` or ``(None, the error)``.

    Two adaptations, both outside ASDL's files:

    * ASDL wraps its preconditioner refresh in ``torch.cuda.nvtx.range``, which raises
      ``RuntimeError: NVTX functions not installed. Are you sure you have a CUDA build?`` on
      a CPU-only torch; the ``nvtx`` name inside ASDL's modules is replaced by a no-op.
    * ASDL's Fisher makers know only ``cross_entropy`` and ``mse``; :func:`asdl_kfac` installs
      a Bernoulli MC Fisher written like ASDL's own ``FisherMCCrossEntropy``.
    """
    try:
        import asdl
        import asdl.fisher
        import asdl.precondition
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    noop = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
    for name, module in list(sys.modules.items()):
        if name.startswith("asdl") and hasattr(module, "nvtx"):
            module.nvtx = noop
    version = "?"
    try:
        from importlib.metadata import version as _version
        version = _version("asdfghjkl")
    except Exception:  # the version is only a label in the metadata: "?" is fine
        pass
    return asdl, f"asdfghjkl {version} (nvtx no-op on CPU; Bernoulli MC Fisher added)"


def asdl_kfac(model: nn.Module, *, batch: int, damping: float, t1: int, t2: int, ema: float,
              sampler: Callable[[Tensor], Tensor] | None = None):
    """ASDL's ``KfacGradientMaker`` with the MC Fisher (one sample) of the Bernoulli loss.

    ``sampler`` maps the (detached) logits to the sampled targets; by default
    ``torch.bernoulli(σ(f))`` with torch's global generator. A check passes fixed targets
    here to compare ASDL's factors with curvlib's for the same draw.
    """
    draw = sampler if sampler is not None else (lambda f: torch.bernoulli(torch.sigmoid(f)))
    from asdl.fisher import FisherMaker
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    class FisherMCBernoulli(FisherMaker):
        """One-sample MC Fisher for Bernoulli outputs (``y ~ Bernoulli(σ(f))``)."""

        @property
        def do_local_accumulate(self) -> bool:
            return self.config.n_mc_samples > 1

        def _fisher_loop(self, closure):
            logits = self._logits
            n = self.config.n_mc_samples
            for i in range(n):
                with torch.no_grad():
                    sampled = draw(logits.detach())
                closure(lambda y=sampled: F.binary_cross_entropy_with_logits(
                    logits, y, reduction="sum") / n, retain_graph=i < n - 1)

    config = PreconditioningConfig(data_size=batch, damping=damping,
                                   curvature_upd_interval=t1, preconditioner_upd_interval=t2,
                                   ema_decay=1.0 - ema)
    # loss_type only picks ASDL's built-in Fisher maker, which is replaced right away
    gm = KfacGradientMaker(model, config, fisher_type="fisher_mc", loss_type="mse")
    gm.fisher_maker = FisherMCBernoulli(model, gm.fisher_maker.config)
    return gm


def asdl_step(gm, optimizer: torch.optim.Optimizer, model: nn.Module, x: Tensor,
              y: Tensor) -> Tensor:
    """One ASDL K-FAC training step (its gradient maker, then the torch optimizer)."""
    optimizer.zero_grad()
    dummy = gm.setup_model_call(model, x)
    gm.setup_loss_call(bernoulli_sum_loss, dummy, y)
    _, loss = gm.forward_and_backward()
    optimizer.step()
    return loss.detach()


def asdl_factor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ASDL's K-FAC factors and their inverses, per Linear layer."""
    out = {}
    for name, module in model.named_modules():
        fisher = getattr(module, "fisher", None)
        kron = getattr(fisher, "kron", None) if fisher is not None else None
        if kron is None:
            continue
        total = 0
        for attr in ("A", "B", "A_inv", "B_inv"):
            t = getattr(kron, attr, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
        out[name] = total
    return out


def quiet_asdl_warnings() -> None:
    """ASDL registers ``register_backward_hook`` (deprecated in torch 2.x): silence that."""
    import warnings
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")


# --------------------------------------------------------------------------------------------
# the autoencoder step-time benchmarks (bench_tnt.py, bench_baselines.py)

#: The TNT paper's MNIST autoencoder (ReLU; the code and output layers are linear).
AE_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
AE_BATCH = 1000
#: ``(T1, T2)``: statistics every ``T1`` steps, inverses every ``T2`` steps.
AE_SCHEDULES = ((1, 20), (10, 100))
#: Steps in one timed SGD-m cycle.
AE_SGD_CYCLE = 20
#: Timing only: the cost of a step does not depend on these values.
AE_LR, AE_MOMENTUM, AE_DAMPING, AE_EMA = 1e-4, 0.9, 0.1, 0.9


def ae_problem(seed: int, widths: Sequence[int] = AE_WIDTHS, batch: int = AE_BATCH
               ) -> tuple[Tensor, nn.Sequential]:
    """``(x, model)``: the batch (inputs uniform in [0, 1], used as their own targets; drawn
    from a generator seeded with ``seed``) and the initial autoencoder (drawn from torch's
    global generator, which the caller seeds)."""
    x = torch.rand(batch, widths[0], generator=torch.Generator().manual_seed(seed))
    return x, autoencoder(widths)


def ae_metadata(widths: Sequence[int], batch: int, **extra) -> dict:
    """:func:`metadata` with the description of the autoencoder problem."""
    return metadata(model="autoencoder " + "-".join(map(str, widths)) + " (ReLU, linear code "
                    "and output)", batch=batch, dtype="float32",
                    data="random: inputs uniform in [0, 1], targets = inputs",
                    likelihood="bernoulli (BCE-with-logits summed over outputs, batch mean)",
                    **extra)


class CycleTrainer:
    """A copy of ``init`` with its optimizer, trained in whole cycles of ``steps`` steps on the
    batch ``x`` (its own targets; mean Bernoulli loss).

    ``kind``:

    * ``"sgd"`` — ``torch.optim.SGD(lr, momentum)`` after an ordinary backward;
    * ``"curvlib"`` — ``make(model)`` returns a curvlib optimizer, stepped by
      ``opt.backward(out, x); opt.step()``;
    * ``"asdl"`` — ASDL's K-FAC (:func:`asdl_kfac` with ``t1``, ``t2``, ``damping``, ``ema``)
      preconditions the gradient, then ``torch.optim.SGD(lr, momentum)``.

    ``reset()`` puts the parameters back to their initial values (the optimizer state stays),
    so that timed runs stay finite; ``cycle()`` appends the last step's loss to ``losses``.
    """

    def __init__(self, kind: str, init: nn.Module, x: Tensor, steps: int, *, lr: float,
                 momentum: float, make: Callable[[nn.Module], object] | None = None,
                 t1: int = 1, t2: int = 1, damping: float = 0.0, ema: float = 0.9):
        import curvlib

        self.kind, self.x, self.steps = kind, x, steps
        self.model = copy.deepcopy(init)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.lik = curvlib.as_likelihood("bernoulli")
        self.losses: list[float] = []
        if kind == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        elif kind == "curvlib":
            if make is None:
                raise ValueError("kind 'curvlib' needs make=(model → curvlib optimizer)")
            self.opt = make(self.model)
        elif kind == "asdl":
            self.gm = asdl_kfac(self.model, batch=x.shape[0], damping=damping, t1=t1, t2=t2,
                                ema=ema)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        else:
            raise ValueError(f"kind must be 'sgd', 'curvlib' or 'asdl', got {kind!r}")

    def reset(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.initial[k])

    def step(self) -> Tensor:
        x = self.x
        if self.kind == "asdl":
            return asdl_step(self.gm, self.opt, self.model, x, x)
        self.opt.zero_grad()
        out = self.model(x)
        if self.kind == "curvlib":
            loss = self.opt.backward(out, x)
        else:
            loss = self.lik.mean_loss(out, x)
            loss.backward()
        self.opt.step()
        return loss.detach()

    def cycle(self) -> None:
        loss = None
        for _ in range(self.steps):
            loss = self.step()
        self.losses.append(float(loss))


def asdl_probe(init: nn.Module, x: Tensor, *, lr: float, momentum: float, damping: float,
               ema: float) -> tuple[bool, str]:
    """Import ASDL and run three K-FAC steps of ``init`` on ``x``: ``(usable, note)``; not
    usable when it does not import, fails, or the loss is not finite."""
    module, note = load_asdl()
    if module is None:
        return False, note
    quiet_asdl_warnings()
    try:  # must run and stay finite with this torch before it is timed
        probe = CycleTrainer("asdl", init, x, 3, lr=lr, momentum=momentum, t1=1, t2=2,
                             damping=damping, ema=ema)
        probe.cycle()
        if not math.isfinite(probe.losses[-1]):
            raise FloatingPointError(f"loss {probe.losses[-1]}")
    except Exception as exc:
        return False, f"ASDL imports but fails: {type(exc).__name__}: {exc}"
    return True, note


def paired_rounds(sgd: Timed, others: Sequence[Timed], rounds: int) -> list[list[float]]:
    """Time ``rounds`` rounds; in each, every item of ``others`` (their order rotated by one
    per round) is sampled right after one sample of ``sgd``. Prints a line per round and
    returns the SGD samples of each round (for per-round ratios)."""
    others = list(others)
    sgd_round: list[list[float]] = []
    for r in range(rounds):
        n_before = len(sgd.samples)
        shift = r % len(others)
        for item in others[shift:] + others[:shift]:
            sgd.sample()
            item.sample()
        sgd_round.append(sgd.samples[n_before:])
        print(f"# round {r + 1}/{rounds}: load {loadavg()}, SGD "
              f"{statistics.median(sgd_round[-1]) * 1e3:.1f} ms/step, "
              + ", ".join(f"{o.key} {o.samples[-1] * 1e3:.1f}" for o in others), flush=True)
    return sgd_round


def cycle_record(item: Timed, sgd_round: Sequence[Sequence[float]], sgd_ms: float) -> dict:
    """A timed cycle's summary: median ms/step, quartiles, ratio of the medians to SGD-m
    (``sgd_ms``), and the median and range of the per-round ratios (each sample over the
    median SGD-m sample of its round)."""
    q1, q3 = item.quartiles()
    per_round = ([s / statistics.median(sr) for s, sr in
                  zip(item.samples, sgd_round, strict=False)]
                 if item.key != "sgd" else [1.0])
    return {"key": item.key, "label": item.label, "ms_per_step": item.median * 1e3,
            "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "ratio_sgd": item.median * 1e3 / sgd_ms,
            "per_round_ratio_median": statistics.median(per_round),
            "per_round_ratio_min": min(per_round), "per_round_ratio_max": max(per_round),
            "cycles": len(item.samples), "steps_per_cycle": item.per}


def shrink_png(path) -> None:
    """Re-save a PNG with a 256-colour palette (about a third of the size, for committed
    plots); if Pillow is missing or fails, matplotlib's full-colour PNG is kept."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except Exception:  # Pillow missing or failing: the plot stays as matplotlib wrote it
        pass
