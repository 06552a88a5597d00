"""The diagonal (Adam-like) structure against the elementwise formula from its definition.

Notation (docs/diagonal.md): ``s = (1/S) Σ_s G_s²`` over the draws' batch gradients
(``statistics="batch"``) or ``s = (1/R) Σ_r g_r²`` over the per-sample rows
(``"per_sample"``), elementwise; ``v`` their EMA (first update sets); the direction
``m / (v^power + ε)`` with the reciprocal formed at refresh. End to end, the statistics come
from :mod:`curvlib.testing.oracles` through :mod:`curvlib.testing.reference.diagonal`.
"""

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.registry import registrations
from curvlib.solvers import Cholesky
from curvlib.sources import TrueFisher, as_source
from curvlib.structures import Diagonal, as_structure
from curvlib.testing.assertions import assert_close
from curvlib.testing.fakes import (
    GradientStatistics as FakeStatistics,
)
from curvlib.testing.fakes import (
    constant_damping as _constant,
)
from curvlib.testing.fakes import (
    gradient_draws as _draws,
)
from curvlib.testing.fakes import (
    structure_items as _items,
)
from curvlib.testing.reference import check_steps
from curvlib.testing.strategies import (
    ModelSpec,
    dampings,
    examples,
    make_targets,
    seeds,
    tensor_shapes,
)

F64 = torch.float64


@given(shape=tensor_shapes(0, 4, 1, 4), rows=st.integers(1, 6), steps=st.integers(1, 3),
       seed=seeds(), eps=dampings(1e-8, 1e1), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       power=st.sampled_from([0.5, 1.0, 0.25, 2.0]),
       statistics=st.sampled_from(["batch", "per_sample"]),
       ema=st.sampled_from([0.0, 0.5, 0.999]))
@settings(max_examples=examples(0.25))
def test_direction_equals_the_elementwise_formula(shape, rows, steps, seed, eps, scale, power,
                                                  statistics, ema):
    """Float64 at 1e-10: every operation is elementwise, so only a few roundings separate
    the two sides whatever the scale."""
    structure = Diagonal(statistics=statistics, power=power)
    (item,) = items = _items(structure, {"w": shape})
    gs = [_draws(shape, rows, seed + 5 * j, scale) for j in range(steps)]
    for g in gs:
        structure.update(items, FakeStatistics({"w": g}), ema=ema)
    v = (gs[0] ** 2).mean(0)
    for g in gs[1:]:
        v = ema * v + (1 - ema) * (g ** 2).mean(0)
    assert_close(item[2]["diag_v"], v, what="v, the EMA of the mean squared gradients")
    report = structure.refresh(items, solver=None, damping=_constant(eps))
    assert report == {"factors": 1, "recovered": 0, "kept": 0}
    m = _draws(shape, 1, seed + 1)[0]
    direction = structure.direction(item[1], item[2], m)
    assert direction.shape == shape and direction.dtype == F64
    assert_close(direction, m / (v ** power + eps), what="m / (v^power + ε)")


def test_the_reciprocal_changes_only_at_refresh():
    structure = Diagonal()
    (item,) = items = _items(structure, {"w": (3,)})
    structure.update(items, FakeStatistics({"w": _draws((3,), 2, 0)}), ema=0.9)
    structure.refresh(items, solver=None, damping=_constant(0.1))
    inv = item[2]["diag_inv"].clone()
    structure.update(items, FakeStatistics({"w": _draws((3,), 2, 1)}), ema=0.9)
    assert torch.equal(item[2]["diag_inv"], inv)
    m = torch.randn(3, dtype=F64)
    assert_close(structure.direction(item[1], item[2], m), m * inv)


def test_before_any_statistics_the_direction_is_the_vector():
    structure = Diagonal()
    items = _items(structure, {"w": (2, 3), "s": ()})
    assert structure.refresh(items, solver=None, damping=_constant(0.1))["factors"] == 0
    for _, p, state in items:
        m = torch.randn(p.shape, dtype=F64)
        assert torch.equal(structure.direction(p, state, m), m)


def test_directions_of_a_group_equal_the_single_directions():
    structure = Diagonal()
    shapes = {"a": (2, 3), "b": (3,), "c": ()}
    items = _items(structure, shapes)
    structure.update(items, FakeStatistics({n: _draws(s, 2, i)
                                            for i, (n, s) in enumerate(shapes.items())}),
                     ema=0.9)
    structure.refresh(items, solver=None, damping=_constant(1e-3))
    vectors = [torch.randn(s, dtype=F64) for s in shapes.values()]
    together = structure.directions(items, vectors)
    for (_, p, state), v, d in zip(items, vectors, together, strict=True):
        assert torch.equal(d, structure.direction(p, state, v))
    # mixed dtypes (a bf16 momentum against float32 state) take the per-tensor path
    (_, p, state), = _items(structure, {"h": (3,)}, dtype=torch.bfloat16)
    (d,) = structure.directions([("h", p, state)], [torch.ones(3, dtype=torch.bfloat16)])
    assert d.dtype == torch.bfloat16


def test_the_frobenius_rule_damps_each_coordinate_by_its_own_scale():
    """Each coordinate is a 1 × 1 block: ``ε = α·v^power`` per coordinate."""
    structure = Diagonal(power=0.5)
    (item,) = items = _items(structure, {"w": (4,)})
    g = _draws((4,), 3, 0)
    structure.update(items, FakeStatistics({"w": g}), ema=0.9)
    rule = curvlib.damping.as_damping("frobenius")
    structure.refresh(items, solver=None, damping=lambda mats: rule(0.5, mats))
    v = (g ** 2).mean(0)
    assert_close(item[2]["diag_inv"], 1 / (1.5 * v.sqrt()))


def test_zero_damping_on_a_zero_second_moment_keeps_the_previous_reciprocal():
    structure = Diagonal(power=1.0)
    (item,) = items = _items(structure, {"w": (3,)})
    g = _draws((3,), 2, 0)
    g[:, 1] = 0.0  # one coordinate never moves: v = 0 there
    structure.update(items, FakeStatistics({"w": g}), ema=0.9)
    report = structure.refresh(items, solver=None, damping=_constant(0.0))
    assert report == {"factors": 1, "recovered": 0, "kept": 1}
    inv = item[2]["diag_inv"]
    assert torch.isfinite(inv).all() and inv[1].item() == 1.0  # the identity's value
    v = (g ** 2).mean(0)
    assert_close(inv[[0, 2]], 1 / v[[0, 2]])


# -- EMA, warm start, non-finite gradients, dtypes, options ------------------------------------


def test_warm_start_average_then_ema():
    structure = Diagonal()
    (item,) = items = _items(structure, {"w": (2, 2)})
    gs = [_draws((2, 2), 2, s) for s in range(4)]
    for g in gs[:3]:
        structure.update(items, FakeStatistics({"w": g}), ema=0.9, average=True)
    mean = sum((g ** 2).mean(0) for g in gs[:3]) / 3
    assert_close(item[2]["diag_v"], mean, what="warm-start mean")
    structure.update(items, FakeStatistics({"w": gs[3]}), ema=0.9)
    assert_close(item[2]["diag_v"], 0.9 * mean + 0.1 * (gs[3] ** 2).mean(0))
    assert item[2]["diag_updates"].item() == 4


@pytest.mark.parametrize("ema", [1.0, 1.5, -0.1])
def test_bad_ema_raises(ema):
    structure = Diagonal()
    items = _items(structure, {"w": (2,)})
    with pytest.raises(ValueError, match="ema"):
        structure.update(items, FakeStatistics({"w": _draws((2,), 1, 0)}), ema=ema)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("statistics", ["batch", "per_sample"])
def test_a_non_finite_gradient_leaves_that_state_unchanged(bad, statistics):
    structure = Diagonal(statistics=statistics)
    items = _items(structure, {"w": (2, 3), "b": (3,)})
    structure.update(items, FakeStatistics({"w": _draws((2, 3), 2, 0),
                                            "b": _draws((3,), 2, 1)}), ema=0.9)
    structure.refresh(items, solver=None, damping=_constant(0.1))
    before = {name: {k: v.clone() for k, v in s.items()} for name, _, s in items}
    bad_w = _draws((2, 3), 2, 2)
    bad_w[1, 0, 2] = bad
    new_b = _draws((3,), 2, 3)
    structure.update(items, FakeStatistics({"w": bad_w, "b": new_b}), ema=0.9)
    structure.refresh(items, solver=None, damping=_constant(0.1))
    (_, _, w_state), (_, _, b_state) = items
    for key, value in before["w"].items():
        assert torch.equal(w_state[key], value), key
    assert w_state["diag_skipped"].item() == 1
    assert_close(b_state["diag_v"], 0.9 * before["b"]["diag_v"] + 0.1 * (new_b ** 2).mean(0))


def test_state_dtypes_are_float32_or_wider():
    structure = Diagonal()
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (F64, F64)):
        p = nn.Parameter(torch.zeros(2, 3, dtype=dtype))
        state = structure.init_state(p)
        assert state["diag_v"].dtype == expected and state["diag_inv"].dtype == expected
        g = (torch.randn(2, 2, 3) * 1e3).to(dtype)  # squares overflow float16, not float32
        structure.update([("w", p, state)], FakeStatistics({"w": g}), ema=0.9)
        assert state["diag_updates"].item() == 1
        structure.refresh([("w", p, state)], solver=None, damping=_constant(1e-8))
        assert state["diag_v"].dtype == expected and state["diag_inv"].dtype == expected
        assert_close(state["diag_v"], (g.to(expected) ** 2).mean(0), rtol=1e-6)
        assert structure.direction(p, state, torch.ones(2, 3, dtype=dtype)).dtype == dtype


def test_options_are_checked():
    with pytest.raises(ValueError, match="statistics"):
        Diagonal(statistics="rows")
    for bad in (0, -0.5, float("inf"), float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="power"):
            Diagonal(power=bad)
    assert Diagonal().needs == frozenset({"batch_grads"})
    assert Diagonal(statistics="per_sample").needs == frozenset({"per_sample_grads"})
    assert Diagonal().covers(nn.Parameter(torch.zeros(())))
    assert Diagonal().solver_powers([nn.Parameter(torch.zeros(3))]) == set()
    assert repr(Diagonal(power=1)) == "Diagonal(statistics='batch', power=1.0)"
    assert [repr(s) for s in Diagonal.examples()] == \
        [repr(Diagonal()), repr(Diagonal(statistics="per_sample", power=1.0))]
    assert type(as_structure("diagonal")) is Diagonal


def test_curvature_blocks_are_diag_v():
    structure = Diagonal(power=0.5)
    shapes = {"w": (2, 3), "s": ()}
    items = _items(structure, shapes)
    grads = {n: _draws(s, 3, i) for i, (n, s) in enumerate(shapes.items())}
    structure.update(items, FakeStatistics(grads), ema=0.9)
    blocks = structure.curvature_blocks(items)
    assert list(blocks) == [("w",), ("s",)]
    for (name,), block in blocks.items():
        assert block.dtype == F64
        assert_close(block, torch.diag((grads[name] ** 2).mean(0).reshape(-1)))


# -- assembled optimizers against the reference from the oracles --------------------------------


def _batches(spec, lik, n, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *spec.in_shape, generator=gen, dtype=F64),
             make_targets(lik, spec.output_shape(), n, seed + 100 + s)) for s in range(steps)]


class _Scaled(nn.Module):
    """A model with an order-0 parameter (covered by ``diagonal``)."""

    def __init__(self):
        super().__init__()
        self.body = ModelSpec("mlp", (3,), (4,), 3, seed=7).build()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))

    def forward(self, x):
        return self.scale * self.body(x)


_SOURCES = {
    "true_fisher": "true_fisher",
    "true_fisher per-sample, 2 draws": TrueFisher(num_samples=2, per_sample=True),
    "empirical": "empirical",
    "gram": "gram",
}


@given(case=st.sampled_from([
           (ModelSpec("mlp", (3,), (4,), 3, seed=1), "categorical"),
           (ModelSpec("cnn2d", (2, 4, 4), (2,), 2, kernel=2, seed=2), "gaussian"),
           (ModelSpec("cnn1d", (2, 5), (3,), 2, kernel=2, seed=3), "bernoulli"),
           (None, "categorical")]),
       source_and_statistics=st.sampled_from([
           (source, statistics) for source in _SOURCES for statistics in ("batch", "per_sample")
           if not Diagonal(statistics).needs - as_source(_SOURCES[source]).provides]),
       power=st.sampled_from([0.5, 1.0]), damping=st.sampled_from([1e-3, 0.1]),
       seed=seeds(), n=st.integers(1, 4))
@settings(max_examples=examples(0.15))  # three optimizer steps and up to 12 oracle gradients each
def test_assembled_diagonal_steps_equal_the_oracle_formula(case, source_and_statistics, power,
                                                           damping, seed, n):
    """Both statistics and powers, with every source that provides them, at 1e-10 in
    float64 (elementwise: no conditioning enters); ``inverse_every=2`` skips a refresh. The
    order-0 parameter of ``_Scaled`` is covered too."""
    source, statistics = source_and_statistics
    structure = Diagonal(statistics=statistics, power=power)
    spec, lik = case
    model = _Scaled() if spec is None else spec.build()
    batches = _batches(spec or ModelSpec("mlp", (3,), (4,), 3), lik, n, 3, seed % 1000)
    opt = curvlib.assemble(model, lik, source=_SOURCES[source], structure=structure,
                           solver="cholesky", generator=torch.Generator().manual_seed(seed),
                           lr=0.01, damping=damping, momentum=0.9, weight_decay=0.01, ema=0.8,
                           inverse_every=2)
    check_steps(opt, model, lik, batches)


def test_per_sample_statistics_need_per_sample_gradients():
    with pytest.raises(CompatibilityError, match="per_sample_grads"):
        curvlib.assemble(nn.Linear(2, 2), "gaussian", source="true_fisher",
                         structure=Diagonal(statistics="per_sample"))


@pytest.mark.parametrize("solver", sorted(r.name for r in registrations("solver")))
def test_any_solver_works(solver):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="diagonal",
                           solver=solver, lr=0.01, damping=1e-8, inverse_every=1)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = opt.backward(model(x), y)
        opt.step()
        first = loss.item() if first is None else first
    assert math.isfinite(loss.item()) and loss.item() < 0.7 * first


def test_true_fisher_diagonal_takes_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(3, (64,))
    opt = curvlib.assemble(model, "categorical", source="true_fisher", structure="diagonal",
                           solver=Cholesky(), lr=1e-2, damping=1e-8)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, q)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).to(dtype)
    batches = [(torch.randn(8, 1, 4, 4).to(dtype), torch.randint(3, (8,))) for _ in range(5)]
    kwargs = dict(source="true_fisher", structure="diagonal", lr=0.01, damping=1e-6,
                  inverse_every=2)
    opt = curvlib.assemble(model, "categorical", generator=torch.Generator().manual_seed(1),
                           **kwargs)

    def train(o, m, bs):
        for x, y in bs:
            o.zero_grad()
            o.backward(m(x), y)
            o.step()

    train(opt, model, batches[:3])
    fresh = copy.deepcopy(model)
    fresh_opt = curvlib.assemble(fresh, "categorical", **kwargs)
    fresh_opt.load_state_dict(_roundtrip(opt.state_dict()))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype, key
        assert opt.state[p]["diag_v"].dtype == torch.float32
    train(opt, model, batches[3:])
    train(fresh_opt, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_without_averaging_the_step_is_adams_with_zero_betas():
    """``momentum=0, ema=0``: ``m = g`` and ``v = g²`` of the step, so ``g / (|g| + ε)`` —
    Adam's step with ``betas=(0, 0)`` (its bias corrections are then 1), to float32
    round-off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    other = copy.deepcopy(model)
    x, y = torch.randn(32, 4), torch.randint(3, (32,))
    ours = curvlib.assemble(model, "categorical", source="empirical", structure="diagonal",
                            lr=1e-2, damping=1e-6, momentum=0.0, ema=0.0, inverse_every=1)
    adam = torch.optim.Adam(other.parameters(), lr=1e-2, betas=(0.0, 0.0), eps=1e-6)
    for _ in range(4):
        ours.zero_grad()
        ours.backward(model(x), y)
        ours.step()
        adam.zero_grad()
        nn.functional.cross_entropy(other(x), y).backward()
        adam.step()
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            assert_close(p, q, rtol=1e-5)


def test_zero_damping_on_a_coordinate_that_never_moves_warns_and_keeps_the_identity():
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(16, 3)
    x[:, 1] = 0.0  # the weight's second column gets no gradient: v = 0 there
    opt = curvlib.assemble(model, "gaussian", source="empirical", structure="diagonal",
                           lr=1e-2, damping=0.0, inverse_every=1)
    opt.zero_grad()
    opt.backward(model(x), torch.randn(16, 2))
    with pytest.warns(RuntimeWarning, match="could not be inverted"):
        opt.step()
    inv = opt.state[model.weight]["diag_inv"]
    assert torch.isfinite(model.weight).all() and torch.isfinite(inv).all()
    assert torch.equal(inv[:, 1], torch.ones(2))
