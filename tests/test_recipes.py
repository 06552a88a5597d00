"""The baseline recipes: each picks the components it documents, and its steps equal the dense
reference of that assembly (float64, :mod:`curvlib.testing.reference`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.sources import Empirical, GramSource, TrueFisher
from curvlib.structures import KFAC, SMW, Shampoo, TensorNormal
from curvlib.testing.reference import check_steps
from curvlib.testing.strategies import examples, make_targets, problems

F64 = torch.float64

RECIPES = {
    "KFAC": lambda m, lik, g: curvlib.KFAC(m, lik, lr=0.1, damping=0.3, generator=g),
    "EF-KFAC": lambda m, lik, g: curvlib.KFAC(m, lik, lr=0.1, damping=0.3, empirical=True,
                                             pi_damping=True),
    "Shampoo": lambda m, lik, g: curvlib.Shampoo(m, lik, lr=0.05, damping=0.3),
    "Shampoo-newton-sampled": lambda m, lik, g: curvlib.Shampoo(
        m, lik, lr=0.05, damping=0.3, solver="newton", source="true_fisher", generator=g),
    "EmpiricalTNT": lambda m, lik, g: curvlib.EmpiricalTNT(m, lik, lr=0.1, damping=0.3),
    "NaturalGradient": lambda m, lik, g: curvlib.NaturalGradient(m, lik, lr=0.1, damping=0.5,
                                                                 num_samples=2, generator=g),
}


def test_recipes_pick_their_documented_components():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    kfac = curvlib.KFAC(model, "categorical", lr=0.1, damping=0.1)
    assert isinstance(kfac.source, TrueFisher) and kfac.source.per_sample
    assert isinstance(kfac.structure, KFAC) and kfac.solver.name == "cholesky"
    assert (kfac.param_groups[0]["stat_every"], kfac.param_groups[0]["inverse_every"]) == (1, 20)
    assert kfac.param_groups[0]["ema"] == 0.95
    assert isinstance(curvlib.KFAC(model, "categorical", lr=0.1, damping=0.1,
                                   empirical=True).source, Empirical)
    shampoo = curvlib.Shampoo(model, "categorical", lr=0.1, damping=0.1)
    assert isinstance(shampoo.source, Empirical) and isinstance(shampoo.structure, Shampoo)
    assert shampoo.solver.name == "eigh" and shampoo.structure.reshape == "as_is"
    tnt = curvlib.EmpiricalTNT(model, "categorical", lr=0.1, damping=0.1)
    assert isinstance(tnt.source, Empirical) and isinstance(tnt.structure, TensorNormal)
    ng = curvlib.NaturalGradient(model, "categorical", lr=0.1, damping=0.1, num_samples=3)
    assert isinstance(ng.source, GramSource) and ng.source.targets == "sampled"
    assert ng.source.num_samples == 3 and isinstance(ng.structure, SMW)
    assert type(ng.damping_rule).name == "frobenius"
    conv = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 2))
    for recipe in (curvlib.KFAC, curvlib.Shampoo, curvlib.EmpiricalTNT):
        group = recipe(conv, "categorical", lr=0.1, damping=0.1).param_groups[0]
        assert (group["stat_every"], group["inverse_every"]) == (10, 100)  # TNT's CNN schedule


def test_shampoo_refuses_a_cholesky_solver():
    with pytest.raises(CompatibilityError, match="solvers that do: 'eigh', 'newton'"):
        curvlib.Shampoo(nn.Linear(3, 2), "gaussian", lr=0.1, damping=0.1, solver="cholesky")


@pytest.mark.parametrize("name", list(RECIPES))
@given(problem=problems(kinds=("mlp", "cnn1d"), spatial_output=False, sizes=st.integers(1, 5)),
       steps=st.integers(1, 3))
@settings(max_examples=examples(0.05))  # up to three steps, each with oracle per-sample gradients
def test_recipe_steps_equal_the_dense_reference(name, problem, steps):
    model = problem.model
    opt = RECIPES[name](model, problem.likelihood, torch.Generator().manual_seed(problem.seed))
    gen = torch.Generator().manual_seed(problem.seed + 1)
    batches = [(torch.randn(problem.batch_size, *problem.spec.in_shape, generator=gen,
                            dtype=F64),
                make_targets(problem.likelihood, problem.spec.output_shape(),
                             problem.batch_size, problem.seed + 2 + t)) for t in range(steps)]
    if opt.solver.name == "newton":  # see tests/test_composition.py
        check_steps(opt, model, problem.likelihood, batches, rtol=1e-7, step_rtol=1e-6)
    else:
        check_steps(opt, model, problem.likelihood, batches)
