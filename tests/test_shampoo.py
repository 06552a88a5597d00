"""The Shampoo structure against dense float64 references written from its definition.

Notation (docs/shampoo.md): a parameter of (reshaped) shape ``d_1 × … × d_k``; per mode the
statistic ``S_i = (1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` and its EMA ``H_i``; preconditioners
``P_i = (H_i + εI)^{-1/p}`` (``p = 2k`` unless ``root`` is set; ``P_i = I`` for modes longer
than ``max_dim``); the direction ``(P_1 ⊗ … ⊗ P_k) vec(m)`` with row-major ``vec``. The
references build ``P_i`` by ``torch.linalg.eigh`` and the Kronecker product by ``torch.kron``
(:mod:`curvlib.testing.reference.shampoo`).
"""

import copy
import io
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.solvers import Cholesky, Eigh, Newton
from curvlib.structures import Shampoo, TensorNormal, as_structure
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
from curvlib.testing.reference.shampoo import inverse_root
from curvlib.testing.reference.tensor_normal import unfold
from curvlib.testing.strategies import (
    ModelSpec,
    dampings,
    examples,
    make_targets,
    seeds,
    spd_matrices,
    tensor_shapes,
)

F64 = torch.float64
U64 = 2.0**-53  # float64 unit round-off
MAX_ENTRIES = 200  # the dense Kronecker product is MAX_ENTRIES² numbers


@st.composite
def small_shapes(draw, min_order=1, max_order=4):
    shape = draw(tensor_shapes(min_order, max_order, 1, 6 if max_order <= 2 else 5))
    assume(math.prod(shape) <= MAX_ENTRIES)
    return shape


def _statistics(g):
    """``(1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` per mode by an explicit loop over the draws."""
    return [sum(unfold(gs, i) @ unfold(gs, i).T for gs in g) / g.shape[0]
            for i in range(g.dim() - 1)]


def _ema(stats_per_step, ema):
    hs = stats_per_step[0]
    for new in stats_per_step[1:]:
        hs = [ema * h + (1 - ema) * s for h, s in zip(hs, new, strict=True)]
    return hs


def _dense_direction(roots, dims, m):
    kron = torch.ones(1, 1, dtype=F64)
    for r, d in zip(roots, dims, strict=True):
        kron = torch.kron(kron, torch.eye(d, dtype=F64) if r is None else r)
    return (kron @ m.reshape(-1)).reshape(m.shape)


# -- the direction against the dense Kronecker reference (eigh) ---------------------------------


@given(shape=small_shapes(), num=st.integers(1, 4), steps=st.integers(1, 3), seed=seeds(),
       rel_damping=dampings(1e-3, 1e2), scale=st.sampled_from([1e-2, 1.0, 1e2]),
       root=st.sampled_from([None, None, 1, 2, 3, 2.5]), ema=st.sampled_from([0.0, 0.5, 0.95]))
@settings(max_examples=examples(0.2))
def test_direction_equals_the_dense_kronecker_product_of_inverse_roots(
        shape, num, steps, seed, rel_damping, scale, root, ema):
    """Float64, 1e-10 relative. ``ε`` is drawn relative to ``‖G‖²`` (the trace of every
    ``H_i``), which keeps each damped factor's condition number below ``1 + 1/rel`` ≤ 1001,
    so both sides' eigendecompositions agree far below the tolerance."""
    structure = Shampoo(root=root)
    (item,) = items = _items(structure, {"w": shape})
    gs = [_draws(shape, num, seed + 7 * j, scale) for j in range(steps)]
    for g in gs:
        structure.update(items, FakeStatistics({"w": g}), ema=ema)
    hs = _ema([_statistics(g) for g in gs], ema)
    eps = rel_damping * torch.trace(hs[0]).item()
    report = structure.refresh(items, solver=Eigh(), damping=_constant(eps))
    assert report == {"factors": len(shape), "recovered": 0, "kept": 0}
    p = 2.0 * len(shape) if root is None else float(root)
    roots = [inverse_root(h, eps, p) for h in hs]
    for i, r in enumerate(roots):
        assert_close(item[2][f"shampoo_P{i}"], r, what=f"P_{i} = (H_{i} + εI)^(-1/{p})")
    m = _draws(shape, 1, seed + 1)[0]
    direction = structure.direction(item[1], item[2], m)
    assert direction.shape == shape and direction.dtype == F64
    assert_close(direction, _dense_direction(roots, shape, m),
                 what="Shampoo direction and the dense Kronecker product")


def test_the_default_power_is_twice_the_order():
    structure = Shampoo()
    assert [structure.power(s) for s in [(3,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]] == \
        [2.0, 4.0, 6.0, 8.0]
    # the order after the reshape policy
    assert Shampoo(reshape="out_in_kernel").power((2, 3, 4, 5)) == 6.0
    assert Shampoo(reshape="out_rest").power((2, 3, 4, 5)) == 4.0
    assert Shampoo(root=2).power((2, 3, 4, 5)) == 2.0
    # modes longer than max_dim still count
    assert Shampoo(max_dim=3).power((2, 10)) == 4.0


@given(data=st.data(), policy=st.sampled_from(["out_in_kernel", "out_rest", "as_is"]))
@settings(max_examples=examples(0.1))
def test_reshape_policies_of_order_four_tensors(data, policy):
    o, i, kh, kw = (data.draw(st.integers(1, 3), label=n) for n in ("out", "in", "kh", "kw"))
    shape = (o, i, kh, kw)
    dims = {"out_in_kernel": (o, i, kh * kw), "out_rest": (o, i * kh * kw),
            "as_is": shape}[policy]
    structure = Shampoo(reshape=policy)
    assert structure.dims(shape) == dims
    assert structure.dims((5, 4)) == (5, 4)
    (item,) = items = _items(structure, {"conv": shape})
    seed = data.draw(seeds(), label="seed")
    g = _draws(shape, 2, seed)
    structure.update(items, FakeStatistics({"conv": g}), ema=0.9)
    eps = data.draw(dampings(1e-1, 10.0), label="damping") * torch.sum(g * g).item() / 2
    structure.refresh(items, solver=Eigh(), damping=_constant(eps))
    hs = _statistics(g.reshape(2, *dims))  # row-major reshape: vec is unchanged
    roots = [inverse_root(h, eps, 2.0 * len(dims)) for h in hs]
    m = _draws(shape, 1, seed + 1)[0]
    assert_close(structure.direction(item[1], item[2], m),
                 _dense_direction(roots, dims, m.reshape(dims)).reshape(shape),
                 what=f"direction with reshape={policy}")


@given(shape=small_shapes(), max_dim=st.integers(1, 5), seed=seeds(), rel=dampings(1e-2, 10.0))
@settings(max_examples=examples(0.15))
def test_max_dim_leaves_long_modes_unfactored_and_keeps_the_power(shape, max_dim, seed, rel):
    structure = Shampoo(max_dim=max_dim)
    (item,) = items = _items(structure, {"w": shape})
    for j, d in enumerate(shape):
        assert (f"shampoo_H{j}" in item[2]) == (d <= max_dim)
        assert (f"shampoo_P{j}" in item[2]) == (d <= max_dim)
    g = _draws(shape, 3, seed)
    structure.update(items, FakeStatistics({"w": g}), ema=0.9)
    eps = rel * torch.sum(g * g).item() / 3
    structure.refresh(items, solver=Eigh(), damping=_constant(eps))
    p = 2.0 * len(shape)  # k counts the unfactored modes too
    roots = [inverse_root(h, eps, p) if d <= max_dim else None
             for h, d in zip(_statistics(g), shape, strict=True)]
    m = _draws(shape, 1, seed + 1)[0]
    assert_close(structure.direction(item[1], item[2], m), _dense_direction(roots, shape, m),
                 what=f"direction with max_dim={max_dim}")


def test_before_any_statistics_the_direction_is_the_vector():
    structure = Shampoo()
    items = _items(structure, {"w": (2, 3, 4), "b": (3,)})
    report = structure.refresh(items, solver=Eigh(), damping=_constant(0.1))
    assert report["factors"] == 0
    for _, p, state in items:
        m = torch.randn(p.shape, dtype=F64)
        assert torch.equal(structure.direction(p, state, m), m)


def test_factors_of_equal_size_and_power_are_inverted_in_one_call():
    class Counting(Eigh):
        def __init__(self):
            self.calls = []

        def inverse_root(self, matrices, damping, power=1.0):
            self.calls.append((tuple(matrices.shape), power))
            return super().inverse_root(matrices, damping, power)

    structure = Shampoo()
    shapes = {"a": (3, 4), "b": (4,), "c": (3, 3, 2), "d": (4, 3)}
    items = _items(structure, shapes)
    grads = {n: _draws(s, 2, i) for i, (n, s) in enumerate(shapes.items())}
    structure.update(items, FakeStatistics(grads), ema=0.9)
    solver = Counting()
    report = structure.refresh(items, solver=solver, damping=_constant(0.1))
    assert sorted(solver.calls) == sorted([
        ((2, 3, 3), 4.0), ((2, 4, 4), 4.0),  # a and d share sizes 3 and 4 at p = 4
        ((1, 4, 4), 2.0),                    # b: the same size at another power
        ((2, 3, 3), 6.0), ((1, 2, 2), 6.0),  # c
    ])
    assert report == {"factors": 8, "recovered": 0, "kept": 0}
    for name, _, state in items:
        hs = _statistics(grads[name])
        p = 2.0 * len(shapes[name])
        for j, h in enumerate(hs):
            assert_close(state[f"shampoo_P{j}"], inverse_root(h, 0.1, p), what=f"{name} P_{j}")


# -- newton against eigh: the checked claim ---------------------------------------------


def _newton_tolerance(d: int, kappa: float, unit: float, stop: float) -> float:
    """Relative Frobenius distance allowed between newton's and eigh's ``(A + εI)^{-1/p}``.

    Two sources of difference (docs/shampoo.md, "Newton against eigh"):

    * newton stops at ``‖M_j − I‖_max < stop`` with ``M_j = X_j^p A``, so
      ``X_true = X_j M_j^{-1/p}`` and its truncation error is, to first order,
      ``‖M_j − I‖_2 / p ≤ d·stop`` relative;
    * the inverse root itself is ill-conditioned: a relative perturbation ``u`` of ``A`` (one
      rounding) moves ``λ_min`` by up to ``u λ_max``, i.e. ``κ u`` relative, and ``κ u / p``
      in the root. Both methods make errors of that size, in different directions; over 3000
      draws (κ up to 1e10) the distance stayed below ``d·stop + κ u``, so ``10 κ u`` is
      allowed.
    """
    return d * stop + 10.0 * kappa * unit


@given(data=st.data(), power=st.sampled_from([2, 4, 6, 8]),
       max_condition=st.sampled_from([1e2, 1e6, 1e10]))
@settings(max_examples=examples(0.25))
def test_newton_inverse_roots_match_eigh_in_float64(data, power, max_condition):
    """``(A + εI)^{-1/p}`` for p ∈ {2, 4, 6, 8} on drawn SPD matrices, well- and
    ill-conditioned (κ up to 1e10), with and without damping: newton converges (``ok``) and
    agrees with eigh to :func:`_newton_tolerance` (float64: newton stops once
    ``‖M − I‖_max < 1e-12``, its ``tol``; it would accept up to 1e-10 after ``max_iter``
    iterations, which these spectra never need: κ = 1e10 takes about 33)."""
    d = data.draw(st.integers(1, 12), label="size")
    count = data.draw(st.integers(1, 3), label="batch")
    batch = torch.stack([
        data.draw(spd_matrices(sizes=st.just(d), max_condition=max_condition,
                               min_eigenvalue=data.draw(dampings(1e-4, 1e2), label="λ_min")))
        for _ in range(count)])
    eps = data.draw(st.sampled_from([0.0, 1e-6, 1e-2]), label="ε") * torch.ones(count, dtype=F64)
    x, ok = Newton().inverse_root(batch, eps, power)
    y, ok_e = Eigh().inverse_root(batch, eps, power)
    assert bool(ok.all()) and bool(ok_e.all())
    for a, xa, ya, e in zip(batch, x, y, eps, strict=True):
        values = torch.linalg.eigvalsh(a) + e
        kappa = (values.max() / values.min()).item()
        assert_close(xa, ya, rtol=_newton_tolerance(d, kappa, U64, 1e-12),
                     what=f"newton and eigh (A + εI)^(-1/{power}), d={d}, κ={kappa:.1e}")


@given(data=st.data(), power=st.sampled_from([2, 4, 6, 8]))
@settings(max_examples=examples(0.15))
def test_newton_inverse_roots_match_eigh_in_float32(data, power):
    """Float32 state (any model below float64): newton on the float32 matrix against eigh in
    float64, for κ ≤ 1e4 — beyond it ``κ u`` in float32 (u = 2^-24) reaches 1e-3 and newton
    may report failure (the solver's recovery retries in float64 then). Newton's float32
    ``ok`` threshold on ``‖M − I‖_max`` is 1e-5."""
    a = data.draw(spd_matrices(sizes=st.integers(1, 12), max_condition=1e4))
    d = a.shape[0]
    eps = torch.tensor([data.draw(st.sampled_from([0.0, 1e-6, 1e-2]))], dtype=F64)
    x, ok = Newton().inverse_root(a.float()[None], eps, power)
    y, _ = Eigh().inverse_root(a[None], eps, power)
    assert bool(ok.all())
    values = torch.linalg.eigvalsh(a) + eps
    kappa = (values.max() / values.min()).item()
    assert_close(x[0], y[0], rtol=_newton_tolerance(d, kappa, 2.0**-24, 1e-5),
                 what=f"float32 newton and float64 eigh (A + εI)^(-1/{power})")


@given(shape=small_shapes(), num=st.integers(1, 4), seed=seeds(),
       rel_damping=dampings(1e-3, 1e2), root=st.sampled_from([None, 1, 2, 3]))
@settings(max_examples=examples(0.15))
def test_the_direction_by_newton_matches_eigh(shape, num, seed, rel_damping, root):
    """The whole structure with either solver. Each ``P_i`` agrees to
    :func:`_newton_tolerance` (``ε ≥ 1e-3 tr H_i`` bounds κ_i by 1001); the direction to 1e-9:
    those ≤ 1e-11 per factor, summed over k ≤ 4 factors and amplified at most by the
    conditioning of ``⊗ P_i`` (≤ ∏ κ_i^{1/p} ≤ 1001^{k/p}) and ``√(∏ d_i)`` ≤ 15."""
    by = {}
    g = _draws(shape, num, seed)
    m = _draws(shape, 1, seed + 1)[0]
    for solver in (Eigh(), Newton()):
        structure = Shampoo(root=root)
        (item,) = items = _items(structure, {"w": shape})
        structure.update(items, FakeStatistics({"w": g}), ema=0.9)
        eps = rel_damping * torch.sum(g * g).item() / num
        report = structure.refresh(items, solver=solver, damping=_constant(eps))
        assert report == {"factors": len(shape), "recovered": 0, "kept": 0}
        by[solver.name] = (item[2], structure.direction(item[1], item[2], m))
    for i, h in enumerate(_statistics(g)):
        values = torch.linalg.eigvalsh(h).clamp_min(0) + eps
        kappa = (values.max() / values.min()).item()
        assert_close(by["newton"][0][f"shampoo_P{i}"], by["eigh"][0][f"shampoo_P{i}"],
                     rtol=_newton_tolerance(shape[i], kappa, U64, 1e-12), what=f"P_{i}")
    assert_close(by["newton"][1], by["eigh"][1], rtol=1e-9, what="newton and eigh directions")


# -- the implied curvature -----------------------------------------------------------------------


@given(shape=small_shapes(max_order=3), seed=seeds(), root=st.sampled_from([None, 2, 3]),
       max_dim=st.sampled_from([None, 3]))
@settings(max_examples=examples(0.125))
def test_curvature_blocks_are_the_kronecker_product_whose_inverse_root_is_applied(
        shape, seed, root, max_dim):
    assume(math.prod(shape) <= 48)  # as many draws as entries: keep the loop short
    """``C = ⊗ H_i^{2/p}`` (identity for unfactored modes), float64. With enough draws every
    ``H_i`` is positive definite, and the undamped direction (ε = 0) is ``C^{-1/2} vec(m)``:
    checked through a dense eigendecomposition of ``C`` (κ(C) stays small for Gaussian draws
    with more columns than rows, so 1e-8 holds with a wide margin)."""
    structure = Shampoo(root=root, max_dim=max_dim)
    (item,) = items = _items(structure, {"w": shape})
    num = 2 + math.prod(shape)
    g = _draws(shape, num, seed)
    assert structure.curvature_blocks(items) == {}  # no statistics yet
    structure.update(items, FakeStatistics({"w": g}), ema=0.9)
    if max_dim is not None and min(shape) > max_dim:  # nothing factored: no statistics kept
        assert structure.curvature_blocks(items) == {}
        return
    (key, block), = structure.curvature_blocks(items).items()
    assert key == ("w",) and block.dtype == F64
    p = 2.0 * len(shape) if root is None else float(root)
    factors = []
    for h, d in zip(_statistics(g), shape, strict=True):
        if max_dim is not None and d > max_dim:
            factors.append(torch.eye(d, dtype=F64))
            continue
        values, vectors = torch.linalg.eigh(h)
        factors.append(vectors @ torch.diag(values ** (2.0 / p)) @ vectors.T)
    expected = factors[0]
    for f in factors[1:]:
        expected = torch.kron(expected, f)
    assert_close(block, expected, what="C = ⊗ H_i^(2/p)")
    structure.refresh(items, solver=Eigh(), damping=_constant(0.0))
    m = _draws(shape, 1, seed + 1)[0]
    values, vectors = torch.linalg.eigh(block)
    inv_sqrt = vectors @ torch.diag(values ** -0.5) @ vectors.T
    assert_close(structure.direction(item[1], item[2], m),
                 (inv_sqrt @ m.reshape(-1)).reshape(shape), rtol=1e-8,
                 what="undamped direction and C^(-1/2) vec(m)")


# -- EMA, warm start, non-finite gradients, dtypes -----------------------------------------------


def test_first_update_sets_the_statistics_then_ema_and_average():
    structure = Shampoo()
    (item,) = items = _items(structure, {"w": (2, 3)})
    state = item[2]
    gs = [_draws((2, 3), 2, s) for s in range(4)]
    stats = [_statistics(g) for g in gs]
    structure.update(items, FakeStatistics({"w": gs[0]}), ema=0.7)
    for j in range(2):
        assert_close(state[f"shampoo_H{j}"], stats[0][j], what="first update H = S")
    structure.update(items, FakeStatistics({"w": gs[1]}), ema=0.7)
    for j in range(2):
        assert_close(state[f"shampoo_H{j}"], 0.7 * stats[0][j] + 0.3 * stats[1][j])
    warm = Shampoo()
    (witem,) = witems = _items(warm, {"w": (2, 3)})
    for g in gs[:3]:
        warm.update(witems, FakeStatistics({"w": g}), ema=0.9, average=True)
    for j in range(2):
        assert_close(witem[2][f"shampoo_H{j}"], sum(s[j] for s in stats[:3]) / 3,
                     what="warm-start mean")
    assert witem[2]["shampoo_updates"].item() == 3


@pytest.mark.parametrize("ema", [1.0, 1.5, -0.1])
def test_bad_ema_raises(ema):
    structure = Shampoo()
    items = _items(structure, {"w": (2,)})
    with pytest.raises(ValueError, match="ema"):
        structure.update(items, FakeStatistics({"w": _draws((2,), 1, 0)}), ema=ema)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_leaves_that_state_unchanged(bad):
    structure = Shampoo()
    items = _items(structure, {"w": (2, 3), "b": (3,)})
    structure.update(items, FakeStatistics({"w": _draws((2, 3), 1, 0),
                                            "b": _draws((3,), 1, 1)}), ema=0.9)
    structure.refresh(items, solver=Eigh(), damping=_constant(0.1))
    before = {name: {k: v.clone() for k, v in s.items()} for name, _, s in items}
    bad_w = _draws((2, 3), 1, 2)
    bad_w[0, 1, 2] = bad
    new_b = _draws((3,), 1, 3)
    structure.update(items, FakeStatistics({"w": bad_w, "b": new_b}), ema=0.9)
    structure.refresh(items, solver=Eigh(), damping=_constant(0.1))
    (_, _, w_state), (_, _, b_state) = items
    for key, value in before["w"].items():
        assert torch.equal(w_state[key], value), key
    assert w_state["shampoo_skipped"].item() == 1
    assert b_state["shampoo_updates"].item() == 2
    assert_close(b_state["shampoo_H0"],
                 0.9 * before["b"]["shampoo_H0"] + 0.1 * _statistics(new_b)[0])


def test_parameters_without_statistics_are_left_alone():
    structure = Shampoo()
    items = _items(structure, {"w": (2, 3), "frozen": (4,)})
    structure.update(items, FakeStatistics({"w": _draws((2, 3), 1, 0)}), ema=0.9)
    structure.refresh(items, solver=Eigh(), damping=_constant(0.1))
    assert items[1][2]["shampoo_updates"].item() == 0
    assert torch.equal(items[1][2]["shampoo_P0"], torch.eye(4, dtype=F64))


@pytest.mark.parametrize("solver", [Eigh(), Newton()])
def test_state_dtypes_are_float32_or_wider(solver):
    structure = Shampoo()
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (F64, F64)):
        p = nn.Parameter(torch.zeros(2, 3, dtype=dtype))
        state = structure.init_state(p)
        assert state["shampoo_H0"].dtype == expected and state["shampoo_P1"].dtype == expected
        g = torch.randn(1, 2, 3).to(dtype)
        structure.update([("w", p, state)], FakeStatistics({"w": g}), ema=0.9)
        report = structure.refresh([("w", p, state)], solver=solver, damping=_constant(0.1))
        assert report["kept"] == 0
        assert state["shampoo_H0"].dtype == expected and state["shampoo_P0"].dtype == expected
        assert structure.direction(p, state, torch.ones(2, 3, dtype=dtype)).dtype == dtype


def test_options_are_checked():
    with pytest.raises(ValueError, match="reshape"):
        Shampoo(reshape="flatten")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_dim"):
            Shampoo(max_dim=bad)
    for bad in (0, -2, float("inf"), float("nan"), "4", True):
        with pytest.raises(ValueError, match="root"):
            Shampoo(root=bad)
    structure = Shampoo()
    assert structure.covers(nn.Parameter(torch.zeros(3)))
    assert not structure.covers(nn.Parameter(torch.zeros(())))
    assert repr(Shampoo(root=2)) == "Shampoo(reshape='as_is', max_dim=None, root=2.0)"
    assert [repr(s) for s in Shampoo.examples()] == [repr(Shampoo()), repr(Shampoo(root=2))]
    assert type(as_structure("shampoo")) is Shampoo


# -- solver compatibility --------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_solver_powers_are_the_roots_used():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    params = list(model.parameters())  # orders 4, 1, 2, 1
    assert Shampoo().solver_powers(params) == {8.0, 2.0, 4.0}
    assert Shampoo(reshape="out_in_kernel").solver_powers(params) == {6.0, 2.0, 4.0}
    assert Shampoo(root=3).solver_powers(params) == {3.0}
    assert Shampoo().solver_powers([]) == set()
    # a tensor with every mode unfactored asks the solver for nothing
    assert Shampoo(max_dim=1).solver_powers([nn.Parameter(torch.zeros(2, 3))]) == set()


def test_cholesky_is_refused_naming_the_solvers_that_work():
    with pytest.raises(CompatibilityError, match=r"'eigh', 'newton'"):
        curvlib.assemble(_mlp(), "categorical", source="true_fisher", structure="shampoo",
                         solver="cholesky")
    with pytest.raises(CompatibilityError, match=r"p in \[2.0\]"):
        curvlib.assemble(_mlp(), "categorical", source="true_fisher",
                         structure=Shampoo(root=2), solver=Cholesky())
    # a non-integer root: eigh only
    with pytest.raises(CompatibilityError, match=r"solvers that do: 'eigh'$"):
        curvlib.assemble(_mlp(), "categorical", source="true_fisher",
                         structure=Shampoo(root=2.5), solver="newton")
    curvlib.assemble(_mlp(), "categorical", source="true_fisher", structure=Shampoo(root=2.5),
                     solver="eigh")
    # root=1 is an inverse: cholesky computes it
    curvlib.assemble(_mlp(), "categorical", source="true_fisher", structure=Shampoo(root=1),
                     solver="cholesky")


# -- assembled optimizers against the reference, step by step -----------------------------------


def _batches(spec, lik, n, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *spec.in_shape, generator=gen, dtype=F64),
             make_targets(lik, spec.output_shape(), n, seed + 100 + s)) for s in range(steps)]


@given(case=st.sampled_from([
           (ModelSpec("mlp", (3,), (4,), 3, seed=1), "categorical"),
           (ModelSpec("cnn2d", (2, 4, 4), (2,), 2, kernel=2, seed=2), "gaussian"),
           (ModelSpec("cnn1d", (2, 5), (3,), 2, kernel=2, seed=3), "bernoulli")]),
       source=st.sampled_from(["true_fisher", "empirical"]),
       structure=st.sampled_from([Shampoo(), Shampoo(root=2),
                                  Shampoo(reshape="out_in_kernel", max_dim=3)]),
       damping=st.sampled_from([0.1, 1.0]), seed=seeds(), n=st.integers(1, 4))
@settings(max_examples=examples(0.1))  # three optimizer steps and up to 12 oracle gradients each
def test_assembled_shampoo_steps_equal_the_dense_reference(case, source, structure, damping,
                                                           seed, n):
    """Float64 end to end, at 1e-10: three steps with ``inverse_every=2`` (a refresh skipped)
    and momentum and weight decay; the damping is large next to the statistics of these
    small models, so every factor is well conditioned."""
    spec, lik = case
    model = spec.build()
    batches = _batches(spec, lik, n, 3, seed % 1000)
    opt = curvlib.assemble(model, lik, source=source, structure=structure, solver="eigh",
                           generator=torch.Generator().manual_seed(seed), lr=0.1,
                           damping=damping, momentum=0.9, weight_decay=0.01, ema=0.8,
                           inverse_every=2)
    check_steps(opt, model, lik, batches)


@pytest.mark.parametrize("source", ["true_fisher", "empirical"])
@pytest.mark.parametrize("solver", ["eigh", "newton"])
def test_assembled_optimizers_train(source, solver):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = curvlib.assemble(model, "categorical", source=source, structure="shampoo",
                           solver=solver, lr=0.1, damping=1e-3, ema=0.95,
                           generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = opt.backward(model(x), y)
        opt.step()
        first = loss.item() if first is None else first
        assert opt.last_refresh.get("kept", 0) == 0
    assert math.isfinite(loss.item()) and loss.item() < 0.7 * first


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
    kwargs = dict(source="true_fisher", structure="shampoo", solver="eigh", lr=0.05,
                  damping=0.1, inverse_every=2)
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
        assert any(k.startswith("shampoo_P") for k in opt.state[p])
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype, key
            if key.startswith(("shampoo_H", "shampoo_P")):
                assert value.dtype == torch.float32, key
    train(opt, model, batches[3:])
    train(fresh_opt, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tensor_normal_and_shampoo_share_the_mode_statistics():
    """Same ``H_i`` (TNT normalises only when inverting), so the statistics agree exactly."""
    g = _draws((3, 2, 2), 2, 0)
    tn, sh = TensorNormal(reshape="as_is"), Shampoo()
    (ti,) = titems = _items(tn, {"w": (3, 2, 2)})
    (si,) = sitems = _items(sh, {"w": (3, 2, 2)})
    tn.update(titems, FakeStatistics({"w": g}), ema=0.9)
    sh.update(sitems, FakeStatistics({"w": g}), ema=0.9)
    for j in range(3):
        assert torch.equal(ti[2][f"tnt_H{j}"], si[2][f"shampoo_H{j}"])
