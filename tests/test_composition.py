"""The composition matrix: every registered source × structure × solver × damping rule, checked.

The components come from walking the registry (``curvlib.registry.registrations``), each
source, structure and solver contributing the configurations it lists in ``examples()``, and
every registered damping rule — no hand-kept list, so a newly registered component joins the
matrix on its own (and fails it until it has a dense reference in
:mod:`curvlib.testing.reference`: a reference structure, or a damping rule's reference).

* A compatible triple is assembled with each damping rule on a drawn float64 model — an MLP
  or Conv1d network, and, in a cell of its own, a tiny Conv2d network — with **two param
  groups** whose hyperparameters all differ (``lr``, ``damping``, ``momentum``,
  ``weight_decay``, ``ema`` and the schedule ``(stat_every, inverse_every)``, drawn from
  ``(1, 1), (1, 2), (2, 1), (3, 2)``: stale inverses and refreshes without new statistics),
  and takes four steps; after each one its parameters and its step equal those of
  :class:`ReferenceOptimizer` around the structure's reference — the dense formula the
  structure claims, restated from the definitions with statistics from the oracles and the
  damping rule restated from its definition, applied per group (1e-10 relative; 1e-7 with
  the ``newton`` solver, whose coupled iteration stops at ‖A_j − I‖_max < 1e-12 and so
  leaves an error of about κ·1e-12 in the inverse, κ the damped block's condition number).
  Groups follow the blocks: a block spanning a layer's weight and bias (``kfac``, ``dense``
  with layer blocks) sits in one group, and a batch structure's block (``smw``) is kept in
  one group when the model has other blocks to give the second group (else its groups share
  ``damping``, the one value a block can have).
* An incompatible triple raises :class:`CompatibilityError` at construction, with a message
  naming what is missing and what would provide it.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.registry import registrations
from curvlib.testing.reference import check_steps, damping_reference, reference_for
from curvlib.testing.strategies import (
    BUILTIN_LIKELIHOODS,
    Problem,
    examples,
    make_targets,
    model_specs,
    seeds,
)

F64 = torch.float64
STEPS = 4
#: two values per hyperparameter: group 0 takes one, group 1 the other
PAIRS = {"lr": (0.1, 0.05), "damping": (0.1, 1.0), "momentum": (0.0, 0.9),
         "weight_decay": (0.0, 0.1), "ema": (0.5, 0.9)}
#: ``damping`` pairs of rules relative to the matrix (``α`` of ``λ = α‖A‖_F``): their steps scale
#: as ``1/‖g‖`` (the damped block is ``∝ ‖g‖²``), and a smaller ``α`` throws the tiny networks
#: into saturation within a step, where float64 gradients keep few digits
RELATIVE_DAMPING = {"frobenius": (1.0, 10.0)}
#: (stat_every, inverse_every): every step; stale inverses; refreshes without new statistics;
#: both (statistics at 0, 3; inverses at 0, 2 — stale at 3)
SCHEDULES = ((1, 1), (1, 2), (2, 1), (3, 2))


def _examples(kind: str) -> list[tuple[str, object]]:
    out = []
    for reg in registrations(kind):
        for i, example in enumerate(reg.obj.examples()):
            out.append((f"{reg.name}{i}", example))
    return out


SOURCES = _examples("source")
STRUCTURES = _examples("structure")
SOLVERS = _examples("solver")
DAMPINGS = [reg.name for reg in registrations("damping")]
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


COMPATIBLE = [t for t in TRIPLES if _compatible(t[0][1], t[1][1], t[2][1])]


def test_the_matrix_walks_every_registered_component():
    for kind, found in (("source", SOURCES), ("structure", STRUCTURES), ("solver", SOLVERS)):
        names = {reg.name for reg in registrations(kind)}
        assert names <= {n.rstrip("0123456789") for n, _ in found}
    # the issue's baselines and the founding methods' parts are all in it
    assert {"kfac", "shampoo", "diagonal", "dense", "tensor_normal", "smw",
            "coefficient_sharing"} <= {reg.name for reg in registrations("structure")}
    assert {"constant", "frobenius"} <= set(DAMPINGS)
    for rule in DAMPINGS:  # every damping rule has a reference restating its definition
        damping_reference(rule)
    for _, structure in STRUCTURES:  # every structure has a reference to be checked against
        reference_for(structure.name)
        compatible = [t for t in COMPATIBLE if t[1][1] is structure]
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
    # a parameterised module without a fast plugin: fallbacks and generic paths. Not over one
    # or two features: over one the normalised output is identically zero (torch's backward
    # leaves ~1e-14 where the exact gradient is 0); over two it is ±d/√(d² + ε), d half the
    # features' difference, whose derivative ε/(d² + ε)^{3/2} torch's backward forms as a
    # difference of near-equal terms, keeping about u·d²/ε relative accuracy (seen: 2e-9 in a
    # step) — a property of the float64 gradient, not of the structure under test
    if norm and problem.spec.out_features >= 3:
        return nn.Sequential(*problem.model, nn.LayerNorm(problem.spec.out_features)).to(F64)
    return problem.model


@st.composite
def matrix_problems(draw, kinds: tuple[str, ...]) -> Problem:
    """A problem of one of ``kinds``, with at least two layers (so that two param groups
    can each hold a whole layer); Conv2d networks have one small convolution."""
    likelihood = draw(st.sampled_from(BUILTIN_LIKELIHOODS))
    min_out = 2 if likelihood == "categorical" else 1
    depth = 1 if kinds == ("cnn2d",) else 2
    spec = draw(model_specs(kinds=kinds, min_out=min_out, spatial_output=False,
                            max_depth=depth).filter(lambda s: s.kind != "mlp" or s.widths))
    return Problem.make(spec, likelihood, draw(st.integers(1, 4)), draw(seeds()))


def _units(names: list[str], blocks: list[tuple[str, ...]]) -> list[list[str]]:
    """``names`` (model order) in the fewest sets that keep every block whole."""
    unit_of = {n: i for i, n in enumerate(names)}
    for block in blocks:  # merge the units the block touches
        target = unit_of[block[0]]
        old = {unit_of[n] for n in block}
        for n, u in unit_of.items():
            if u in old:
                unit_of[n] = target
    out: dict[int, list[str]] = {}
    for n in names:
        out.setdefault(unit_of[n], []).append(n)
    return list(out.values())


def _param_groups(model, structure, rule: str, split: int, flips: dict[str, bool], schedules):
    """Two param groups (parameter dicts for the optimizer) that keep the structure's blocks
    whole, with every hyperparameter different, and their names."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    probe = reference_for(structure.name)(structure, model, names)
    hard, soft = probe.together(), probe.shared_damping()
    units = _units(names, hard + soft)
    if len(units) < 2:  # one block spans the model: split it, with one damping
        units = _units(names, hard)
    assert len(units) >= 2, f"{structure!r} leaves one unit of {names}"
    rng = random.Random(split)
    side = [rng.random() < 0.5 for _ in units]
    if all(side):
        side[rng.randrange(len(units))] = False
    elif not any(side):
        side[rng.randrange(len(units))] = True
    members = [[n for u, s in zip(units, side, strict=True) if s == g for n in u]
               for g in (False, True)]
    members = [sorted(m, key=names.index) for m in members]
    hyper = [{}, {}]
    for key, pair in {**PAIRS, "damping": RELATIVE_DAMPING.get(rule, PAIRS["damping"])}.items():
        first = int(flips[key])
        hyper[0][key], hyper[1][key] = pair[first], pair[1 - first]
    spans = [b for b in soft if {n in members[0] for n in b} == {True, False}]
    if spans:  # a block across the groups has one damping
        hyper[1]["damping"] = hyper[0]["damping"]
    for g, (t1, t2) in enumerate(schedules):
        hyper[g].update(stat_every=t1, inverse_every=t2)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in m], **h} for m, h in zip(members, hyper, strict=True)]


_DRAWS = dict(norm=st.booleans(), split=seeds(),
              flips=st.fixed_dictionaries({k: st.booleans() for k in PAIRS}),
              schedules=st.permutations(SCHEDULES).map(lambda s: s[:2]))
#: the model cells: MLP or Conv1d networks, and a tiny Conv2d network
KINDS = {"mlp|cnn1d": ("mlp", "cnn1d"), "cnn2d": ("cnn2d",)}
_PROBLEMS = {name: matrix_problems(kinds) for name, kinds in KINDS.items()}


def _cells() -> list[tuple[tuple, str, str]]:
    """Every compatible triple once, with a damping rule and a model cell: each structure
    configuration's triples cycle through every (rule, model cell) pair, so that every
    structure meets every rule on both model cells, and every triple is run."""
    combos = [(rule, kind) for kind in KINDS for rule in DAMPINGS]
    out, seen = [], {}
    for triple in COMPATIBLE:
        j = seen[triple[1][0]] = seen.get(triple[1][0], -1) + 1
        out.append((triple, *combos[j % len(combos)]))
    return out


CELLS = _cells()


def test_every_structure_meets_every_rule_on_every_model_cell():
    for name, _ in STRUCTURES:
        met = {(rule, kind) for triple, rule, kind in CELLS if triple[1][0] == name}
        assert met == {(r, k) for r in DAMPINGS for k in KINDS}, name


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{_id(c[0])}-{c[1]}-{c[2]}")
@given(data=st.data(), **_DRAWS)
# × ~150 cells; each example is four steps with oracle gradients: 2 under ci, 1 under dev,
# 10 under long
@settings(max_examples=examples(0.01))
def test_two_groups_equal_the_dense_reference(cell, data, norm, split, flips, schedules):
    (triple, rule, kind) = cell
    (_, source), (_, structure), (_, solver) = triple
    problem = data.draw(_PROBLEMS[kind], label="problem")
    # a dead ReLU layer has exactly zero statistics, which a rule relative to the matrix
    # damps by 0: a singular system, the solvers' recovery policy's case (tests/test_solvers)
    assume(rule == "constant" or problem.spec.activation != "relu")
    model = _model(problem, norm)
    seed = problem.seed
    groups = _param_groups(model, structure, rule, split, flips, schedules)
    opt = curvlib.assemble(model, problem.likelihood, source=copy.deepcopy(source),
                           structure=copy.deepcopy(structure), solver=copy.deepcopy(solver),
                           damping_rule=rule, params=groups,
                           generator=torch.Generator().manual_seed(seed))
    first, second = opt.param_groups
    assert all(first[k] != second[k] for k in PAIRS if k != "damping")
    assert (first["stat_every"], first["inverse_every"]) != \
        (second["stat_every"], second["inverse_every"])
    gen = torch.Generator().manual_seed(seed + 7)
    batches = [(torch.randn(problem.batch_size, *problem.spec.in_shape, generator=gen,
                            dtype=F64),
                make_targets(problem.likelihood, problem.spec.output_shape(),
                             problem.batch_size, seed + 11 + t)) for t in range(STEPS)]
    if solver.name == "newton":
        check_steps(opt, model, problem.likelihood, batches, rtol=1e-7, step_rtol=1e-6)
    else:  # the step to 1e-10 too, beyond the round-off of the θ it is measured from
        check_steps(opt, model, problem.likelihood, batches, step_rtol=1e-10, step_atol=None)


def test_generic_module_moved_before_a_later_groups_update():
    """A LayerNorm in a first group that is not due at step 1 moves; the second group is due,
    and its per-sample statistics (of every layer) re-run the LayerNorm: they must see the
    weight and bias of the forward, not the moved ones (step() forms every group's
    statistics before it moves any parameter)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4)).to(F64)
    groups = [{"params": list(model[2].parameters()), "stat_every": 2},
              {"params": list(model[0].parameters()), "stat_every": 1}]
    opt = curvlib.assemble(model, "gaussian", source="empirical",
                           structure=curvlib.structures.Diagonal(statistics="per_sample"),
                           params=groups, lr=0.1, damping=0.1,
                           generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 4, dtype=F64)
    check_steps(opt, model, "gaussian", [(x, y), (x, y)])
