"""The ``kfac`` structure against dense float64 references written from the definitions.

Notation (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): a layer
``y_t = W x_t + b`` at positions ``t``; ``x̄ = [x, 1]`` with the bias folded; ``z`` the output
gradient of one per-sample loss; ``R = S·N`` rows over ``S`` target draws. ``expand``:
``A = (1/(RT)) Σ x̄x̄ᵀ``, ``B = (1/R) Σ zzᵀ``; ``reduce``: ``A`` from the position-mean of ``x̄``,
``B`` from the position-sum of ``z``. The layer's block is ``⊕_g B_g ⊗ A_g`` (row-major
``vec(z x̄ᵀ) = z ⊗ x̄``), damped as ``A + π√λ I``, ``B + (√λ/π) I``. The reference
(:mod:`curvlib.testing.reference.kfac`) unfolds convolutions itself, sums outer products in
loops and applies the dense ``⊕_g B_g⁻¹ ⊗ A_g⁻¹`` built with ``torch.kron``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.capture import Capture
from curvlib.layers.base import KFACFactors
from curvlib.likelihoods import as_likelihood
from curvlib.solvers import Cholesky, Eigh
from curvlib.sources import Empirical, TrueFisher
from curvlib.structures import KFAC
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.reference import ReferenceOptimizer, ReferenceStatistics
from curvlib.testing.reference.kfac import ReferenceKFAC
from curvlib.testing.strategies import ModelSpec, dampings, examples, make_targets, problems, seeds

F64 = torch.float64


def _constant(lam: float):
    return lambda mats: torch.full((mats.shape[0],), lam, dtype=F64, device=mats.device)


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for mname, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{local}" if mname else local, module)
    return out


def _items(structure: KFAC, model: nn.Module):
    """``(name, param, state)`` of the covered trainable parameters, model order."""
    owners = _owners(model)
    return [(n, p, structure.init_state(p)) for n, p in model.named_parameters()
            if p.requires_grad and structure.covers(p, owners[n])]


def _collect(model, likelihood, x, y, source, generator):
    with Capture(model) as cap:
        outputs = model(x)
        return source.collect(model, as_likelihood(likelihood), outputs, y, capture=cap,
                              generator=generator)


class Driver:
    """The structure and its reference fed the same statistics (the reference rebuilds them
    from the oracles at the draws the source used)."""

    def __init__(self, structure: KFAC, model: nn.Module, likelihood: str):
        self.structure, self.model, self.likelihood = structure, model, likelihood
        self.items = _items(structure, model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.ref = ReferenceKFAC(structure, model, names)

    def update(self, x, y, source, generator, ema):
        stats = _collect(self.model, self.likelihood, x, y, source, generator)
        self.structure.update(self.items, stats, ema=ema)
        self.ref.update(ReferenceStatistics(self.model, self.likelihood, x, stats.targets,
                                            stats.sampled), ema)
        return stats

    def refresh(self, lam, solver=None):
        report = self.structure.refresh(self.items, solver=solver or Cholesky(),
                                        damping=_constant(lam))
        self.ref.refresh(lam)
        return report

    def check(self, seed: int, what: str = ""):
        gen = torch.Generator().manual_seed(seed)
        vectors = [torch.randn(p.shape, generator=gen, dtype=F64) for _, p, _ in self.items]
        got = self.structure.directions(self.items, vectors)
        expected = self.ref.direction({n: v for (n, _, _), v in
                                       zip(self.items, vectors, strict=True)})
        for (name, _, _), d in zip(self.items, got, strict=True):
            assert_close(d, expected[name], what=f"{what} direction of {name}")
        blocks = self.structure.curvature_blocks(self.items)
        ref_blocks = self.ref.curvature()
        assert list(blocks) == list(ref_blocks)
        for key, block in blocks.items():
            assert block.dtype == F64
            assert_close(block, ref_blocks[key], what=f"{what} block {key}")


def _batches(spec: ModelSpec, likelihood: str, n: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *spec.in_shape, generator=gen, dtype=F64),
             make_targets(likelihood, spec.output_shape(), n, seed + 1 + s))
            for s in range(steps)]


# -- the direction and the blocks equal the dense reference ---------------------------------------


@given(problem=problems(kinds=("mlp", "cnn1d", "cnn2d")), mode=st.sampled_from(["expand",
                                                                                "reduce"]),
       pi=st.booleans(), lam=dampings(1e-4, 1e1), steps=st.integers(1, 3),
       ema=st.sampled_from([0.0, 0.5, 0.95]), draws=st.sampled_from([1, 2]),
       empirical=st.booleans(), seed=seeds())
@settings(max_examples=examples(0.2))
def test_direction_and_blocks_equal_the_dense_reference(problem, mode, pi, lam, steps, ema,
                                                        draws, empirical, seed):
    driver = Driver(KFAC(mode=mode, pi_damping=pi), problem.model, problem.likelihood)
    source = Empirical() if empirical else TrueFisher(num_samples=draws, per_sample=True)
    gen = torch.Generator().manual_seed(seed)
    driver.check(seed, "before any statistics:")  # identity, and zero blocks
    for t, (x, y) in enumerate(_batches(problem.spec, problem.likelihood, problem.batch_size,
                                        steps, problem.seed)):
        driver.update(x, y, source, gen, ema)
        report = driver.refresh(lam)
        assert report["kept"] == 0 and report["factors"] > 0
        driver.check(seed + t, f"step {t}:")


class Sequences(nn.Module):
    """A Linear on ``(N, T, D)`` sequences, called twice (weight sharing), then a grouped
    Conv1d with dilation and a strided Conv3d over reflect padding."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.conv = nn.Conv1d(4, 4, 2, dilation=2, groups=2, padding=1)
        self.conv3 = nn.Conv3d(1, 2, (2, 1, 2), stride=(1, 2, 1), padding=1,
                               padding_mode="reflect")
        self.head = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.lin(x)) + torch.tanh(self.lin(x.flip(1)))  # (N, T, 4)
        h = torch.tanh(self.conv(h.transpose(1, 2)))  # (N, 4, T')
        v = self.conv3(h.unsqueeze(1).reshape(h.shape[0], 1, 2, 2, -1))
        return self.head(v.mean(dim=(2, 3, 4)).reshape(h.shape[0], -1)[:, :2])


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("pi", [False, True])
def test_sequences_shared_weights_grouped_and_3d_convolutions(mode, pi):
    torch.manual_seed(3)
    model = Sequences().double()
    driver = Driver(KFAC(mode=mode, pi_damping=pi), model, "categorical")
    gen = torch.Generator().manual_seed(4)
    for t in range(3):
        x = torch.randn(3, 5, 3, dtype=F64, generator=gen)
        y = torch.randint(3, (3,), generator=gen)
        driver.update(x, y, TrueFisher(num_samples=2, per_sample=True), gen, ema=0.8)
        driver.refresh(0.05 * (t + 1))
        driver.check(t, f"step {t}:")
    state = driver.items[2][2]  # conv.weight holds the grouped conv's factors
    assert driver.items[2][0] == "conv.weight" and state["kfac_A"].shape == (2, 5, 5)


@given(problem=problems(kinds=("mlp", "cnn2d"), bias=True), frozen=st.sampled_from(
    ["weight", "bias"]), layer=st.integers(0, 3), mode=st.sampled_from(["expand", "reduce"]),
       lam=dampings(1e-3, 1.0), seed=seeds())
@settings(max_examples=examples(0.1))
def test_a_layer_with_a_frozen_weight_or_bias(problem, frozen, layer, mode, lam, seed):
    layers = [m for m in problem.model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    module = layers[layer % len(layers)]
    getattr(module, frozen).requires_grad_(False)
    driver = Driver(KFAC(mode=mode, pi_damping=True), problem.model, problem.likelihood)
    names = [n for n, _, _ in driver.items]
    assert not any(p is getattr(module, frozen) for _, p, _ in driver.items)
    gen = torch.Generator().manual_seed(seed)
    for t, (x, y) in enumerate(_batches(problem.spec, problem.likelihood, problem.batch_size,
                                        2, problem.seed)):
        driver.update(x, y, TrueFisher(per_sample=True), gen, ema=0.9)
        driver.refresh(lam)
        driver.check(seed, f"step {t} ({frozen} frozen; covered {names}):")
    kept = "bias" if frozen == "weight" else "weight"
    state = next(st_ for _, p, st_ in driver.items if p is getattr(module, kept))
    width = 1 if kept == "bias" else module.weight[0].numel()
    assert state["kfac_A"].shape[-1] == width  # nothing of the frozen one is folded in


# -- where KFAC is exact ---------------------------------------------------------------------------


class OnePosition(nn.Module):
    """A convolution whose kernel covers its whole (padded-free) input: one output position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (2, 3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("empirical", [False, True])
@pytest.mark.parametrize("mode", ["expand", "reduce"])
@given(problem=problems(kinds=("mlp",), sizes=st.just(1)), conv=st.booleans(), seed=seeds())
@settings(max_examples=examples(0.075))
def test_one_sample_at_one_position_is_the_exact_block(empirical, mode, problem, conv, seed):
    """``N = S = 1``, ``T = 1``: ``A = x̄x̄ᵀ``, ``B = zzᵀ``, so ``B ⊗ A = (z ⊗ x̄)(z ⊗ x̄)ᵀ = g gᵀ``,
    the layer's block of the one-sample Fisher at the drawn target (true Fisher source) or of
    the empirical Fisher at the data's target (empirical source: EF-KFAC is exact here too)."""
    model, x, y, lik = problem.model, problem.inputs, problem.targets, problem.likelihood
    if conv:
        torch.manual_seed(seed % 1000)
        model, lik = OnePosition().double(), "categorical"
        x = torch.randn(1, 2, 2, 3, dtype=F64)
        y = torch.randint(2, (1,))
    structure = KFAC(mode=mode)
    items = _items(structure, model)
    source = Empirical() if empirical else TrueFisher(per_sample=True)
    stats = _collect(model, lik, x, y, source, torch.Generator().manual_seed(seed))
    structure.update(items, stats, ema=0.9)
    g = oracles.per_sample_grads(model, lik, x, stats.targets[0])[0]
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    for key, block in structure.curvature_blocks(items).items():
        gk = torch.cat([g[offsets[n][0]:offsets[n][1]] for n in key])
        assert_close(block, torch.outer(gk, gk), atol=1e-14, what=f"B ⊗ A and g gᵀ for {key}")


def test_a_linear_gaussian_model_has_the_exact_fisher_in_expectation():
    """``f = W x + b`` with ``y ~ N(f, I)``: per sample ``g = z ⊗ x̄`` with ``z = f − y = −ε``,
    ``ε ~ N(0, I)``, and the exact Fisher is ``E[x̄x̄ᵀ] ⊗ Λ``-weighted, i.e. ``I ⊗ A`` with
    ``A = (1/N) Σ x̄x̄ᵀ`` (Λ = I). KFAC's ``A`` is exactly that ``A``; its ``B = (1/R) Σ εεᵀ``
    is an unbiased Monte-Carlo estimate of ``E[εεᵀ] = I``. So ``E[B ⊗ A]`` is the exact Fisher.

    Checked in three parts: (1) ``A`` equals ``(1/N) Σ x̄x̄ᵀ`` and the oracle's exact Fisher
    equals ``I ⊗ A`` (both to 1e-10 — the exact claim); (2) ``B`` equals ``(1/R) Σ εεᵀ`` for
    the noise the source drew (1e-10); (3) statistically: with ``R = 40 000`` rows (the inputs
    of 8 points repeated), ``‖B − I‖_F`` has mean about ``√((O² + O)/R) ≈ 0.012`` for ``O = 2``
    (entry variances 2/R on the diagonal, 1/R off it), so the relative error of ``B ⊗ A`` to the
    exact Fisher, ``‖B − I‖_F/√O``, stays below 0.05 (more than 5 standard errors; the seed is
    fixed, so the test is deterministic)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    points = torch.randn(8, 3, dtype=F64)
    x = points.repeat(5000, 1)
    y = torch.zeros(x.shape[0], 2, dtype=F64)  # unused: the targets are sampled
    structure = KFAC()
    items = _items(structure, model)
    stats = _collect(model, "gaussian", x, y, TrueFisher(per_sample=True),
                     torch.Generator().manual_seed(1))
    structure.update(items, stats, ema=0.9)
    state = items[0][2]
    xbar = torch.cat([points, torch.ones(8, 1, dtype=F64)], dim=1)
    a_exact = xbar.T @ xbar / 8
    assert_close(state["kfac_A"][0], a_exact, what="A and (1/N) Σ x̄x̄ᵀ")
    fisher = oracles.exact_fisher(model, "gaussian", points)
    # the oracle's order is [vec W, b]; put I ⊗ A into it
    block = structure.curvature_blocks(items)[("weight", "bias")]
    identity_kron = torch.zeros_like(fisher)
    for o in range(2):
        rows = [*range(o * 3, o * 3 + 3), 6 + o]
        idx = torch.tensor(rows)
        identity_kron[idx.unsqueeze(1), idx.unsqueeze(0)] = a_exact
    assert_close(fisher, identity_kron, what="exact Fisher and I ⊗ A")
    with torch.no_grad():
        eps = stats.targets[0] - model(x)
    assert_close(state["kfac_B"][0], eps.T @ eps / x.shape[0], what="B and (1/R) Σ εεᵀ")
    err = torch.linalg.matrix_norm(block - fisher) / torch.linalg.matrix_norm(fisher)
    assert err < 0.05, f"B ⊗ A is {err:.3g} from the exact Fisher (expected about 0.009)"


# -- state, dtypes, fallbacks, errors -------------------------------------------------------------


def _train(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: tensors only in the state


def _kfac(model, **kw):
    kw = {"lr": 0.1, "damping": 0.1, "stat_every": 2, "inverse_every": 3, **kw}
    return curvlib.assemble(model, "categorical", source=TrueFisher(per_sample=True),
                            structure=KFAC(pi_damping=True),
                            generator=torch.Generator().manual_seed(3), **kw)


@pytest.mark.parametrize("spec", [ModelSpec("mlp", (4,), (5,), 3, seed=4),
                                  ModelSpec("cnn2d", (2, 4, 4), (3,), 3, seed=5)])
def test_state_dict_round_trip_continues_bit_identically(spec):
    model = spec.build()
    opt = _kfac(model)
    batches = _batches(spec, "categorical", 6, 7, seed=5)
    _train(opt, model, batches[:3])
    saved_opt, saved_model = _roundtrip(opt.state_dict()), _roundtrip(model.state_dict())
    fresh = ModelSpec(**{**spec.__dict__, "seed": spec.seed + 100}).build()
    fresh_opt = _kfac(fresh)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    holders = 0
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        holders += "kfac_A" in opt.state[p]
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype, key
    assert holders == sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
    for t, batch in enumerate(batches[3:], start=3):
        _train(opt, model, [batch])
        _train(fresh_opt, fresh, [batch])
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(p, q), f"step {t}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_low_precision_model_keeps_float32_state(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(8, 3).to(dtype), torch.randint(3, (8,))
    opt = _kfac(model, stat_every=1, inverse_every=1)
    _train(opt, model, [(x, y)] * 3)
    fresh = copy.deepcopy(model)
    fresh_opt = _kfac(fresh)
    fresh_opt.load_state_dict(_roundtrip(opt.state_dict()))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for state in (opt.state[p], fresh_opt.state[q]):
            for key in [k for k in state if k.startswith("kfac_") and k != "kfac_updates"]:
                assert state[key].dtype == torch.float32, key
                assert torch.isfinite(state[key]).all(), key
            assert state["momentum_buffer"].dtype == dtype
        assert p.dtype == dtype and torch.isfinite(p).all()


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.lin(x))) * self.scale)


def test_normalisation_and_generic_parameters_fall_back_to_sgd_momentum():
    torch.manual_seed(1)
    model = WithNorm().double()
    structure = KFAC()
    owners = _owners(model)
    covered = {n for n, p in model.named_parameters() if structure.covers(p, owners[n])}
    assert covered == {"lin.weight", "lin.bias", "out.weight", "out.bias"}
    assert not structure.covers(model.lin.weight, None)
    assert not structure.covers(model.lin.weight, model.out)  # not its owner
    opt = curvlib.assemble(model, "categorical", source=TrueFisher(per_sample=True),
                           structure=structure, lr=0.1, damping=0.1)
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(2, (6,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    opt.backward(model(x), y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        if name in covered:
            assert not torch.allclose(p - before[name], -0.1 * grads[name])
        else:  # first step: the momentum is the gradient
            assert_close(p - before[name], -0.1 * grads[name], what=name)


def test_weight_and_bias_in_different_param_groups_is_a_clear_error():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    groups = [{"params": [model[0].weight, model[2].weight, model[2].bias]},
              {"params": [model[0].bias], "lr": 0.01}]
    opt = curvlib.assemble(model, "categorical", source=TrueFisher(per_sample=True),
                           structure="kfac", params=groups)
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(2, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.backward(model(x), y)
    with pytest.raises(ValueError, match=r"weight and bias together.*'0'.*one param group"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):  # nothing was updated
        assert torch.equal(p, b)
        assert not [k for k in opt.state[p] if k.startswith("kfac_") or k == "momentum_buffer"]


class FakeStatistics:
    """Statistics-like object with only ``kfac_factors`` (the public method)."""

    def __init__(self, factors):
        self.factors = factors

    def kfac_factors(self, mode="expand", modules=None):
        return {m: f for m, f in self.factors.items() if modules is None or m in modules}


def _factors(d_in, d_out, value=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, d_in + 1, generator=gen, dtype=F64)
    z = torch.randn(7, d_out, generator=gen, dtype=F64)
    a, b = (x.T @ x / 7).unsqueeze(0), (z.T @ z / 7).unsqueeze(0)
    if value is not None:
        b[0, 0, 0] = value
    return KFACFactors(a, b, True, True, (d_out, d_in))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_leave_that_layer_unchanged(bad):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)).double()
    structure = KFAC()
    items = _items(structure, model)
    structure.update(items, FakeStatistics({"0": _factors(2, 3), "1": _factors(3, 2)}), ema=0.5)
    saved = {n: {k: v.clone() for k, v in st_.items()} for n, _, st_ in items}
    structure.update(items, FakeStatistics({"0": _factors(2, 3, bad, seed=1),
                                            "1": _factors(3, 2, seed=2)}), ema=0.5)
    for key in ("kfac_A", "kfac_B", "kfac_updates"):
        assert torch.equal(items[0][2][key], saved["0.weight"][key]), key
    assert items[0][2]["kfac_skipped"] == 1
    assert items[2][2]["kfac_updates"] == 2  # the other layer moved on
    assert_close(items[2][2]["kfac_A"][0],
                 0.5 * _factors(3, 2).input_cov[0] + 0.5 * _factors(3, 2, seed=2).input_cov[0])


def test_first_update_sets_then_ema_and_average_keeps_the_mean():
    model = nn.Linear(2, 3).double()
    structure = KFAC()
    fs = [_factors(2, 3, seed=s) for s in range(3)]
    items = _items(structure, model)
    for f in fs:
        structure.update(items, FakeStatistics({"": f}), ema=0.7)
    a = fs[0].input_cov
    for f in fs[1:]:
        a = 0.7 * a + 0.3 * f.input_cov
    assert_close(items[0][2]["kfac_A"], a)
    assert "kfac_A" not in items[1][2]  # the weight holds the layer's state
    warm = _items(structure, nn.Linear(2, 3).double())
    for f in fs:
        structure.update(warm, FakeStatistics({"": f}), ema=0.7, average=True)
    assert_close(warm[0][2]["kfac_B"], sum(f.grad_cov for f in fs) / 3)


def test_identity_before_any_statistics_and_options():
    model = nn.Linear(3, 2).double()
    structure = KFAC()
    items = _items(structure, model)
    vectors = [torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)]
    assert all(torch.equal(a, b) for a, b in zip(structure.directions(items, vectors), vectors,
                                                 strict=True))
    assert structure.refresh(items, solver=Cholesky(), damping=_constant(1.0))["factors"] == 0
    assert torch.equal(structure.curvature_blocks(items)[("weight", "bias")],
                       torch.zeros(8, 8, dtype=F64))
    assert structure.solver_powers([p for _, p, _ in items]) == {1.0}
    assert [repr(s) for s in KFAC.examples()] == [
        "KFAC(mode='expand', pi_damping=False)", "KFAC(mode='expand', pi_damping=True)",
        "KFAC(mode='reduce', pi_damping=False)"]
    with pytest.raises(ValueError, match="mode must be 'expand' or 'reduce'"):
        KFAC(mode="sideways")
    with pytest.raises(ValueError, match="ema"):
        structure.update(items, FakeStatistics({}), ema=1.0)
    with pytest.raises(TypeError, match="directions"):
        structure.direction(items[0][1], items[0][2], vectors[0])


def test_pi_damping_splits_the_damping_by_the_trace_ratio():
    """``π = √((tr A/dim A)/(tr B/dim B))``: the damped factors are ``A + π√λ I`` and
    ``B + (√λ/π) I``; with a zero ``B``, ``π = 1``."""
    model = nn.Linear(2, 3).double()
    f = _factors(2, 3, seed=5)
    for zero_b in (False, True):
        if zero_b:
            f = KFACFactors(f.input_cov, torch.zeros_like(f.grad_cov), True, True, (3, 2))
        structure = KFAC(pi_damping=True)
        items = _items(structure, model)
        structure.update(items, FakeStatistics({"": f}), ema=0.5)
        structure.refresh(items, solver=Eigh(), damping=_constant(0.04))
        a, b = f.input_cov[0], f.grad_cov[0]
        pi = 1.0 if zero_b else math.sqrt((torch.trace(a) / 3) / (torch.trace(b) / 3))
        state = items[0][2]
        assert_close(state["kfac_Ainv"][0], torch.linalg.inv(a + 0.2 * pi * torch.eye(3,
                                                                                     dtype=F64)))
        assert_close(state["kfac_Binv"][0], torch.linalg.inv(b + 0.2 / pi * torch.eye(3,
                                                                                     dtype=F64)))


# -- assembled end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("solver,rtol", [("cholesky", 1e-10), ("eigh", 1e-10),
                                         # the coupled Newton iteration stops at
                                         # ‖A_j − I‖_max < 1e-12: about κ·1e-12 in the inverse
                                         ("newton", 1e-7)])
@pytest.mark.parametrize("spec,lik", [(ModelSpec("mlp", (4,), (5,), 3, seed=1), "categorical"),
                                      (ModelSpec("cnn2d", (2, 4, 4), (3,), 2, seed=2),
                                       "gaussian")])
def test_assembled_optimizer_equals_the_reference_optimizer(solver, rtol, spec, lik):
    model = spec.build()
    hyper = dict(lr=0.1, damping=0.3, momentum=0.8, weight_decay=0.01, ema=0.7,
                 stat_every=2, inverse_every=3)
    source = TrueFisher(per_sample=True)
    opt = curvlib.assemble(model, lik, source=source, structure="kfac", solver=solver,
                           generator=torch.Generator().manual_seed(7), **hyper)
    ref = ReferenceOptimizer(model, lik, source, opt.structure, damping_rule="constant",
                             generator=torch.Generator().manual_seed(7), **hyper)
    for t, (x, y) in enumerate(_batches(spec, lik, 5, 5, seed=11)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(opt, model, [(x, y)])
        change = ref.step(x, y)
        for name, p in model.named_parameters():
            assert_close(p.detach() - before[name], change[name], rtol=rtol,
                         what=f"{solver} step {t}: Δ{name}")


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(2, 3, 4)

    def forward(self, x):
        return self.bil(x[:, :2], x[:, 2:])


@pytest.mark.parametrize("pi", [False, True])
def test_a_plugin_layer_with_factors_is_covered_through_its_plugin(pi):
    """A registered plugin's factors (the Bilinear example plugin, whose own tests check them
    against the definitions) are used as they are: the block is ``KFACFactors.dense()`` and the
    direction the dense solve with the damped factors' Kronecker product."""
    pytest.importorskip("curvlib_bilinear")
    from curvlib.layers import plugin_for

    torch.manual_seed(4)
    model = Pair().double()
    if type(plugin_for(model.bil)).__name__ != "BilinearPlugin":
        pytest.skip("the Bilinear example plugin is not registered")
    structure = KFAC(pi_damping=pi)
    items = _items(structure, model)
    assert [n for n, _, _ in items] == ["bil.weight", "bil.bias"]
    x = torch.randn(6, 5, dtype=F64)
    stats = _collect(model, "gaussian", x, None, TrueFisher(per_sample=True),
                     torch.Generator().manual_seed(0))
    structure.update(items, stats, ema=0.9)
    structure.refresh(items, solver=Cholesky(), damping=_constant(0.09))
    f = stats.kfac_factors()["bil"]
    assert_close(structure.curvature_blocks(items)[("bil.weight", "bil.bias")], f.dense())
    a, b = f.input_cov, f.grad_cov
    pi_value = (math.sqrt((torch.trace(a[0]) / a.shape[-1]) / (torch.trace(b[0]) / b.shape[-1]))
                if pi else 1.0)
    damped = KFACFactors(a + 0.3 * pi_value * torch.eye(a.shape[-1], dtype=F64),
                         b + 0.3 / pi_value * torch.eye(b.shape[-1], dtype=F64),
                         True, True, f.weight_shape).dense()
    vectors = [torch.randn(p.shape, dtype=F64) for _, p, _ in items]
    flat = torch.linalg.solve(damped, torch.cat([v.reshape(-1) for v in vectors]))
    got = structure.directions(items, vectors)
    assert_close(torch.cat([d.reshape(-1) for d in got]), flat)
