"""Oracles and likelihoods follow the data's device (CUDA runs only where a GPU exists)."""

import pytest
import torch

from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import ModelSpec, Problem


@pytest.mark.cuda
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_oracles_on_cuda_match_cpu(likelihood):
    p = Problem.make(ModelSpec("cnn1d", (2, 5), (3,), 3, "tanh", seed=0), likelihood, 4, 1)
    cuda = torch.device("cuda")
    model, x, y = p.model.to(cuda), p.inputs.to(cuda), p.targets.to(cuda)
    for fn, args in ((oracles.exact_fisher, (x,)), (oracles.empirical_fisher, (x, y)),
                     (oracles.gram, (x, y))):
        got = fn(model, likelihood, *args)
        assert got.device.type == "cuda"
        assert_close(got.cpu(), fn(p.model.cpu(), likelihood, *(a.cpu() for a in args)),
                     rtol=1e-10)
        model.to(cuda)
    gen = torch.Generator(device=cuda).manual_seed(0)
    assert oracles.mc_fisher(model, likelihood, x, 2, gen).device.type == "cuda"
