"""The composition matrix: every registered source × structure × solver, checked.

The triples come from walking the registry (``curvlib.registry.registrations``), each
component contributing the configurations it lists in ``examples()`` — no hand-kept list, so
a newly registered component joins the matrix on its own (and fails it until it has a dense
reference in :mod:`curvlib.testing.reference`).

* A compatible triple is assembled on a drawn float64 model and takes three steps; after each
  one its parameters and its step equal those of :class:`ReferenceOptimizer` around the
  structure's reference — the dense formula the structure claims, restated from the
  definitions with statistics from the oracles (1e-10 relative; 1e-7 with the ``newton``
  solver, whose coupled iteration stops at ‖A_j − I‖_max < 1e-12 and so leaves an error of
  about κ·1e-12 in the inverse, κ the damped block's condition number, up to ~1e4 here).
* An incompatible triple raises :class:`CompatibilityError` at construction, with a message
  naming what is missing and what would provide it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.registry import registrations
from curvlib.testing.reference import check_steps, reference_for
from curvlib.testing.strategies import make_targets, problems

F64 = torch.float64


def _examples(kind: str) -> list[tuple[str, object]]:
    out = []
    for reg in registrations(kind):
        for i, example in enumerate(reg.obj.examples()):
            out.append((f"{reg.name}{i}", example))
    return out


SOURCES = _examples("source")
STRUCTURES = _examples("structure")
SOLVERS = _examples("solver")
TRIPLES = [(a, b, c) for a in SOURCES for b in STRUCTURES for c in SOLVERS]


def _id(triple) -> str:
    return "-".join(name for name, _ in triple)


def _assemble(model, likelihood, source, structure, solver, seed, **hyper):
    return curvlib.assemble(model, likelihood, source=copy.deepcopy(source),
                            structure=copy.deepcopy(structure), solver=copy.deepcopy(solver),
                            generator=torch.Generator().manual_seed(seed), **hyper)


def _compatible(source, structure, solver) -> bool:
    model = nn.Sequential(nn.Linear(3, 2))
    try:
        _assemble(model, "gaussian", source, structure, solver, 0)
    except CompatibilityError:
        return False
    return True


def test_the_matrix_walks_every_registered_component():
    for kind, found in (("source", SOURCES), ("structure", STRUCTURES), ("solver", SOLVERS)):
        names = {reg.name for reg in registrations(kind)}
        assert names <= {n.rstrip("0123456789") for n, _ in found}
    # the issue's baselines and the founding methods' parts are all in it
    assert {"kfac", "shampoo", "diagonal", "dense", "tensor_normal", "smw",
            "coefficient_sharing"} <= {reg.name for reg in registrations("structure")}
    for _, structure in STRUCTURES:  # every structure has a reference to be checked against
        reference_for(structure.name)
        compatible = [t for t in TRIPLES if t[1][1] is structure
                      and _compatible(t[0][1], structure, t[2][1])]
        assert compatible, f"no source and solver can run {structure!r}"


@pytest.mark.parametrize("triple", TRIPLES, ids=_id)
def test_incompatible_triples_raise_a_clear_error(triple):
    (_, source), (_, structure), (_, solver) = triple
    missing = structure.needs - source.provides
    unsupported = [p for p in structure.solver_powers(
        list(nn.Sequential(nn.Linear(3, 2)).parameters())) if not solver.supports(p)]
    try:
        _assemble(nn.Sequential(nn.Linear(3, 2)), "gaussian", source, structure, solver, 0)
    except CompatibilityError as error:
        message = str(error)
        if missing:
            assert all(name in message for name in missing), message
            assert "sources that would" in message
        elif unsupported:
            assert "solvers that do" in message, message
        else:  # a reason beyond the declared needs: the structure names the source
            assert repr(source) in message or source.name in message, message
        return
    assert not missing, f"{structure!r} needs {missing} but was assembled with {source!r}"
    assert not unsupported


def _model(problem, norm: bool) -> nn.Module:
    # a parameterised module without a fast plugin: fallbacks and generic paths (not over a
    # single feature, whose normalised output is identically zero: torch's backward leaves
    # ~1e-14 there where the exact gradient is 0, and a preconditioner magnifies that)
    if norm and problem.spec.out_features >= 2:
        return nn.Sequential(*problem.model, nn.LayerNorm(problem.spec.out_features)).to(F64)
    return problem.model


@pytest.mark.parametrize("triple", [t for t in TRIPLES if _compatible(t[0][1], t[1][1],
                                                                        t[2][1])], ids=_id)
@given(problem=problems(kinds=("mlp", "cnn1d"), spatial_output=False,
                        sizes=st.integers(1, 4)),
       norm=st.booleans(), damping=st.sampled_from([0.1, 1.0]),
       momentum=st.sampled_from([0.0, 0.9]), weight_decay=st.sampled_from([0.0, 0.1]),
       ema=st.sampled_from([0.5, 0.9]), schedule=st.sampled_from([(1, 1), (1, 2), (2, 2)]))
@settings(max_examples=3)  # × ~200 triples; each example is three steps with oracle gradients
def test_three_steps_equal_the_dense_reference(triple, problem, norm, damping, momentum,
                                               weight_decay, ema, schedule):
    (_, source), (_, structure), (_, solver) = triple
    model = _model(problem, norm)
    seed = problem.seed
    hyper = dict(lr=0.1, damping=damping, momentum=momentum, weight_decay=weight_decay,
                 ema=ema, stat_every=schedule[0], inverse_every=schedule[1])
    opt = _assemble(model, problem.likelihood, source, structure, solver, seed, **hyper)
    gen = torch.Generator().manual_seed(seed + 7)
    batches = [(torch.randn(problem.batch_size, *problem.spec.in_shape, generator=gen,
                            dtype=F64),
                make_targets(problem.likelihood, problem.spec.output_shape(),
                             problem.batch_size, seed + 11 + t)) for t in range(3)]
    if solver.name == "newton":
        check_steps(opt, model, problem.likelihood, batches, rtol=1e-7, step_rtol=1e-6)
    else:
        check_steps(opt, model, problem.likelihood, batches)
