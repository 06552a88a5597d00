"""Sources and the public helpers against the dense float64 oracles."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.capture import Capture
from curvlib.layers import LayerPluginError, SampleInteractionError
from curvlib.likelihoods import as_likelihood
from curvlib.sources import (
    Empirical,
    GramSource,
    SourceError,
    Statistics,
    TrueFisher,
    as_source,
)
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import examples, problems, seeds


def _flat(grads: dict, rows: int) -> torch.Tensor:
    return torch.cat([g.reshape(rows, -1) for g in grads.values()], 1)


def _blockdiag_gram(grams: dict) -> torch.Tensor:
    return sum(grams.values())


def _sampled_targets(model, likelihood, inputs, num_samples, seed):
    """The draws a sampling source makes: S calls of ``sample`` on the model's outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outputs = model(inputs)
    lik = as_likelihood(likelihood)
    return [lik.sample(outputs, generator=gen) for _ in range(num_samples)]


# -- empirical and gram with data targets --------------------------------------------------


@given(problem=problems())
def test_empirical_per_sample_grads_equal_the_oracle(problem):
    grads = curvlib.per_sample_grads(problem.model, problem.likelihood, problem.inputs,
                                     problem.targets)
    names = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    assert list(grads) == names
    for name, p in problem.model.named_parameters():
        assert grads[name].shape == (problem.batch_size, *p.shape)
    expected = oracles.per_sample_grads(problem.model, problem.likelihood, problem.inputs,
                                        problem.targets)
    assert_close(_flat(grads, problem.batch_size), expected)


@given(problem=problems())
def test_gram_equals_the_oracle_per_parameter(problem):
    grams = curvlib.gram(problem.model, problem.likelihood, problem.inputs, problem.targets)
    g = oracles.per_sample_grads(problem.model, problem.likelihood, problem.inputs,
                                 problem.targets)
    start = 0
    for name, p in problem.model.named_parameters():
        block = g[:, start:start + p.numel()]
        start += p.numel()
        assert_close(grams[name], block @ block.T, what=f"Gram of {name}")
    assert_close(_blockdiag_gram(grams),
                 oracles.gram(problem.model, problem.likelihood, problem.inputs,
                              problem.targets))


@given(problem=problems(), seed=seeds())
def test_weighted_and_batch_grads_equal_the_oracle(problem, seed):
    lik = as_likelihood(problem.likelihood)
    with Capture(problem.model) as cap:
        outputs = problem.model(problem.inputs)
        stats = Empirical().collect(problem.model, lik, outputs, problem.targets, capture=cap)
    g = oracles.per_sample_grads(problem.model, lik, problem.inputs, problem.targets)
    c = torch.randn(problem.batch_size, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    weighted = stats.weighted_grads(c)
    assert_close(torch.cat([w.reshape(-1) for w in weighted.values()]), c @ g)
    batch = stats.batch_grads()
    assert_close(torch.cat([b.reshape(1, -1) for b in batch.values()], 1)[0], g.mean(0))
    assert_close(stats.loss, lik.mean_loss(outputs.detach(), problem.targets))
    assert stats.rows == problem.batch_size and not stats.sampled


# -- sampled targets ----------------------------------------------------------------------------


# The sampled-target properties run the float64 oracle once per draw (S up to 3) and the MC
# oracle again; 0.3 of the profile's count (60 under ci) keeps the file near a minute under
# the ci profile while still covering every model kind, likelihood and S.
SAMPLED = settings(max_examples=examples(0.3))


@SAMPLED
@given(problem=problems(), seed=seeds(), num_samples=st.integers(1, 3))
def test_true_fisher_per_sample_rows_equal_the_mc_oracle(problem, seed, num_samples):
    """Same generator → the rows are the oracle's sampled gradients, draw-major, and their
    second moment is the oracle's MC Fisher."""
    source = TrueFisher(num_samples=num_samples, per_sample=True)
    gen = torch.Generator().manual_seed(seed)
    grads = curvlib.per_sample_grads(problem.model, problem.likelihood, problem.inputs,
                                     source=source, generator=gen)
    rows = num_samples * problem.batch_size
    u = _flat(grads, rows)
    draws = _sampled_targets(problem.model, problem.likelihood, problem.inputs, num_samples,
                             seed)
    expected = torch.cat([oracles.per_sample_grads(problem.model, problem.likelihood,
                                                   problem.inputs, y) for y in draws])
    assert_close(u, expected)
    mc = oracles.mc_fisher(problem.model, problem.likelihood, problem.inputs, num_samples,
                           generator=torch.Generator().manual_seed(seed))
    assert_close(u.T @ u / rows, mc)


@SAMPLED
@given(problem=problems(), seed=seeds(), num_samples=st.integers(1, 3))
def test_true_fisher_batch_mode_gives_each_draws_mean_gradient(problem, seed, num_samples):
    lik = as_likelihood(problem.likelihood)
    outputs = problem.model(problem.inputs)
    stats = TrueFisher(num_samples=num_samples).collect(
        problem.model, lik, outputs, None, generator=torch.Generator().manual_seed(seed))
    assert stats.provides == frozenset({"batch_grads"}) and stats.sampled
    batch = stats.batch_grads()
    draws = _sampled_targets(problem.model, lik, problem.inputs, num_samples, seed)
    for s, y in enumerate(draws):
        got = torch.cat([b[s].reshape(-1) for b in batch.values()])
        assert_close(got, oracles.gradient(problem.model, lik, problem.inputs, y))
    assert all(p.grad is None for p in problem.model.parameters())
    with pytest.raises(SourceError, match=r"does not provide 'gram'.*per_sample=True"):
        stats.gram()


@SAMPLED
@given(problem=problems(), seed=seeds(), num_samples=st.integers(1, 2))
def test_gram_source_with_sampled_targets(problem, seed, num_samples):
    source = GramSource(targets="sampled", num_samples=num_samples)
    grams = curvlib.gram(problem.model, problem.likelihood, problem.inputs, source=source,
                         generator=torch.Generator().manual_seed(seed))
    draws = _sampled_targets(problem.model, problem.likelihood, problem.inputs, num_samples,
                             seed)
    u = torch.cat([oracles.per_sample_grads(problem.model, problem.likelihood,
                                            problem.inputs, y) for y in draws])
    assert_close(_blockdiag_gram(grams), u @ u.T)


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    state = torch.random.get_rng_state()
    a = curvlib.gram(model, "categorical", x, source="true_fisher",
                     generator=torch.Generator().manual_seed(7))
    b = curvlib.gram(model, "categorical", x, source="true_fisher",
                     generator=torch.Generator().manual_seed(7))
    c = curvlib.gram(model, "categorical", x, source="true_fisher",
                     generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)


# -- models beyond Sequential MLPs and CNNs ------------------------------------------------------


class _Tied(nn.Module):
    """One weight owned by two modules (tied layers), and one Linear called twice."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.mid = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3, bias=False)
        self.dec.weight = self.enc.weight  # the same Parameter object in two modules

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))  # weight sharing: two calls
        return self.dec(h)


class _Mixed(nn.Module):
    """Generic-path modules next to registered ones, a sequence dimension and a norm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.seq = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, tokens):
        h = self.norm(torch.tanh(self.seq(self.emb(tokens))))  # (N, T, 4)
        return self.out(self.bn(h.mean(1)))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_tied_weights_and_repeated_calls_equal_the_oracle(likelihood):
    torch.manual_seed(3)
    model = _Tied().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    from curvlib.testing.strategies import make_targets

    y = make_targets(likelihood, (3,), 5, 4)
    grads = curvlib.per_sample_grads(model, likelihood, x, y)
    names = [n for n, _ in model.named_parameters()]
    assert list(grads) == names  # the tied weight appears once, under its first name
    expected = oracles.per_sample_grads(model, likelihood, x, y)
    assert_close(_flat(grads, 5), expected)
    assert_close(_blockdiag_gram(curvlib.gram(model, likelihood, x, y)),
                 oracles.gram(model, likelihood, x, y))


def test_generic_modules_in_a_model_equal_the_oracle():
    torch.manual_seed(4)
    model = _Mixed().double()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    model.bn.eval()
    tokens = torch.randint(7, (6, 5))
    y = torch.randint(2, (6,))
    grads = curvlib.per_sample_grads(model, "categorical", tokens, y)
    assert_close(_flat(grads, 6), oracles.per_sample_grads(model, "categorical", tokens, y))
    assert_close(_blockdiag_gram(curvlib.gram(model, "categorical", tokens, y)),
                 oracles.gram(model, "categorical", tokens, y))
    model.bn.train()
    with pytest.raises(SampleInteractionError, match=r"BatchNorm1d.*training mode"):
        curvlib.gram(model, "categorical", tokens, y)


def test_a_module_not_called_gets_zero_rows():
    torch.manual_seed(5)
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)}).double()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["used"](x)

    wrapper = Wrapper()
    x = torch.randn(3, 2, dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64)
    grads = curvlib.per_sample_grads(wrapper, "gaussian", x, y)
    assert torch.count_nonzero(grads["inner.unused.weight"]) == 0
    assert grads["inner.unused.weight"].shape == (3, 2, 2)
    assert_close(_flat(grads, 3), oracles.per_sample_grads(wrapper, "gaussian", x, y))


def test_helpers_leave_the_model_untouched():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    before = {id(m): set(vars(m)) for m in model.modules()}
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(2, (4,))
    curvlib.per_sample_grads(model, "categorical", x, y)
    curvlib.gram(model, "categorical", x, source="true_fisher",
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the helpers need gradients and turn them on themselves
        assert set(curvlib.gram(model, "categorical", x, y)) == {n for n, _ in
                                                                  model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert {id(m): set(vars(m)) for m in model.modules()} == before


# -- statistics, registry and errors -------------------------------------------------------------


def test_sources_are_registered_and_declare_what_they_provide():
    sources = curvlib.available("source")["source"]
    assert {"true_fisher", "empirical", "gram"} <= set(sources)
    assert as_source("empirical").provides >= {"per_sample_grads", "gram", "kfac_factors"}
    assert as_source("gram").provides == {"gram", "weighted_grads", "row_dots",
                                          "per_sample_grads"}
    assert as_source("true_fisher").provides == {"batch_grads"}
    assert "kfac_factors" in TrueFisher(per_sample=True).provides
    assert as_source("true_fisher", num_samples=3).num_samples == 3
    source = Empirical()
    assert as_source(source) is source
    with pytest.raises(TypeError, match="options"):
        as_source(source, num_samples=2)
    with pytest.raises(TypeError, match="not a curvlib source"):
        as_source(int)
    with pytest.raises(ValueError, match="num_samples"):
        TrueFisher(num_samples=0)
    with pytest.raises(ValueError, match="targets must be"):
        GramSource(targets="model")
    with pytest.raises(ValueError, match="sampled targets"):
        GramSource(targets="data", num_samples=2)


def test_helper_errors_name_the_fix():
    model = nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(SourceError, match=r"no.*targets.*true_fisher"):
        curvlib.per_sample_grads(model, "gaussian", x)
    with pytest.raises(SourceError, match=r"does not provide 'per_sample_grads'"):
        curvlib.per_sample_grads(model, "gaussian", x, source=TrueFisher())
    with pytest.raises(ValueError, match="backend"):
        curvlib.gram(model, "gaussian", x, x, backend="jax")
    with Capture(model) as cap:
        out = model(x)
        stats = Empirical().collect(model, as_likelihood("gaussian"), out, x, capture=cap)
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3,\)"):
        stats.weighted_grads(torch.ones(2, dtype=torch.float64))
    # without a capture the statistics hold batch gradients only, and say what else needs one
    batch_only = Empirical().collect(model, as_likelihood("gaussian"), model(x), x)
    assert batch_only.provides == {"batch_grads"}
    with pytest.raises(SourceError, match="does not provide 'per_sample_grads'"):
        batch_only.per_sample_grads()


def test_statistics_kfac_factors_by_module_name():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).double()
    x, y = torch.randn(4, 2, 4, dtype=torch.float64), torch.randint(2, (4,))
    with Capture(model) as cap:
        out = model(x)
        stats = Empirical().collect(model, as_likelihood("categorical"), out, y, capture=cap)
    assert isinstance(stats, Statistics)
    factors = stats.kfac_factors()
    assert list(factors) == ["0", "3"]
    assert factors["3"].input_cov.shape == (1, 10, 10)
    assert factors["0"].grad_cov.shape == (1, 3, 3)
    only = stats.kfac_factors(modules={"3"})
    assert list(only) == ["3"]
    assert torch.equal(only["3"].input_cov, factors["3"].input_cov)


def test_kfac_factors_of_chosen_modules_skip_layers_without_factors():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(2, (5,))
    with Capture(model) as cap:
        out = model(x)
        stats = Empirical().collect(model, as_likelihood("categorical"), out, y, capture=cap)
    with pytest.raises(LayerPluginError, match="LayerNorm"):
        stats.kfac_factors()
    assert list(stats.kfac_factors(modules=["0", "2"])) == ["0", "2"]


def test_a_parameter_used_outside_its_module_is_caught():
    class TiedOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 4, bias=False)

        def forward(self, x):
            return torch.tanh(self.emb(x)) @ self.emb.weight  # functional second use

    torch.manual_seed(8)
    model = TiedOutput().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(SourceError, match=r"'emb.weight' do not add up.*Wrap that use"):
        curvlib.per_sample_grads(model, "gaussian", x, y)
    with pytest.raises(SourceError, match="verify=False"):
        curvlib.gram(model, "gaussian", x, source="true_fisher",
                     generator=torch.Generator().manual_seed(0))
    # verify=False skips the check (and the result misses the functional use)
    grads = curvlib.per_sample_grads(model, "gaussian", x, y, verify=False)
    reference = oracles.per_sample_grads(model, "gaussian", x, y)
    assert (grads["emb.weight"].reshape(5, -1) - reference).norm() > 1e-3


def test_statistics_keep_the_targets_of_each_draw():
    torch.manual_seed(9)
    model = nn.Linear(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    lik = as_likelihood("categorical")
    with Capture(model) as cap:
        out = model(x)
        stats = TrueFisher(num_samples=3, per_sample=True).collect(
            model, lik, out, None, capture=cap, generator=torch.Generator().manual_seed(2))
    expected = _sampled_targets(model, lik, x, 3, 2)
    assert len(stats.targets) == 3
    for got, want in zip(stats.targets, expected, strict=True):
        assert torch.equal(got, want)
