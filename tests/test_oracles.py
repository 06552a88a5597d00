"""The dense oracles are right: closed forms, independent autograd loops, GGN, statistics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close, assert_psd, relative_error
from curvlib.testing.strategies import Problem, dampings, problems, seeds, spd_matrices

F64 = torch.float64


def autograd_per_sample_grads(problem):
    """Per-sample gradients by a plain loop of ``torch.autograd.grad`` (no torch.func)."""
    lik = curvlib.as_likelihood(problem.likelihood)
    params = [p for p in problem.model.parameters() if p.requires_grad]
    rows = []
    for n in range(problem.batch_size):
        out = problem.model(problem.inputs[n : n + 1])
        loss = lik.loss(out, problem.targets[n : n + 1]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def autograd_jacobians(problem):
    """Per-sample output Jacobians by ``torch.autograd.functional.jacobian`` (no torch.func)."""
    model = problem.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    out = []
    for n in range(problem.batch_size):
        def f(*theta, n=n):
            return torch.func.functional_call(
                model, dict(zip(names, theta, strict=True)), (problem.inputs[n : n + 1],)
            ).flatten()

        jac = torch.autograd.functional.jacobian(f, values)
        out.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1))
    return torch.stack(out)


@given(problems())
def test_per_sample_grads_and_gradient_match_autograd(problem):
    expected = autograd_per_sample_grads(problem)
    got = oracles.per_sample_grads(problem.model, problem.likelihood, problem.inputs,
                                   problem.targets)
    assert_close(got, expected, rtol=1e-12)
    lik = curvlib.as_likelihood(problem.likelihood)
    mean_loss = lik.mean_loss(problem.model(problem.inputs), problem.targets)
    grads = torch.autograd.grad(mean_loss, list(problem.model.parameters()))
    assert_close(oracles.gradient(problem.model, lik, problem.inputs, problem.targets),
                 torch.cat([g.flatten() for g in grads]), rtol=1e-12)


@given(problems())
def test_exact_fisher_is_jt_lambda_j_and_the_ggn(problem):
    """Exact Fisher from autograd Jacobians and Λ; and = GGN (Hessian of the loss)."""
    m, lik, x, y = problem.model, problem.likelihood, problem.inputs, problem.targets
    fisher = oracles.exact_fisher(m, lik, x)
    jac = autograd_jacobians(problem)
    assert_close(oracles.jacobians(m, x), jac, rtol=1e-12)
    lam = curvlib.as_likelihood(lik).fisher(m(x))
    expected = sum(jac[n].T @ lam[n] @ jac[n] for n in range(len(x))) / len(x)
    assert_close(fisher, expected, rtol=1e-10)
    # canonical pairs: the Fisher equals the GGN of the loss at any targets
    assert_close(oracles.ggn(m, curvlib.as_likelihood(lik).loss, x, y), fisher, rtol=1e-10)
    assert_psd(fisher, what="exact Fisher")


@given(problems(likelihoods=("categorical",), kinds=("mlp", "cnn1d"), spatial_output=False))
def test_categorical_exact_fisher_is_the_expectation_over_classes(problem):
    """For (N, C) outputs: F = (1/N) Σ_n Σ_c p_nc g_nc g_ncᵀ, enumerating every class.

    Spatial outputs (joint targets over positions) are enumerated in test_likelihoods.
    """
    m, x = problem.model, problem.inputs
    out = m(x)
    assert out.dim() == 2
    probs = out.softmax(1)
    expected = 0
    for c in range(out.shape[1]):
        y = torch.full((len(x),), c)
        g = oracles.per_sample_grads(m, "categorical", x, y)
        expected = expected + (probs[:, c, None] * g).T @ g / len(x)
    assert_close(oracles.exact_fisher(m, "categorical", x), expected, rtol=1e-10)


@given(n=st.integers(1, 6), d_in=st.integers(1, 4), d_out=st.integers(1, 4), seed=seeds(),
       bias=st.booleans())
def test_linear_gaussian_closed_form(n, d_in, d_out, seed, bias):
    """nn.Linear (weight (out, in), row-major vec): F_WW = I ⊗ (XᵀX/N), F_Wb = I ⊗ x̄, F_bb = I.

    For a weight stored (in, out) and used as x @ W the same Fisher reads (XᵀX/N) ⊗ I.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=F64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(d_in, d_out, bias=bias).double()
    eye = torch.eye(d_out, dtype=F64)
    second = x.T @ x / n
    expected = torch.kron(eye, second)
    if bias:
        cross = torch.kron(eye, x.mean(0).reshape(-1, 1))  # (out·in, out)
        expected = torch.cat([torch.cat([expected, cross], 1),
                              torch.cat([cross.T, eye], 1)], 0)
    assert_close(oracles.exact_fisher(linear, "gaussian", x), expected, rtol=1e-12)

    class InOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_in, d_out, generator=gen, dtype=F64))

        def forward(self, inp):
            return inp @ self.weight

    assert_close(oracles.exact_fisher(InOut(), "gaussian", x), torch.kron(second, eye),
                 rtol=1e-12)


@given(problems())
def test_empirical_fisher_gram_and_per_sample_grads(problem):
    m, lik, x, y = problem.model, problem.likelihood, problem.inputs, problem.targets
    g = oracles.per_sample_grads(m, lik, x, y)
    ef = oracles.empirical_fisher(m, lik, x, y)
    gram = oracles.gram(m, lik, x, y)
    n = len(x)
    assert ef.shape == (g.shape[1],) * 2 and gram.shape == (n, n)
    assert_close(ef, g.T @ g / n, rtol=1e-12)
    assert_close(gram, g @ g.T, rtol=1e-12)
    # U Uᵀ/N and UᵀU share their nonzero spectrum (times N)
    top = min(n, g.shape[1])
    eig_ef = torch.linalg.eigvalsh(n * ef).flip(0)[:top]
    eig_gram = torch.linalg.eigvalsh(gram).flip(0)[:top]
    assert_close(eig_ef, eig_gram, rtol=1e-9, what="spectra of N·EF and Gram")  # eigvalsh
    assert_psd(ef, what="empirical Fisher")
    assert_psd(gram, what="Gram")


@given(problems(sizes=st.integers(2, 6)), seeds())
def test_invariant_to_permuting_samples(problem, seed):
    m, lik, x, y = problem.model, problem.likelihood, problem.inputs, problem.targets
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    assert_close(oracles.exact_fisher(m, lik, x[perm]), oracles.exact_fisher(m, lik, x),
                 rtol=1e-12)
    assert_close(oracles.empirical_fisher(m, lik, x[perm], y[perm]),
                 oracles.empirical_fisher(m, lik, x, y), rtol=1e-12)
    assert_close(oracles.gram(m, lik, x[perm], y[perm]),
                 oracles.gram(m, lik, x, y)[perm][:, perm], rtol=1e-12)


@given(problems())
def test_ggn_of_a_scaled_loss_scales(problem):
    """The GGN is linear in the loss: ggn(a·ℓ) = a·ggn(ℓ) (here a = 3, any loss)."""
    m, x, y = problem.model, problem.inputs, problem.targets
    loss = curvlib.as_likelihood(problem.likelihood).loss
    assert_close(oracles.ggn(m, lambda f, t: 3 * loss(f, t), x, y),
                 3 * oracles.ggn(m, loss, x, y), rtol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_mc_fisher_converges_to_the_exact_fisher(likelihood):
    """Statistical, fixed seeds. F̂_S is the mean of S i.i.d. single-draw estimates X_s with
    E[X_s] = F, so E‖F̂_S − F‖²_F = σ²/S, σ² = E‖X_s − F‖²_F. We estimate σ² from the draws
    and require ‖F̂_S − F‖_F ≤ 4σ/√S (Markov: a correct oracle fails with probability at most
    1/16, and the seeds are fixed, so the outcome is deterministic). We also require the
    error at S = 400 to be below the error at S = 4 (expected ratio 10)."""
    spec_problem = Problem.make(
        curvlib.testing.strategies.ModelSpec("mlp", (3,), (4,), 3, "tanh", seed=1),
        likelihood, 5, seed=2,
    )
    m, x = spec_problem.model, spec_problem.inputs
    exact = oracles.exact_fisher(m, likelihood, x)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([oracles.mc_fisher(m, likelihood, x, 1, gen) for _ in range(400)])
    mean = draws.mean(0)
    same = oracles.mc_fisher(m, likelihood, x, 400, torch.Generator().manual_seed(3))
    assert_close(same, mean, rtol=1e-12, what="mc_fisher(S) and the mean of S single draws")
    sigma = (draws - exact).pow(2).sum((1, 2)).mean().sqrt()
    err = torch.linalg.matrix_norm(mean - exact)
    assert err <= 4 * sigma / 400**0.5
    assert relative_error(mean, exact) < relative_error(draws[:4].mean(0), exact)
    assert_psd(same, what="MC Fisher")


def test_mc_fisher_is_reproducible_and_validates():
    p = Problem.make(curvlib.testing.strategies.ModelSpec("mlp", (2,), (), 2), "bernoulli", 3, 0)
    a = oracles.mc_fisher(p.model, "bernoulli", p.inputs, 3, torch.Generator().manual_seed(5))
    b = oracles.mc_fisher(p.model, "bernoulli", p.inputs, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least 1"):
        oracles.mc_fisher(p.model, "bernoulli", p.inputs, 0)


@given(problems())
def test_blocks_split_along_parameters(problem):
    m, lik, x = problem.model, problem.likelihood, problem.inputs
    fisher = oracles.exact_fisher(m, lik, x)
    parts = oracles.blocks(fisher, m)
    sizes = [p.numel() for p in m.parameters()]
    assert [b.shape for b in parts] == [(s, s) for s in sizes]
    # rtol=0: exact equality, the blocks are slices of the same matrix
    assert_close(torch.block_diag(*parts).diagonal(), fisher.diagonal(), rtol=0.0)
    with pytest.raises(ValueError, match="does not match"):
        oracles.blocks(torch.zeros(sum(sizes) + 1, sum(sizes) + 1, dtype=F64), m)
    # a block is the Fisher of its parameter alone (the others frozen)
    first = next(m.parameters())
    for p in list(m.parameters())[1:]:
        p.requires_grad_(False)
    assert_close(oracles.exact_fisher(m, lik, x), parts[0], rtol=1e-12)
    assert first.requires_grad


@given(spd_matrices(), dampings(), seeds(), st.sampled_from([None, 1, 3]))
def test_natural_gradient_solves_the_damped_system(matrix, damping, seed, rhs):
    shape = (matrix.shape[0],) if rhs is None else (matrix.shape[0], rhs)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    direction = oracles.natural_gradient(matrix, g, damping)
    assert direction.shape == g.shape
    damped = matrix + damping * torch.eye(matrix.shape[0], dtype=F64)
    # backward-stable solve: residual ≤ c·ε·‖A‖‖x‖, checked relative to ‖A‖‖x‖
    residual = torch.linalg.vector_norm(damped @ direction - g)
    scale = torch.linalg.matrix_norm(damped, 2) * torch.linalg.vector_norm(direction)
    assert residual <= 1e-12 * scale
    with pytest.raises(ValueError, match="non-negative"):
        oracles.natural_gradient(matrix, g, -1.0)


def test_float32_models_are_evaluated_in_float64_and_left_untouched():
    spec = curvlib.testing.strategies.ModelSpec("mlp", (3,), (4,), 3, "gelu", seed=4)
    model32 = spec.build(torch.float32)
    before = [p.detach().clone() for p in model32.parameters()]
    x = torch.randn(4, 3)
    fisher = oracles.exact_fisher(model32, "categorical", x)
    assert fisher.dtype == F64
    model64 = spec.build(torch.float32).double()  # the same float32 values, exactly widened
    assert_close(fisher, oracles.exact_fisher(model64, "categorical", x.double()), rtol=1e-14)
    for p, q in zip(model32.parameters(), before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q)


def test_frozen_parameters_are_left_out():
    spec = curvlib.testing.strategies.ModelSpec("mlp", (3,), (2,), 2, seed=0)
    model = spec.build()
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 3, dtype=F64)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert oracles.exact_fisher(model, "gaussian", x).shape == (p, p)
