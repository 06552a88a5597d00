"""TNT's per-sample mode statistics (an option beyond the paper) against materialised ones."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.capture import Capture
from curvlib.layers.base import per_sample_mode_statistics
from curvlib.likelihoods import as_likelihood
from curvlib.optim import CompatibilityError
from curvlib.sources import TrueFisher
from curvlib.structures import TensorNormal
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import examples, problems, seeds


def _stats(problem, seed, num_samples=1):
    lik = as_likelihood(problem.likelihood)
    with Capture(problem.model) as cap:
        out = problem.model(problem.inputs)
        return TrueFisher(num_samples=num_samples, per_sample=True).collect(
            problem.model, lik, out, None, capture=cap,
            generator=torch.Generator().manual_seed(seed))


# each example runs the float64 per-sample oracle once per draw
@settings(max_examples=examples(0.3))
@given(problem=problems(), seed=seeds(), num_samples=st.integers(1, 2))
def test_mode_statistics_equal_the_materialised_oracle(problem, seed, num_samples):
    """Linear's rank-one fast path and the generic path equal (1/R) Σ mat_i(g) mat_i(g)ᵀ of
    the oracle's sampled per-sample gradients, for every parameter (conv weights reshaped)."""
    stats = _stats(problem, seed, num_samples)
    structure = TensorNormal()
    dims = {n: structure.dims(p.shape) for n, p in problem.model.named_parameters()}
    got = stats.mode_statistics(dims)
    rows = torch.cat([oracles.per_sample_grads(problem.model, problem.likelihood,
                                               problem.inputs, y) for y in stats.targets])
    start = 0
    for name, p in problem.model.named_parameters():
        g = rows[:, start:start + p.numel()].reshape(rows.shape[0], *dims[name])
        start += p.numel()
        for i, (a, b) in enumerate(zip(got[name], per_sample_mode_statistics(g), strict=True)):
            assert_close(a, b, what=f"mode {i} of {name}")


def test_per_sample_statistics_are_scaled_like_the_batch_statistic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    opt = curvlib.assemble(model, "categorical", source=TrueFisher(per_sample=True),
                           structure=TensorNormal(statistics="per_sample"), lr=0.0,
                           damping=1.0, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss = opt.backward(model(x), torch.zeros(8, dtype=torch.long))
    assert torch.isfinite(loss)
    (stats,) = opt._pending  # one micro-batch
    opt.step()
    dims = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = stats.mode_statistics(dims)
    for name, p in model.named_parameters():
        state = opt.state[p]
        for i, mat in enumerate(expected[name]):
            assert_close(state[f"tnt_H{i}"], mat / 8)  # first update: H = S/N


def test_per_sample_statistics_need_per_sample_gradients():
    model = nn.Linear(2, 2)
    with pytest.raises(CompatibilityError,
                       match=r"needs \['per_sample_grads'\].*would: .*empirical"):
        curvlib.assemble(model, "gaussian", source="true_fisher",
                         structure=TensorNormal(statistics="per_sample"))
    with pytest.raises(ValueError, match="statistics must be"):
        TensorNormal(statistics="sampled")


def test_unfactored_modes_are_not_computed():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    lik = as_likelihood("gaussian")
    with Capture(model) as cap:
        out = model(x)
        stats = TrueFisher(per_sample=True).collect(
            model, lik, out, None, capture=cap, generator=torch.Generator().manual_seed(0))
    dims = {n: tuple(p.shape) for n, p in model.named_parameters()}
    got = stats.mode_statistics(dims, {"0.weight": [0], "0.bias": [], "2.weight": [0, 1]})
    assert got["0.weight"][1] is None and got["0.weight"][0].shape == (2, 2)
    assert got["0.bias"] == [None]
    assert all(m is not None for m in got["2.weight"])
    opt = curvlib.assemble(model, "gaussian", source=TrueFisher(per_sample=True),
                           structure=TensorNormal(statistics="per_sample", max_dim=3),
                           lr=0.1, damping=1.0)
    opt.zero_grad()
    opt.backward(model(x), torch.zeros(4, 2, dtype=torch.float64))
    opt.step()
    state = opt.state[model[0].weight]
    assert "tnt_H1" not in state and state["tnt_H0"].abs().sum() > 0
