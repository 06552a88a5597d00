"""The tensor-normal structure (TNT) against dense float64 references written from the paper.

Notation (TNT paper, Section 3): a parameter ``W`` of shape ``d_1 × … × d_k``; sampled
gradients ``G``; per mode the statistic ``mat_i(G) mat_i(G)ᵀ`` (eq. (2)); normalised factors
``Ũ_i = H_i / (c_0^{k−1} ∏_{j≠i} d_j)`` with ``c_0 = (tr H / ∏_j d_j)^{1/k}`` (eq. (5)); the
direction ``((Ũ_1 + εI) ⊗ … ⊗ (Ũ_k + εI))⁻¹ vec(m)`` (eq. (3)) with row-major ``vec``, whose
Kronecker product the references below build densely with ``torch.kron`` and solve.
"""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from curvlib.solvers import Cholesky, Eigh
from curvlib.structures import TensorNormal, mode_statistics, normalise
from curvlib.testing.assertions import assert_close, relative_error
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
from curvlib.testing.strategies import dampings, seeds, tensor_shapes

F64 = torch.float64
MAX_ENTRIES = 200  # the dense Kronecker product is MAX_ENTRIES² numbers


def _mat(g: torch.Tensor, i: int) -> torch.Tensor:
    """Mode-``i`` unfolding: ``d_i`` rows, the other indices (in order) as columns."""
    return g.movedim(i, 0).reshape(g.shape[i], -1)


def _mode_statistics_loop(g: torch.Tensor) -> list[torch.Tensor]:
    """``(1/S) Σ_s mat_i(G_s) mat_i(G_s)ᵀ`` by an explicit loop over the draws."""
    out = []
    for i in range(g.dim() - 1):
        total = torch.zeros(g.shape[i + 1], g.shape[i + 1], dtype=g.dtype)
        for s in range(g.shape[0]):
            m = _mat(g[s], i)
            total = total + m @ m.T
        out.append(total / g.shape[0])
    return out


def _normalise_reference(hs: list, dims: tuple[int, ...]) -> list:
    """Eq. (5), with ``tr H`` taken from the first factor present (all traces agree)."""
    k = len(dims)
    trace = next(torch.trace(h) for h in hs if h is not None)
    c0 = (trace / math.prod(dims)) ** (1.0 / k)
    return [None if h is None else
            h / (c0 ** (k - 1) * math.prod(d for j, d in enumerate(dims) if j != i))
            for i, h in enumerate(hs)]


def _dense_direction(us: list, dims: tuple[int, ...], eps: float, m: torch.Tensor):
    """``(⊗_i (Ũ_i + εI))⁻¹ vec(m)`` by one dense solve; an absent factor is the identity."""
    blocks = [torch.eye(d, dtype=F64) if u is None else u + eps * torch.eye(d, dtype=F64)
              for u, d in zip(us, dims, strict=True)]
    kron = blocks[0]
    for b in blocks[1:]:
        kron = torch.kron(kron, b)
    return torch.linalg.solve(kron, m.reshape(-1)).reshape(m.shape)


@st.composite
def small_shapes(draw, min_order: int = 1, max_order: int = 4):
    shape = draw(tensor_shapes(min_order, max_order, 1, 6 if max_order <= 2 else 5))
    assume(math.prod(shape) <= MAX_ENTRIES)
    return shape


@given(shape=small_shapes(), num=st.integers(1, 4), seed=seeds())
def test_mode_statistics_equal_a_loop_over_unfoldings(shape, num, seed):
    g = _draws(shape, num, seed)
    expected = _mode_statistics_loop(g)
    got = mode_statistics(g)
    assert len(got) == len(shape)
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, e, what=f"mode {i} statistic")
    modes = list(range(len(shape)))[::-2]  # a subset, in any order
    for i, a in zip(modes, mode_statistics(g, modes), strict=True):
        assert_close(a, expected[i], what=f"mode {i} statistic (subset)")


@given(shape=small_shapes(), num=st.integers(1, 4), seed=seeds(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_normalisation_invariants(shape, num, seed, scale):
    g = _draws(shape, num, seed, scale)
    hs = mode_statistics(g)
    trace = torch.trace(hs[0])
    k, total = len(shape), math.prod(shape)
    c0 = (trace / total) ** (1.0 / k)
    us = normalise(hs, shape)
    for i, (u, e) in enumerate(zip(us, _normalise_reference(hs, shape), strict=True)):
        assert_close(u, e, what=f"Ũ_{i} and eq. (5)")
        # every factor has mean eigenvalue c0 ...
        assert_close(torch.trace(u) / shape[i], c0, what=f"mean eigenvalue of Ũ_{i}")
    # ... and the Kronecker product keeps the trace of the statistics (c = 1)
    assert_close(math.prod(torch.trace(u) for u in us), trace, what="∏ tr Ũ_i and tr H")


def test_normalisation_of_a_zero_statistic_is_zero():
    hs = [torch.zeros(2, 2, dtype=F64), torch.zeros(3, 3, dtype=F64)]
    for u in normalise(hs, (2, 3)):
        assert torch.equal(u, torch.zeros_like(u))


# -- the direction through update / refresh / direction ----------------------------------------


@given(shape=small_shapes(), num=st.integers(1, 4), seed=seeds(),
       rel_damping=dampings(1e-2, 1e2), scale=st.sampled_from([1e-2, 1.0, 1e2]),
       solver=st.sampled_from(["cholesky", "eigh"]))
def test_direction_equals_the_dense_kronecker_solve(shape, num, seed, rel_damping, scale, solver):
    """Float64, 1e-10: ε is drawn relative to ``c_0`` (the scale of every Ũ_i), which keeps
    each damped factor's condition number below ``1 + d_i/r`` and the dense solve accurate.
    ``as_is`` makes the order k of the drawn shape the number of factors (order-4 tensors
    under the other policies are in the reshape test)."""
    tn = TensorNormal(reshape="as_is")
    (item,) = items = _items(tn, {"w": shape})
    g = _draws(shape, num, seed, scale)
    tn.update(items, FakeStatistics({"w": g}), ema=0.9)
    hs = _mode_statistics_loop(g)
    c0 = ((torch.trace(hs[0]) / math.prod(shape)) ** (1.0 / len(shape))).item()
    eps = rel_damping * c0
    report = tn.refresh(items, solver=Cholesky() if solver == "cholesky" else Eigh(),
                        damping=_constant(eps))
    assert report == {"factors": len(shape), "recovered": 0, "kept": 0}
    m = _draws(shape, 1, seed + 1)[0]
    direction = tn.direction(item[1], item[2], m)
    assert direction.shape == shape and direction.dtype == F64
    expected = _dense_direction(_normalise_reference(hs, shape), shape, eps, m)
    assert_close(direction, expected, what="TNT direction and the dense Kronecker solve")


def test_before_any_statistics_the_direction_is_the_vector():
    tn = TensorNormal()
    items = _items(tn, {"w": (2, 3, 4)})
    report = tn.refresh(items, solver=Cholesky(), damping=_constant(0.1))
    assert report["factors"] == 0
    m = torch.randn(2, 3, 4, dtype=F64)
    assert_close(tn.direction(items[0][1], items[0][2], m), m, rtol=0)


@given(data=st.data(), policy=st.sampled_from(["out_in_kernel", "out_rest", "as_is"]))
def test_reshape_policies_of_order_four_tensors(data, policy):
    o, i, kh, kw = (data.draw(st.integers(1, 3), label=n) for n in ("out", "in", "kh", "kw"))
    shape = (o, i, kh, kw)
    dims = {"out_in_kernel": (o, i, kh * kw), "out_rest": (o, i * kh * kw),
            "as_is": shape}[policy]
    tn = TensorNormal(reshape=policy)
    assert tn.dims(shape) == dims
    assert tn.dims((5, 4)) == (5, 4) and tn.dims((3, 2, 2)) == (3, 2, 2)  # others as they are
    (item,) = items = _items(tn, {"conv": shape})
    assert sorted(k for k in item[2] if k.startswith("tnt_H")) == \
        [f"tnt_H{j}" for j in range(len(dims))]
    for j, d in enumerate(dims):
        assert item[2][f"tnt_H{j}"].shape == (d, d)
    seed = data.draw(seeds(), label="seed")
    g = _draws(shape, 2, seed)
    tn.update(items, FakeStatistics({"conv": g}), ema=0.9)
    eps = data.draw(dampings(1e-1, 10.0), label="damping")
    tn.refresh(items, solver=Cholesky(), damping=_constant(eps))
    m = _draws(shape, 1, seed + 1)[0]
    hs = _mode_statistics_loop(g.reshape(2, *dims))  # row-major reshape: vec is unchanged
    expected = _dense_direction(_normalise_reference(hs, dims), dims, eps, m.reshape(dims))
    assert_close(tn.direction(item[1], item[2], m), expected.reshape(shape),
                 what=f"direction with reshape={policy}")


@given(shape=small_shapes(), max_dim=st.integers(1, 5), seed=seeds(),
       eps=dampings(1e-1, 10.0))
def test_max_dim_leaves_long_modes_unfactored(shape, max_dim, seed, eps):
    assume(any(d <= max_dim for d in shape))  # all-unfactored: tested separately below
    tn = TensorNormal(reshape="as_is", max_dim=max_dim)
    (item,) = items = _items(tn, {"w": shape})
    state = item[2]
    for j, d in enumerate(shape):
        assert (f"tnt_H{j}" in state) == (d <= max_dim)
        assert (f"tnt_inv{j}" in state) == (d <= max_dim)
    g = _draws(shape, 3, seed)
    tn.update(items, FakeStatistics({"w": g}), ema=0.9)
    tn.refresh(items, solver=Cholesky(), damping=_constant(eps))
    full = _mode_statistics_loop(g)
    hs = [h if d <= max_dim else None for h, d in zip(full, shape, strict=True)]
    m = _draws(shape, 1, seed + 1)[0]
    expected = _dense_direction(_normalise_reference(hs, shape), shape, eps, m)
    assert_close(tn.direction(item[1], state, m), expected,
                 what=f"direction with max_dim={max_dim}")


def test_a_tensor_with_every_mode_unfactored_moves_along_the_vector():
    tn = TensorNormal(max_dim=2)
    (item,) = items = _items(tn, {"b": (5,)})
    tn.update(items, FakeStatistics({"b": _draws((5,), 1, 0)}), ema=0.9)
    tn.refresh(items, solver=Cholesky(), damping=_constant(0.1))
    m = torch.randn(5, dtype=F64)
    assert_close(tn.direction(item[1], item[2], m), m, rtol=0)


def test_factors_of_equal_size_are_inverted_in_one_call():
    class Counting(Cholesky):
        def __init__(self):
            self.sizes = []

        def inverse_root(self, matrices, damping, power=1.0):
            self.sizes.append(tuple(matrices.shape))
            return super().inverse_root(matrices, damping, power)

    tn = TensorNormal()
    shapes = {"a": (3, 4), "b": (4,), "c": (3, 3, 2)}
    items = _items(tn, shapes)
    grads = {n: _draws(s, 2, i) for i, (n, s) in enumerate(shapes.items())}
    tn.update(items, FakeStatistics(grads), ema=0.9)
    solver = Counting()
    report = tn.refresh(items, solver=solver, damping=_constant(0.1))
    assert sorted(solver.sizes) == [(1, 2, 2), (2, 4, 4), (3, 3, 3)]
    assert report == {"factors": 6, "recovered": 0, "kept": 0}
    for name, _, state in items:  # and each still gets its own inverse
        hs = _mode_statistics_loop(grads[name])
        for j, u in enumerate(_normalise_reference(hs, shapes[name])):
            expected = torch.linalg.inv(u + 0.1 * torch.eye(u.shape[0], dtype=F64))
            assert_close(state[f"tnt_inv{j}"], expected, what=f"{name} inverse {j}")


# -- EMA, warm-start average, non-finite gradients ----------------------------------------------


def test_first_update_sets_the_statistics_then_ema():
    tn = TensorNormal()
    (item,) = items = _items(tn, {"w": (2, 3)})
    state = item[2]
    gs = [_draws((2, 3), 2, s) for s in range(3)]
    stats = [_mode_statistics_loop(g) for g in gs]
    tn.update(items, FakeStatistics({"w": gs[0]}), ema=0.7)
    for j in range(2):
        assert_close(state[f"tnt_H{j}"], stats[0][j], what="first update H = S")
    tn.update(items, FakeStatistics({"w": gs[1]}), ema=0.7)
    tn.update(items, FakeStatistics({"w": gs[2]}), ema=0.7)
    for j in range(2):
        expected = 0.7 * (0.7 * stats[0][j] + 0.3 * stats[1][j]) + 0.3 * stats[2][j]
        assert_close(state[f"tnt_H{j}"], expected, what="EMA of the statistics")
    assert state["tnt_updates"].item() == 3


def test_ema_zero_keeps_only_the_latest_statistics():
    tn = TensorNormal()
    (item,) = items = _items(tn, {"w": (3,)})
    for s in range(3):
        g = _draws((3,), 1, s)
        tn.update(items, FakeStatistics({"w": g}), ema=0.0)
        assert_close(item[2]["tnt_H0"], _mode_statistics_loop(g)[0])


def test_average_keeps_the_arithmetic_mean_then_ema_continues_from_it():
    tn = TensorNormal()
    (item,) = items = _items(tn, {"w": (2, 2, 3)})
    state = item[2]
    gs = [_draws((2, 2, 3), 1, s) for s in range(4)]
    stats = [_mode_statistics_loop(g) for g in gs]
    for g in gs[:3]:
        tn.update(items, FakeStatistics({"w": g}), ema=0.9, average=True)
    for j in range(3):
        mean = (stats[0][j] + stats[1][j] + stats[2][j]) / 3
        assert_close(state[f"tnt_H{j}"], mean, what="warm-start mean")
    # after a warm start the next ordinary update is an EMA step, not a reset
    tn.update(items, FakeStatistics({"w": gs[3]}), ema=0.9)
    for j in range(3):
        mean = (stats[0][j] + stats[1][j] + stats[2][j]) / 3
        assert_close(state[f"tnt_H{j}"], 0.9 * mean + 0.1 * stats[3][j])


@pytest.mark.parametrize("ema", [1.0, 1.5, -0.1])
def test_bad_ema_raises(ema):
    tn = TensorNormal()
    items = _items(tn, {"w": (2,)})
    with pytest.raises(ValueError, match="ema"):
        tn.update(items, FakeStatistics({"w": _draws((2,), 1, 0)}), ema=ema)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_leaves_that_state_unchanged(bad):
    tn = TensorNormal()
    items = _items(tn, {"w": (2, 3), "b": (3,)})
    tn.update(items, FakeStatistics({"w": _draws((2, 3), 1, 0), "b": _draws((3,), 1, 1)}),
              ema=0.9)
    tn.refresh(items, solver=Cholesky(), damping=_constant(0.1))
    before = {name: {k: v.clone() for k, v in st_.items() if isinstance(v, torch.Tensor)}
              for name, _, st_ in items}
    bad_w = _draws((2, 3), 1, 2)
    bad_w[0, 1, 2] = bad
    new_b = _draws((3,), 1, 3)
    tn.update(items, FakeStatistics({"w": bad_w, "b": new_b}), ema=0.9)
    tn.refresh(items, solver=Cholesky(), damping=_constant(0.1))
    (_, _, w_state), (_, _, b_state) = items
    for key, value in before["w"].items():
        assert torch.equal(w_state[key], value), key
    assert b_state["tnt_updates"].item() == 2
    expected = 0.9 * before["b"]["tnt_H0"] + 0.1 * _mode_statistics_loop(new_b)[0]
    assert_close(b_state["tnt_H0"], expected)


def test_parameters_without_statistics_are_left_alone():
    tn = TensorNormal()
    items = _items(tn, {"w": (2, 3), "frozen": (4,)})
    tn.update(items, FakeStatistics({"w": _draws((2, 3), 1, 0)}), ema=0.9)
    assert items[1][2]["tnt_updates"].item() == 0
    assert torch.equal(items[1][2]["tnt_H0"], torch.zeros(4, 4, dtype=F64))


def test_state_dtypes_are_float32_or_wider():
    tn = TensorNormal()
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (F64, F64)):
        p = nn.Parameter(torch.zeros(2, 3, dtype=dtype))
        state = tn.init_state(p)
        assert state["tnt_H0"].dtype == expected and state["tnt_inv1"].dtype == expected
        g = torch.randn(1, 2, 3).to(dtype)
        tn.update([("w", p, state)], FakeStatistics({"w": g}), ema=0.9)
        tn.refresh([("w", p, state)], solver=Cholesky(), damping=_constant(0.1))
        assert state["tnt_H0"].dtype == expected and state["tnt_inv0"].dtype == expected
        assert tn.direction(p, state, torch.ones(2, 3, dtype=dtype)).dtype == dtype


def test_options_are_checked():
    with pytest.raises(ValueError, match="reshape"):
        TensorNormal(reshape="flatten")
    with pytest.raises(ValueError, match="max_dim"):
        TensorNormal(max_dim=0)
    tn = TensorNormal()
    assert tn.covers(nn.Parameter(torch.zeros(3)))
    assert not tn.covers(nn.Parameter(torch.zeros(())))


# -- statistics: the estimator recovers known covariance factors -------------------------------


def _factor(d: int, gen: torch.Generator) -> torch.Tensor:
    """A lower-triangular ``L`` with ``U = L Lᵀ`` well away from a multiple of I."""
    low = torch.tril(torch.randn(d, d, generator=gen, dtype=F64), -1) * 0.7
    return low + torch.diag(0.5 + torch.rand(d, generator=gen, dtype=F64) * 1.5)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4), (2, 3, 2, 2)])
def test_the_estimator_recovers_tensor_normal_factors(shape):
    r"""``G = Z ×_1 L_1 ×_2 … ×_k L_k`` with ``Z`` standard normal has
    ``vec(G) ~ N(0, U_1 ⊗ … ⊗ U_k)``, ``U_i = L_i L_iᵀ``, and
    ``E[mat_i(G) mat_i(G)ᵀ] = E_i = U_i ∏_{j≠i} tr U_j`` (paper eq. (2)).

    Tolerance. With ``N`` draws the mode statistic ``Ĝ_i`` has
    ``E‖Ĝ_i − E_i‖²_F = σ_i² = (1/N) ∏_{j≠i} tr(U_j²) · ((tr U_i)² + tr(U_i²))`` (a sum of
    ``w_c L_i z_c z_cᵀ L_iᵀ`` with ``z_c`` iid standard normal and ``Σ w_c² = ∏ tr U_j²``), so
    by Markov ``‖Ĝ_i − E_i‖_F ≤ z σ_i`` fails with probability below ``1/z²``. The comparison
    is scale-free: ``f(A) = d_i A / tr A`` (mean eigenvalue 1), for which
    ``‖f(Ĝ) − f(E)‖/‖f(E)‖ ≤ (1 + √d_i) ‖Ĝ − E‖/‖E‖`` to first order. With ``z = 4`` and
    ``N = 40000`` the bound is a few percent; the seeds are fixed, so the test is
    deterministic. The product ``⊗ Ũ_i`` (``c = 1``) must also recover ``F = ⊗ U_i`` itself,
    to the sum of the factors' bounds (its trace is ``tr Ĝ``, which errs by less than any
    factor).
    """
    n, z = 40_000, 4.0
    gen = torch.Generator().manual_seed(1234 + len(shape))
    ls = [_factor(d, gen) for d in shape]
    us = [low @ low.T for low in ls]
    k = len(shape)
    letters = "abcd"[:k]
    g = torch.randn(n, *shape, generator=gen, dtype=F64)
    for i, low in enumerate(ls):  # G ×_i L_i
        g = torch.einsum(f"n{letters},X{letters[i]}->n{letters.replace(letters[i], 'X')}", g,
                         low)
    # through the structure: the N draws are the S draws of one statistics update
    tn = TensorNormal(reshape="as_is")
    (item,) = items = _items(tn, {"w": shape})
    tn.update(items, FakeStatistics({"w": g}), ema=0.9)
    hs = [item[2][f"tnt_H{i}"] for i in range(k)]
    tilde = normalise(hs, shape)
    bounds = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        e_i = us[i] * math.prod(torch.trace(us[j]) for j in others)
        sigma = math.sqrt(math.prod(torch.trace(us[j] @ us[j]).item() for j in others)
                          * (torch.trace(us[i]).item() ** 2 + torch.trace(us[i] @ us[i]).item())
                          / n)
        bound = z * (1 + math.sqrt(shape[i])) * sigma / torch.linalg.norm(e_i).item()
        bounds.append(bound)
        assert_close(hs[i], e_i, rtol=z * sigma / torch.linalg.norm(e_i).item(),
                     what=f"mode-{i} statistic and U_i ∏ tr U_j")
        scaled = tilde[i] * shape[i] / torch.trace(tilde[i])
        target = us[i] * shape[i] / torch.trace(us[i])
        assert_close(scaled, target, rtol=bound,
                     what=f"Ũ_{i} and U_{i}, each over its mean eigenvalue")
        # the bound discriminates: an estimator returning the identity would fail it
        assert relative_error(torch.eye(shape[i], dtype=F64), target) > 2 * bound
    kron_est, kron_true = tilde[0], us[0]
    for i in range(1, k):
        kron_est, kron_true = torch.kron(kron_est, tilde[i]), torch.kron(kron_true, us[i])
    assert_close(kron_est, kron_true, rtol=sum(bounds) * 1.5,
                 what="⊗ Ũ_i (c = 1) and the true Fisher ⊗ U_i")
    assert max(bounds) < 0.15  # the tolerance is tight enough to mean something
