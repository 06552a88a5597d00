"""The assembled optimizer against an independent float64 implementation of TNT.

The reference below (:class:`PaperTNT`) is written from the paper (Algorithm 1, eqs. (3)–(5))
and curvlib's documented choices (docs/tnt.md), its factor formulas shared with the
composition matrix's reference (:mod:`curvlib.testing.reference.tensor_normal`): mode
statistics ``mat_i(G) mat_i(G)ᵀ`` averaged over the draws; ``H = S`` at the first statistics
step, then ``H ← ema·H + (1 − ema)·S``; eq. (5) normalisation; damping added to each
normalised factor; dense inverses by ``torch.linalg.inv`` and their Kronecker product
(``torch.kron``) applied to ``vec(m)``; momentum ``m ← μm + g`` before preconditioning;
decoupled weight decay ``W ← W − lr·(p + wd·W)``; statistics at ``t % T1 == 0``, inverses at
``t % T2 == 0`` and at every statistics step while ``t < T2``. Gradients come from
:mod:`curvlib.testing.oracles` (per-sample ``torch.func``), not from the optimizer's own
backward pass.

Everything is float64 and compared at 1e-10 relative: the factors are inverted one at a time
by both sides (never as one dense Kronecker solve), so round-off stays near ``Σ_i κ_i u``.
"""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.likelihoods import as_likelihood
from curvlib.optim import CompatibilityError, CurvatureOptimizer
from curvlib.solvers import Cholesky, Solver
from curvlib.sources import Source, TrueFisher
from curvlib.structures import TensorNormal
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.reference.tensor_normal import kron_apply, mode_statistic, normalised
from curvlib.testing.reference.tensor_normal import tnt_dims as _tnt_dims
from curvlib.testing.reference.tensor_normal import unfold as _unfold
from curvlib.testing.strategies import ModelSpec, examples, make_targets, problems, seeds

F64 = torch.float64


# -- the independent reference --------------------------------------------------------------------


class PaperTNT:
    """TNT with momentum and decoupled weight decay, one dict of hyperparameters per tensor."""

    def __init__(self, params: dict[str, torch.Tensor], hyper: dict[str, dict],
                 reshape: str = "out_in_kernel"):
        self.params = {n: p.detach().clone().to(F64) for n, p in params.items()}
        self.hyper = hyper
        self.dims = {n: _tnt_dims(p.shape, reshape) for n, p in params.items()}
        self.H: dict[str, list] = {}
        self.inv: dict[str, list] = {}
        self.buf: dict[str, torch.Tensor] = {}
        self.updates = {n: 0 for n in params}

    def statistics_due(self, t: int, name: str) -> bool:
        return t % self.hyper[name]["stat_every"] == 0

    def step(self, t: int, grads: dict[str, torch.Tensor],
             sampled: dict[str, torch.Tensor] | None) -> None:
        """``grads``: the mini-batch gradient; ``sampled``: ``(S, *shape)`` per tensor."""
        for name, w in self.params.items():
            h = self.hyper[name]
            dims = self.dims[name]
            covered = w.dim() >= 1
            updated = False
            if covered and sampled is not None and self.statistics_due(t, name):
                g = sampled[name].reshape(-1, *dims)
                stats = [mode_statistic(g, i) for i in range(len(dims))]
                if self.updates[name] == 0:
                    self.H[name] = stats
                else:
                    self.H[name] = [h["ema"] * a + (1 - h["ema"]) * s
                                    for a, s in zip(self.H[name], stats, strict=True)]
                self.updates[name] += 1
                updated = True
            t2 = h["inverse_every"]
            if covered and self.updates[name] and (t % t2 == 0 or (updated and t < t2)):
                # eq. (5); tr H = 0 (no gradient, e.g. a dead ReLU) gives its limit Ũ_i = 0
                self.inv[name] = [torch.linalg.inv(u + h["damping"] * torch.eye(d, dtype=F64))
                                  for u, d in zip(normalised(self.H[name], dims), dims,
                                                  strict=True)]
            grad = grads[name].reshape(w.shape)
            m = grad.clone() if name not in self.buf else h["momentum"] * self.buf[name] + grad
            self.buf[name] = m
            if covered and name in self.inv:
                direction = kron_apply(self.inv[name], m, dims).reshape(w.shape)
            else:
                direction = m  # the fallback (and identity inverses before any statistics)
            self.params[name] = w - h["lr"] * (direction + h["weight_decay"] * w)


def _split(flat: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = flat[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
    return out


def _load(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])


def _hyper(model, **h):
    base = dict(lr=0.1, damping=0.1, momentum=0.9, weight_decay=0.0, ema=0.9, stat_every=1,
                inverse_every=20)
    base.update(h)
    return {n: dict(base) for n, _ in model.named_parameters()}


def _train(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()


# -- end to end: TNT (sampled targets) and the empirical variant ----------------------------------


@given(problem=problems(kinds=("mlp", "cnn1d", "cnn2d")), seed=seeds(), steps=st.integers(1, 3),
       lr=st.sampled_from([0.05, 0.3]), damping=st.sampled_from([0.2, 1.0, 5.0]),
       momentum=st.sampled_from([0.0, 0.9]), weight_decay=st.sampled_from([0.0, 0.1]),
       draws=st.sampled_from([1, 1, 2]))
# up to 3 optimizer steps and 9 torch.func oracle gradients each
@settings(max_examples=examples(0.5))
def test_tnt_steps_equal_the_paper_by_hand(problem, seed, steps, lr, damping, momentum,
                                          weight_decay, draws):
    model = problem.model
    ref_model = copy.deepcopy(model)
    lik = as_likelihood(problem.likelihood)
    opt = curvlib.TNT(model, lik, lr=lr, damping=damping, momentum=momentum,
                      weight_decay=weight_decay, num_samples=draws,
                      generator=torch.Generator().manual_seed(seed))
    group = opt.param_groups[0]
    t1, t2 = group["stat_every"], group["inverse_every"]
    has_conv = any(isinstance(m, nn.Conv1d | nn.Conv2d) for m in model.modules())
    assert (t1, t2) == ((10, 100) if has_conv else (1, 20))
    ref = PaperTNT(dict(model.named_parameters()),
                   _hyper(model, lr=lr, damping=damping, momentum=momentum,
                          weight_decay=weight_decay, stat_every=t1, inverse_every=t2))
    gen = torch.Generator().manual_seed(seed)  # a copy of the optimizer's generator state
    batches = _data_batches(problem.spec, problem.likelihood, problem.batch_size, steps,
                            problem.seed)
    for t, (x, y) in enumerate(batches):
        _train(opt, model, [(x, y)])
        _load(ref_model, ref.params)
        grads = _split(oracles.gradient(ref_model, lik, x, y), ref_model)
        sampled = None
        if t % t1 == 0:  # the source: per draw, targets for the batch from the model's
            with torch.no_grad():  # predictive distribution, and the mean loss's gradient
                outputs = ref_model(x)
            per_draw = [_split(oracles.gradient(ref_model, lik, x,
                                                lik.sample(outputs.detach(), generator=gen)),
                               ref_model) for _ in range(draws)]
            sampled = {n: torch.stack([g[n] for g in per_draw]) for n in per_draw[0]}
        before = {n: p.clone() for n, p in ref.params.items()}
        ref.step(t, grads, sampled)
        for name, p in model.named_parameters():
            assert_close(p, ref.params[name], what=f"step {t}: {name}")
            # the step itself, not only the parameters (its size can be far below theirs);
            # measured from the parameters it carries their round-off u‖W‖, hence 1e-8
            assert_close(p.detach() - before[name], ref.params[name] - before[name],
                         rtol=1e-8, atol=1e-14, what=f"step {t}: Δ{name}")


def _data_batches(spec: ModelSpec, lik: str, n: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        x = torch.randn(n, *spec.in_shape, generator=gen, dtype=F64)
        out.append((x, make_targets(lik, spec.output_shape(), n, seed + 100 + s)))
    return out


@pytest.mark.parametrize("spec,lik,reshape", [
    (ModelSpec("mlp", (4,), (5,), 3, seed=1), "categorical", "out_in_kernel"),
    (ModelSpec("cnn2d", (2, 4, 4), (3,), 2, kernel=2, seed=2), "gaussian", "out_in_kernel"),
    (ModelSpec("cnn2d", (2, 4, 4), (3,), 3, kernel=2, seed=4), "categorical", "out_rest"),
    (ModelSpec("cnn1d", (2, 5), (3,), 2, kernel=2, spatial_output=True, seed=3), "bernoulli",
     "out_in_kernel"),
])
def test_empirical_tnt_matches_the_paper_formulas_step_by_step(spec, lik, reshape):
    """``stat_every=2, inverse_every=3`` over 7 steps: statistics at 0, 2, 4, 6; inverses at
    0 and 2 (statistics steps before T2), 3 and 6 (multiples of T2); EMA from step 2 on."""
    model = spec.build()
    ref_model = copy.deepcopy(model)
    hyper = dict(lr=0.1, damping=0.3, momentum=0.8, weight_decay=0.01, ema=0.7,
                 stat_every=2, inverse_every=3)
    structure = "tensor_normal" if reshape == "out_in_kernel" else TensorNormal(reshape=reshape)
    opt = curvlib.assemble(model, lik, source="empirical", structure=structure,
                           solver="cholesky", **hyper)
    ref = PaperTNT(dict(model.named_parameters()), _hyper(model, **hyper), reshape=reshape)
    for t, (x, y) in enumerate(_data_batches(spec, lik, 5, 7, seed=11)):
        _train(opt, model, [(x, y)])
        _load(ref_model, ref.params)
        grads = _split(oracles.gradient(ref_model, lik, x, y), ref_model)
        # data targets: the statistic is the mini-batch gradient itself (S = 1)
        ref.step(t, grads, {n: g.unsqueeze(0) for n, g in grads.items()})
        for name, p in model.named_parameters():
            assert_close(p, ref.params[name], what=f"step {t}: {name}")
        for name, p in model.named_parameters():
            state = opt.state[p]
            for i, inv in enumerate(ref.inv.get(name, [])):
                # a damped rank-deficient factor: inverses agree to about d·κ·u
                kappa = torch.linalg.cond(inv).item()
                assert_close(state[f"tnt_inv{i}"], inv, rtol=max(1e-10, 10 * inv.shape[0] *
                                                                  kappa * 2.2e-16),
                             what=f"step {t}: {name} inverse {i} (κ={kappa:.1e})")


# -- schedule ---------------------------------------------------------------------------------


def _spy(opt: CurvatureOptimizer) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {"update": [], "refresh": [], "collect": []}
    structure, source = opt.structure, opt.source
    update, refresh, collect = structure.update, structure.refresh, source.collect

    def spy_update(*a, **k):
        calls["update"].append(opt.step_count)
        return update(*a, **k)

    def spy_refresh(*a, **k):
        calls["refresh"].append(opt.step_count)
        return refresh(*a, **k)

    def spy_collect(*a, **k):
        calls["collect"].append(opt.step_count)
        return collect(*a, **k)

    structure.update, structure.refresh, source.collect = spy_update, spy_refresh, spy_collect
    return calls


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=F64)
    y = torch.randint(2, (6,))
    return model, x, y


@pytest.mark.parametrize("t1,t2", [(1, 1), (1, 3), (2, 3), (3, 2), (2, 4), (4, 4), (5, 20),
                                   (10, 100)])
@pytest.mark.parametrize("source", ["true_fisher", "empirical"])
def test_statistics_and_inverses_follow_the_schedule(t1, t2, source):
    model, x, y = _tiny()
    opt = curvlib.assemble(model, "categorical", source=source, structure="tensor_normal",
                           stat_every=t1, inverse_every=t2, generator=torch.Generator())
    calls = _spy(opt)
    steps = 13
    _train(opt, model, [(x, y)] * steps)
    stats = [t for t in range(steps) if t % t1 == 0]
    refresh = [t for t in range(steps) if t % t2 == 0 or (t % t1 == 0 and t < t2)]
    assert calls["collect"] == stats
    assert calls["update"] == stats
    assert calls["refresh"] == refresh
    assert opt.step_count == steps


def test_a_step_after_a_plain_backward_is_refused_and_changes_nothing():
    """``loss.backward(); opt.step()`` would step without curvature (SGD-m in disguise):
    refused with a UsageError naming the fix; parameters, state and schedule unchanged."""
    model, x, y = _tiny()
    opt = curvlib.TNT(model, "categorical", lr=0.1, damping=1e-3,
                      generator=torch.Generator())
    calls = _spy(opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(curvlib.errors.UsageError, match=r"opt\.backward"):
        opt.step()
    assert calls["update"] == [] and calls["collect"] == []
    assert opt.step_count == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_step_without_any_backward_does_nothing():
    """As torch's optimizers: no gradient since the last step, no step (the schedule does
    not advance)."""
    model, x, y = _tiny()
    opt = curvlib.TNT(model, "categorical", lr=0.1, damping=1e-3,
                      generator=torch.Generator())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.step_count == 0
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    assert opt.step_count == 1
    moved = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the same gradients again: nothing new, nothing done
    assert opt.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(moved, model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, moved, strict=True))


# -- state_dict -------------------------------------------------------------------------------


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: what users load with by default


def _targets_spy(opt):
    seen = []
    collect = opt.source.collect

    def spy(*a, **k):
        stats = collect(*a, **k)
        seen.append([t.clone() for t in stats.targets])
        return stats

    opt.source.collect = spy
    return seen


@pytest.mark.parametrize("spec", [ModelSpec("mlp", (4,), (5,), 3, seed=4),
                                  ModelSpec("cnn2d", (2, 4, 4), (3,), 3, seed=5)])
def test_state_dict_round_trip_continues_bit_identically(spec):
    model = spec.build()
    kwargs = dict(lr=0.1, damping=0.1, weight_decay=0.01, stat_every=2, inverse_every=3)
    opt = curvlib.TNT(model, "categorical", generator=torch.Generator().manual_seed(3),
                      **kwargs)
    batches = _data_batches(spec, "categorical", 6, 7, seed=5)
    _train(opt, model, batches[:3])
    saved_opt = _roundtrip(opt.state_dict())
    saved_model = _roundtrip(model.state_dict())

    fresh = ModelSpec(**{**spec.__dict__, "seed": spec.seed + 100}).build()
    fresh_opt = curvlib.TNT(fresh, "categorical", generator=torch.Generator().manual_seed(99),
                            **kwargs)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.step_count == opt.step_count == 3
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype, key

    seen_a, seen_b = _targets_spy(opt), _targets_spy(fresh_opt)
    for t, batch in enumerate(batches[3:], start=3):
        _train(opt, model, [batch])
        _train(fresh_opt, fresh, [batch])
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(p, q), f"step {t}"
    assert len(seen_a) == len(seen_b) == 2  # statistics at steps 4 and 6 (stat_every=2)
    for a, b in zip(seen_a, seen_b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def _half_setup(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(8, 3).to(dtype)
    y = torch.randint(3, (8,))
    return model, x, y


def _trained_and_reloaded(dtype):
    """A half-precision model after three TNT steps on one batch, that batch, and a fresh
    copy loaded from the optimizer's state."""
    model, x, y = _half_setup(dtype)
    opt = curvlib.TNT(model, "categorical", lr=0.05, damping=0.1,
                      generator=torch.Generator().manual_seed(0))
    _train(opt, model, [(x, y)] * 3)
    fresh = copy.deepcopy(model)
    fresh_opt = curvlib.TNT(fresh, "categorical", lr=0.05, damping=0.1)
    fresh_opt.load_state_dict(_roundtrip(opt.state_dict()))
    return model, (x, y), opt, fresh, fresh_opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_curvature_state_of_a_half_precision_model_stays_float32_after_loading(dtype):
    model, _, opt, fresh, fresh_opt = _trained_and_reloaded(dtype)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        state = fresh_opt.state[q]
        factors = [k for k in state if k.startswith(("tnt_H", "tnt_inv"))]
        assert factors
        for key in factors:
            assert state[key].dtype == torch.float32, key
        assert state["tnt_updates"].dtype == F64
        assert state["momentum_buffer"].dtype == dtype
        assert opt.state[p]["tnt_H0"].dtype == torch.float32


def test_half_precision_state_round_trip_is_bit_identical():
    model, (x, y), opt, fresh, fresh_opt = _trained_and_reloaded(torch.bfloat16)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
    _train(opt, model, [(x, y)])
    _train(fresh_opt, fresh, [(x, y)])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


# -- hyperparameters, groups, schedulers ---------------------------------------------------------


def test_an_lr_scheduler_changes_the_step():
    spec = ModelSpec("mlp", (4,), (5,), 3, seed=6)
    batches = _data_batches(spec, "categorical", 6, 3, seed=1)
    runs = {}
    for mode in ("scheduler", "constant"):
        model = spec.build()
        opt = curvlib.assemble(model, "categorical", source="empirical",
                               structure="tensor_normal", lr=0.4, momentum=0.0)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
        deltas = []
        for batch in batches:
            before = [p.detach().clone() for p in model.parameters()]
            _train(opt, model, [batch])
            deltas.append([p.detach() - b for p, b in zip(model.parameters(), before,
                                                          strict=True)])
            if mode == "scheduler":
                scheduler.step()
        runs[mode] = (deltas, opt.param_groups[0]["lr"])
    assert runs["scheduler"][1] == pytest.approx(0.4 * 0.25**3)
    assert runs["constant"][1] == 0.4
    # same first step; the second step uses lr 0.1 (same state, momentum 0: a quarter of it)
    first_s, first_c = runs["scheduler"][0][0], runs["constant"][0][0]
    for a, b in zip(first_s, first_c, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(runs["scheduler"][0][1], runs["constant"][0][1], strict=True):
        assert_close(a, 0.25 * b, rtol=1e-12, what="Δ with the scheduled lr")


def test_param_groups_use_their_own_hyperparameters():
    spec = ModelSpec("mlp", (3,), (4,), 2, seed=7)
    model = spec.build()
    ref_model = copy.deepcopy(model)
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    groups = [dict(params=first, lr=0.3, damping=1.0, momentum=0.5, weight_decay=0.1, ema=0.5),
              dict(params=rest)]
    defaults = dict(lr=0.05, damping=0.02, momentum=0.9, weight_decay=0.0, ema=0.9,
                    stat_every=1, inverse_every=2)
    opt = curvlib.assemble(model, "gaussian", source="empirical", structure="tensor_normal",
                           params=groups, **defaults)
    hyper = _hyper(model, **defaults)
    for name in ("0.weight", "0.bias"):
        hyper[name].update(lr=0.3, damping=1.0, momentum=0.5, weight_decay=0.1, ema=0.5)
    ref = PaperTNT(dict(model.named_parameters()), hyper)
    for t, (x, y) in enumerate(_data_batches(spec, "gaussian", 5, 4, seed=2)):
        _train(opt, model, [(x, y)])
        _load(ref_model, ref.params)
        grads = _split(oracles.gradient(ref_model, "gaussian", x, y), ref_model)
        ref.step(t, grads, {n: g.unsqueeze(0) for n, g in grads.items()})
        for name, p in model.named_parameters():
            assert_close(p, ref.params[name], what=f"step {t}: {name}")


class Scaled(nn.Module):
    """An MLP times a learnable scalar (an order-0 parameter)."""

    def __init__(self):
        super().__init__()
        self.body = ModelSpec("mlp", (3,), (4,), 2, seed=8).build()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))

    def forward(self, x):
        return self.body(x) * self.scale


def test_a_scalar_parameter_falls_back_to_sgd_with_momentum():
    model = Scaled()
    ref_model = copy.deepcopy(model)
    opt = curvlib.TNT(model, "categorical", lr=0.1, damping=0.1, weight_decay=0.05,
                      generator=torch.Generator().manual_seed(0))
    ref = PaperTNT(dict(model.named_parameters()), _hyper(model, weight_decay=0.05))
    gen = torch.Generator().manual_seed(0)
    spec = ModelSpec("mlp", (3,), (4,), 2)
    for t, (x, y) in enumerate(_data_batches(spec, "categorical", 6, 3, seed=3)):
        _train(opt, model, [(x, y)])
        _load(ref_model, ref.params)
        grads = _split(oracles.gradient(ref_model, "categorical", x, y), ref_model)
        with torch.no_grad():
            y_s = as_likelihood("categorical").sample(ref_model(x), generator=gen)
        sampled = {n: g.unsqueeze(0) for n, g in
                   _split(oracles.gradient(ref_model, "categorical", x, y_s), ref_model).items()}
        ref.step(t, grads, sampled)
        for name, p in model.named_parameters():
            assert_close(p, ref.params[name], what=f"step {t}: {name}")
    assert not any(k.startswith("tnt_") for k in opt.state[model.scale])
    assert "momentum_buffer" in opt.state[model.scale]


class WithIdle(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2).double()
        self.idle = nn.Linear(3, 2).double()  # never called
        self.frozen = nn.Parameter(torch.ones(2, dtype=F64), requires_grad=False)

    def forward(self, x):
        return self.used(x) + self.frozen


@pytest.mark.parametrize("source", ["true_fisher", "empirical"])
def test_parameters_without_a_gradient_are_skipped(source):
    model = WithIdle()
    idle = [p.detach().clone() for p in model.idle.parameters()]
    opt = curvlib.assemble(model, "categorical", source=source, structure="tensor_normal",
                           lr=0.1, damping=0.1, weight_decay=0.1, generator=torch.Generator())
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(2, (5,))
    used = model.used.weight.detach().clone()
    _train(opt, model, [(x, y)] * 3)
    for p, before in zip(model.idle.parameters(), idle, strict=True):
        assert torch.equal(p, before)
        assert "momentum_buffer" not in opt.state[p]
    assert torch.equal(model.frozen, torch.ones(2, dtype=F64))
    assert not torch.equal(model.used.weight, used)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_damping_with_an_idle_parameter_keeps_its_identity_and_warns():
    """No gradient: zero statistics, so with damping 0 the factor ``Ũ + 0·I`` is exactly 0 and
    cannot be inverted at any raised damping (0·10^k): the identity is kept, with a warning."""
    model = WithIdle()
    opt = curvlib.assemble(model, "categorical", source="true_fisher",
                           structure="tensor_normal", lr=0.1, damping=0.0,
                           generator=torch.Generator())
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(2, (5,))
    with pytest.warns(RuntimeWarning, match="could not be inverted"):
        _train(opt, model, [(x, y)])
    assert opt.last_refresh["kept"] >= 2
    for p in model.idle.parameters():
        for key, value in opt.state[p].items():
            if key.startswith("tnt_inv"):
                assert torch.equal(value, torch.eye(value.shape[0], dtype=F64)), key


def test_unknown_hyperparameter_is_refused():
    model, _, _ = _tiny()
    with pytest.raises(TypeError, match=r"unknown hyperparameter.*'dampnig'"):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         dampnig=0.1)


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-0.1), "lr must be non-negative"),
    (dict(damping=-1e-3), "damping must be non-negative"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(momentum=-0.5), "momentum must be in"),
    (dict(ema=1.0), "ema must be in"),
    (dict(ema=1.5), "ema must be in"),
    (dict(stat_every=0), "stat_every must be a positive integer"),
    (dict(inverse_every=0), "inverse_every must be a positive integer"),
    (dict(inverse_every=2.5), "inverse_every must be a positive integer"),
])
def test_bad_hyperparameters_are_refused(bad, match):
    model, _, _ = _tiny()
    with pytest.raises(ValueError, match=match):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         **bad)
    with pytest.raises(ValueError, match=match):  # also inside a param group
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         params=[dict(params=list(model.parameters()), **bad)])


def test_a_parameter_outside_the_model_is_refused():
    model, _, _ = _tiny()
    stray = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(curvlib.CurvlibError, match="not a parameter of the model"):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         params=[*model.parameters(), stray])


class GramOnly(Source):
    name = "gram_only"

    @property
    def provides(self):
        return frozenset({"gram"})

    @property
    def needs_capture(self):
        return False

    def collect(self, *a, **k):  # pragma: no cover - never reached
        raise AssertionError("not called")


class SquareRootsOnly(Solver):
    name = "square_roots_only"
    powers = (2.0,)

    def inverse_root(self, matrices, damping, power=1.0):  # pragma: no cover - never reached
        raise AssertionError("not called")


def test_a_structure_needing_missing_statistics_is_incompatible():
    model, _, _ = _tiny()
    with pytest.raises(CompatibilityError, match="batch_grads") as info:
        curvlib.assemble(model, "categorical", source=GramOnly(), structure="tensor_normal")
    assert isinstance(info.value, ValueError)
    with pytest.raises(CompatibilityError, match=r"p in \[1.0\].*solvers that do: 'cholesky'"):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         solver=SquareRootsOnly())


# -- warm start and failures ---------------------------------------------------------------------


def test_warm_start_sets_the_mean_statistics_and_the_inverses():
    spec = ModelSpec("cnn2d", (1, 4, 4), (2,), 2, kernel=2, seed=9)
    model = spec.build()
    ref_model = copy.deepcopy(model)  # before the optimizer hooks the model (see below)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = curvlib.assemble(model, "gaussian", source="empirical", structure="tensor_normal",
                           lr=0.1, damping=0.2, ema=0.6, inverse_every=5)
    batches = _data_batches(spec, "gaussian", 4, 4, seed=4)
    assert opt.warm_start(iter(batches[:3])) == 3
    assert opt.step_count == 0
    grads = [_split(oracles.gradient(ref_model, "gaussian", x, y), model)
             for x, y in batches[:3]]
    means = {}
    for name, p in model.named_parameters():
        assert torch.equal(p, params_before[name]) and p.grad is None
        dims = _tnt_dims(p.shape)
        state = opt.state[p]
        means[name] = []
        for i in range(len(dims)):
            stats = [_unfold(g[name].reshape(dims), i) @ _unfold(g[name].reshape(dims), i).T
                     for g in grads]
            mean = sum(stats) / 3
            means[name].append(mean)
            assert_close(state[f"tnt_H{i}"], mean, what=f"{name}: warm-start H{i}")
        for i, u in enumerate(normalised(means[name], dims)):
            assert_close(state[f"tnt_inv{i}"],
                         torch.linalg.inv(u + 0.2 * torch.eye(dims[i], dtype=F64)),
                         what=f"{name}: inverse {i} after the warm start")
    # the first training step continues the EMA from the warm-start mean
    x, y = batches[3]
    _train(opt, model, [(x, y)])
    new = _split(oracles.gradient(ref_model, "gaussian", x, y), model)  # at the warm point
    for name, p in model.named_parameters():
        dims = _tnt_dims(p.shape)
        gi = new[name].reshape(dims)
        for i in range(len(dims)):
            expected = 0.6 * means[name][i] + 0.4 * _unfold(gi, i) @ _unfold(gi, i).T
            assert_close(opt.state[p][f"tnt_H{i}"], expected, what=f"{name}: EMA after warm")


def test_warm_start_needs_batches():
    model, _, _ = _tiny()
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="tensor_normal")
    with pytest.raises(ValueError, match="no batches"):
        opt.warm_start([])


def test_a_deep_copy_of_an_optimized_model_can_still_be_trained():
    model, x, y = _tiny()
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="tensor_normal")
    _train(opt, model, [(x, y)])
    twin = copy.deepcopy(model)  # e.g. keeping the best model, or an EMA of the weights
    nn.functional.cross_entropy(twin(x), y).backward()


class AlwaysFails(Solver):
    name = "always_fails"

    def inverse_root(self, matrices, damping, power=1.0):
        bad = torch.full_like(matrices, float("nan"))
        return bad, torch.zeros(matrices.shape[0], dtype=torch.bool)


def test_a_factor_that_cannot_be_inverted_keeps_the_previous_inverse_and_warns():
    model, x, y = _tiny()
    opt = curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                           lr=0.1, damping=0.1, generator=torch.Generator().manual_seed(0))
    _train(opt, model, [(x, y)] * 2)
    saved = {id(p): {k: v.clone() for k, v in opt.state[p].items() if k.startswith("tnt_inv")}
             for p in model.parameters()}
    assert any(not torch.equal(v, torch.eye(v.shape[0], dtype=F64))
               for s in saved.values() for v in s.values())
    opt.solver = AlwaysFails()
    with pytest.warns(RuntimeWarning, match="could not be inverted"):
        _train(opt, model, [(x, y)])
    assert opt.last_refresh["kept"] == opt.last_refresh["factors"] > 0
    for p in model.parameters():
        assert torch.isfinite(p).all()
        for key, value in saved[id(p)].items():
            assert torch.equal(opt.state[p][key], value), key
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_a_solver_failing_from_the_start_keeps_the_identity():
    model, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                           solver=AlwaysFails(), lr=0.1, momentum=0.0,
                           generator=torch.Generator())
    with pytest.warns(RuntimeWarning, match="could not be inverted"):
        _train(opt, model, [(x, y)])
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        for k, v in opt.state[p].items():
            if k.startswith("tnt_inv"):
                assert torch.equal(v, torch.eye(v.shape[0], dtype=F64))
        assert_close(p.detach(), b - 0.1 * p.grad, rtol=1e-14, what="an SGD step")


# -- the recipe -------------------------------------------------------------------------------


def test_tnt_recipe_picks_its_schedule_and_components():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 2))
    cnn1d = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2, 2))
    for model, expected in ((mlp, (1, 20)), (cnn, (10, 100)), (cnn1d, (10, 100))):
        opt = curvlib.TNT(model, "categorical", lr=1e-3, damping=1e-3)
        group = opt.param_groups[0]
        assert (group["stat_every"], group["inverse_every"]) == expected
        assert (group["ema"], group["momentum"]) == (0.9, 0.9)
        assert isinstance(opt.source, TrueFisher)
        assert opt.source.num_samples == 1 and not opt.source.per_sample
        assert isinstance(opt.structure, TensorNormal)
        assert opt.structure.reshape == "out_in_kernel"
        assert isinstance(opt.solver, Cholesky)
    opt = curvlib.TNT(cnn, "categorical", lr=1e-3, damping=1e-3, stat_every=3,
                      inverse_every=7)
    with pytest.raises(TypeError, match="lr"):
        curvlib.TNT(mlp, "categorical")
    assert (opt.param_groups[0]["stat_every"], opt.param_groups[0]["inverse_every"]) == (3, 7)


def test_unknown_param_group_keys_are_reported():
    model = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=r"\['dampnig'\] are not curvlib hyperparameters"):
        curvlib.assemble(model, "gaussian", source="true_fisher", structure="tensor_normal",
                         params=[{"params": model.parameters(), "dampnig": 5.0}])


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_a_diverged_model_does_not_crash_the_statistics_step(likelihood):
    """NaN outputs: the batch is rejected (a warning, a NaN loss) and the step skipped."""
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    x = torch.randn(4, 3, dtype=torch.float64)
    y = {"categorical": torch.zeros(4, dtype=torch.long),
         "bernoulli": torch.zeros(4, 2, dtype=torch.float64),
         "gaussian": torch.zeros(4, 2, dtype=torch.float64)}[likelihood]
    opt = curvlib.TNT(model, likelihood, lr=0.1, damping=0.1)
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.backward(model(x), y)
    opt.step()
    assert torch.isnan(loss) and opt.skipped_steps == 1 and opt.step_count == 0
    assert not opt.state  # no statistics, no momentum


def test_covers_receives_the_module_that_owns_the_parameter():
    """Vector structures get the owner too: here only Linear parameters are covered, the
    convolution's fall back to SGD with momentum (no structure state)."""
    seen = []

    class OnlyLinear(TensorNormal):
        def covers(self, param, owner=None):
            seen.append(type(owner))
            return isinstance(owner, nn.Linear)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(3, 1, 3, dtype=F64), torch.randint(0, 2, (3,))
    opt = curvlib.assemble(model, "categorical", source="true_fisher", structure=OnlyLinear(),
                           lr=0.1, damping=1.0, generator=torch.Generator().manual_seed(0))
    _train(opt, model, [(x, y)])
    assert set(seen) == {nn.Conv1d, nn.Linear}
    assert all("tnt_H0" not in opt.state[p] for p in model[0].parameters())
    assert all("tnt_H0" in opt.state[p] for p in model[2].parameters())
