"""Solvers and the recovery policy against dense float64 references.

Tolerances. A backward-stable inverse of a matrix with condition number κ has a relative
forward error of about ``c·d·κ·u`` (``u = 2.2e-16``, ``d ≤ 8``). The SPD matrices drawn here
have ``κ ≤ 1e4`` (and the damping only lowers it), so two stable computations agree to
about ``1e-11``; ``rtol = 1e-10`` leaves a margin of ten. The coupled Newton iteration is not
backward stable (its round-off grows with κ and the number of iterations) and it stops at
``‖A_j − I‖_max < 1e-12``; measured errors stay below ``1e-12·κ``, and it is checked to
``1e-11·κ`` (``κ`` of the damped matrix).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.solvers import Cholesky, Eigh, InverseResult, Newton, Solver, robust_inverse
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import dampings, seeds, spd_matrices

F64 = torch.float64
MAX_CONDITION = 1e4  # see the module docstring: rtol 1e-10 ≥ 10·d·κ·u
SOLVERS = {"cholesky": Cholesky(), "eigh": Eigh(), "newton": Newton()}


def _eye(d: int, dtype=F64) -> torch.Tensor:
    return torch.eye(d, dtype=dtype)


def _damp(eps: float, b: int = 1) -> torch.Tensor:
    return torch.full((b,), eps, dtype=F64)


@st.composite
def spectral(draw, max_size: int = 8, max_condition: float = MAX_CONDITION):
    """An SPD matrix with its eigendecomposition ``(A, Q, e)`` built here, so the dense
    reference ``Q diag(f(e)) Qᵀ`` does not go through any eigensolver."""
    n = draw(st.integers(1, max_size))
    gen = torch.Generator().manual_seed(draw(seeds()))
    log_kappa = draw(st.floats(0.0, math.log10(max_condition)))
    scale = 10.0 ** draw(st.floats(-3.0, 2.0))
    u = torch.rand(n, generator=gen, dtype=F64).sort().values
    u[0] = 0.0
    if n >= 2:
        u[-1] = 1.0
    e = scale * 10.0 ** (log_kappa * u)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * e) @ q.T
    return (a + a.T) / 2, q, e


def _power_reference(q: torch.Tensor, e: torch.Tensor, eps: float, power: float):
    """``(A + εI)^{-1/p} = Q diag((e + ε)^{-1/p}) Qᵀ`` from the known eigenpairs."""
    return (q * (e + eps) ** (-1.0 / power)) @ q.T


# -- each solver against its dense definition -------------------------------------------------


@given(a=spd_matrices(max_condition=MAX_CONDITION), eps=dampings())
def test_cholesky_equals_the_dense_damped_inverse(a, eps):
    inv, ok = Cholesky().inverse_root(a[None], _damp(eps))
    assert ok.tolist() == [True]
    assert inv.dtype == F64 and inv.shape == (1, *a.shape)
    expected = torch.linalg.inv(a + eps * _eye(a.shape[0]))
    assert_close(inv[0], expected, what="cholesky inverse and torch.linalg.inv")


@given(a=spd_matrices(max_condition=MAX_CONDITION), eps=dampings())
def test_eigh_power_one_equals_the_dense_damped_inverse(a, eps):
    inv, ok = Eigh().inverse_root(a[None], _damp(eps), 1.0)
    assert ok.tolist() == [True]
    expected = torch.linalg.inv(a + eps * _eye(a.shape[0]))
    assert_close(inv[0], expected, what="eigh inverse and torch.linalg.inv")


@given(case=spectral(), eps=dampings(), power=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0]))
def test_eigh_any_power_equals_the_dense_power(case, eps, power):
    a, q, e = case
    root, ok = Eigh().inverse_root(a[None], _damp(eps), power)
    assert ok.tolist() == [True]
    assert_close(root[0], _power_reference(q, e, eps, power),
                 what=f"eigh (A+εI)^(-1/{power}) and Q diag((e+ε)^(-1/p)) Qᵀ")
    if float(power).is_integer():  # the defining identity, independently of the eigenpairs
        back = torch.linalg.matrix_power(root[0], int(power)) @ (a + eps * _eye(a.shape[0]))
        kappa = ((e.max() + eps) / (e.min() + eps)).item()
        assert_close(back, _eye(a.shape[0]), atol=1e-13 * kappa * power * a.shape[0],
                     what="R^p (A+εI) and I")


@given(case=spectral(), eps=dampings(), power=st.integers(1, 4))
def test_newton_matches_eigh_for_integer_powers(case, eps, power):
    a, q, e = case
    kappa = ((e.max() + eps) / (e.min() + eps)).item()
    root, ok = Newton().inverse_root(a[None], _damp(eps), power)
    assert ok.tolist() == [True]
    reference, _ = Eigh().inverse_root(a[None], _damp(eps), power)
    # Not backward stable: see the module docstring for 1e-11·κ.
    assert_close(root[0], reference[0], rtol=1e-11 * kappa + 1e-12,
                 what=f"newton and eigh (power {power}, κ={kappa:.1e})")
    assert_close(root[0], _power_reference(q, e, eps, power), rtol=1e-11 * kappa + 1e-12,
                 what="newton and the dense power")


@given(
    data=st.data(),
    name=st.sampled_from(sorted(SOLVERS)),
    d=st.integers(1, 6),
    b=st.integers(1, 5),
)
def test_a_batch_equals_one_matrix_at_a_time(data, name, d, b):
    mats = torch.stack([data.draw(spd_matrices(sizes=st.just(d), max_condition=MAX_CONDITION))
                        for _ in range(b)])
    eps = torch.tensor([data.draw(dampings()) for _ in range(b)], dtype=F64)
    power = 1.0 if name == "cholesky" else float(data.draw(st.integers(1, 3)))
    solver = SOLVERS[name]
    batched, ok = solver.inverse_root(mats, eps, power)
    assert ok.shape == (b,) and ok.dtype == torch.bool and bool(ok.all())
    for i in range(b):
        single, ok_i = solver.inverse_root(mats[i:i + 1], eps[i:i + 1], power)
        assert bool(ok_i.all())
        # Newton iterates until every matrix of the batch has converged, so a batch may take
        # a few more (harmless) iterations than a single matrix: equal to round-off only.
        assert_close(batched[i], single[0], rtol=1e-10, what=f"{name}: batch entry {i}")


def test_inputs_are_not_modified():
    a = torch.tensor([[[2.0, 1.0], [0.5, 3.0]]], dtype=F64)  # not even symmetric
    before = a.clone()
    eps = _damp(0.1)
    for name, solver in SOLVERS.items():
        solver.inverse_root(a, eps, 1.0)
        assert torch.equal(a, before), name
        assert torch.equal(eps, _damp(0.1)), name


def test_a_nonsymmetric_input_is_symmetrised():
    """Round-off makes statistics slightly nonsymmetric: solvers use ``(A + Aᵀ)/2``."""
    a = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=F64)
    sym = (a + a.T) / 2
    for name, solver in SOLVERS.items():
        inv, ok = solver.inverse_root(a[None], _damp(0.1), 1.0)
        assert bool(ok.all()), name
        assert_close(inv[0], torch.linalg.inv(sym + 0.1 * _eye(2)), rtol=1e-10, what=name)


# -- ok semantics and errors ------------------------------------------------------------------


def test_ok_is_false_exactly_where_a_factor_fails():
    good = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    indefinite = -_eye(3)
    mats = torch.stack([good, indefinite, good])
    eps = _damp(1e-3, 3)
    inv, ok = Cholesky().inverse_root(mats, eps)
    assert ok.tolist() == [True, False, True]
    assert_close(inv[0], torch.linalg.inv(good + 1e-3 * _eye(3)))
    assert_close(inv[2], inv[0], rtol=0)
    # eigh clips negative eigenvalues (round-off of a PSD matrix) to zero, then damps:
    inv, ok = Eigh().inverse_root(mats, eps)
    assert ok.tolist() == [True, True, True]
    assert_close(inv[1], _eye(3) / 1e-3)
    # ... but with no damping a singular matrix has no inverse:
    _, ok = Eigh().inverse_root(torch.zeros(1, 3, 3, dtype=F64), _damp(0.0))
    assert ok.tolist() == [False]
    # Newton diverges on a negative definite matrix and says so:
    _, ok = Newton().inverse_root(mats, eps, 2)
    assert ok.tolist() == [True, False, True]


def test_newton_reports_no_convergence_within_max_iter():
    a = torch.diag(torch.logspace(-6, 0, 6, dtype=F64))[None]
    _, ok = Newton(max_iter=2).inverse_root(a, _damp(0.0), 2)
    assert ok.tolist() == [False]
    _, ok = Newton(max_iter=200).inverse_root(a, _damp(0.0), 2)
    assert ok.tolist() == [True]


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_matrix_is_not_ok_and_raises_nothing(name, bad):
    a = torch.stack([_eye(3), _eye(3)])
    a[1, 0, 1] = a[1, 1, 0] = bad
    _, ok = SOLVERS[name].inverse_root(a, _damp(0.1, 2), 1.0)
    assert ok.tolist() == [True, False]


def test_cholesky_refuses_other_powers():
    with pytest.raises(ValueError, match="power 1"):
        Cholesky().inverse_root(_eye(2)[None], _damp(0.1), 2.0)
    assert Cholesky().supports(1.0) and not Cholesky().supports(2.0)


@pytest.mark.parametrize("power", [0.5, 1.5, 0.0, -1.0])
def test_newton_refuses_non_integer_powers(power):
    with pytest.raises(ValueError, match="integer power"):
        Newton().inverse_root(_eye(2)[None], _damp(0.1), power)
    assert not Newton().supports(power)
    assert Newton().supports(3.0)


@pytest.mark.parametrize("power", [0.0, -2.0])
def test_eigh_refuses_non_positive_powers(power):
    with pytest.raises(ValueError, match="positive"):
        Eigh().inverse_root(_eye(2)[None], _damp(0.1), power)


# -- robust_inverse ---------------------------------------------------------------------------


class Spy(Solver):
    """Wraps a solver and records every batch it is asked to factorise."""

    name = "spy"

    def __init__(self, inner: Solver):
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def inverse_root(self, matrices, damping, power=1.0):
        self.calls.append((matrices.clone(), damping.clone()))
        return self.inner.inverse_root(matrices, damping, power)


def _flags(result: InverseResult) -> list[str]:
    names = []
    for ok, rec, kept in zip(result.ok.tolist(), result.recovered.tolist(),
                             result.kept.tolist(), strict=True):
        assert ok + rec + kept == 1, "exactly one of ok / recovered / kept per matrix"
        names.append("ok" if ok else "recovered" if rec else "kept")
    return names


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_matrix_is_not_factorised_and_keeps_previous(bad):
    good = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    mats = torch.stack([good, good.clone(), good.clone()])
    mats[1, 1, 1] = bad
    previous = torch.stack([_eye(2) * 7, _eye(2) * 8, _eye(2) * 9])
    saved = previous.clone()
    spy = Spy(Cholesky())
    result = robust_inverse(spy, mats, 0.5, previous=previous)
    assert _flags(result) == ["ok", "kept", "ok"]
    for seen, _ in spy.calls:
        assert torch.isfinite(seen).all(), "a non-finite matrix reached the solver"
    assert torch.equal(result.inverse[1], saved[1])
    assert_close(result.inverse[0], torch.linalg.inv(good + 0.5 * _eye(2)))
    assert torch.equal(previous, saved)
    result.inverse[1].fill_(-1.0)  # the result does not alias previous
    assert torch.equal(previous, saved)
    assert result.damping.tolist() == [0.5, 0.5, 0.5]


def test_without_previous_a_failure_gives_the_damped_identity():
    mats = torch.full((1, 3, 3), float("nan"), dtype=F64)
    for power in (1.0, 2.0):
        result = robust_inverse(Eigh(), mats, 0.25, power=power)
        assert _flags(result) == ["kept"]
        assert_close(result.inverse[0], _eye(3) * 0.25 ** (-1.0 / power))


def test_negative_identity_is_recovered_by_raising_the_damping():
    """``−I + εI`` is not PD until ``ε > 1``: with ε = 0.02 the tries are 0.02 (float64),
    0.2, 2 — the third succeeds, so the inverse is ``(−I + 2I)⁻¹ = I`` and damping is 2."""
    mats = torch.stack([-_eye(3), torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))])
    previous = torch.stack([_eye(3) * 5, _eye(3) * 6])
    saved = previous.clone()
    spy = Spy(Cholesky())
    result = robust_inverse(spy, mats, torch.tensor([0.02, 0.02], dtype=F64), previous=previous,
                            retries=3)
    assert _flags(result) == ["recovered", "ok"]
    assert result.damping.tolist() == pytest.approx([2.0, 0.02], rel=1e-15)
    assert_close(result.inverse[0], _eye(3))
    assert torch.equal(previous, saved)
    tried = [d.tolist() for _, d in spy.calls]
    assert tried[0] == pytest.approx([0.02, 0.02])  # the first, batched attempt
    assert [t[0] for t in tried[1:]] == pytest.approx([0.02, 0.2, 2.0])  # retries, float64


def test_an_indefinite_matrix_with_tiny_damping_keeps_the_previous_inverse():
    """ε = 1e-3: the tries 1e-3 (float64), 1e-2, 1e-1, 1 all leave ``−2I + εI`` indefinite."""
    previous = (_eye(3) * 4)[None]
    saved = previous.clone()
    result = robust_inverse(Cholesky(), -2 * _eye(3)[None], 1e-3, previous=previous,
                            retries=3)
    assert _flags(result) == ["kept"]
    assert torch.equal(result.inverse, saved)
    assert torch.equal(previous, saved)
    assert result.inverse.data_ptr() != previous.data_ptr()
    assert result.damping.tolist() == [1e-3]  # nothing worked: the damping is unchanged
    # one more retry reaches ε = 10 and succeeds: (−2I + 10I)⁻¹ = I/8
    result = robust_inverse(Cholesky(), -2 * _eye(3)[None], 1e-3, previous=previous,
                            retries=4)
    assert _flags(result) == ["recovered"]
    assert result.damping.tolist() == pytest.approx([10.0], rel=1e-15)
    assert_close(result.inverse[0], _eye(3) / 8)
    assert torch.equal(previous, saved)


# An exactly zero pivot (A = 0 with ε = 0, −I with ε = 1) must come back as ok=False (not
# raise from cholesky_inverse), so that robust_inverse can recover or keep the previous one.


def test_cholesky_reports_an_exactly_singular_matrix_as_not_ok():
    _, ok = Cholesky().inverse_root(torch.zeros(1, 3, 3, dtype=F64), _damp(0.0))
    assert ok.tolist() == [False]


def test_negative_identity_with_tiny_damping_is_kept():
    """ε = 1e-3: the tries 1e-3, 1e-2, 1e-1, 1 leave ``−I + εI`` indefinite, then exactly 0."""
    previous = (_eye(3) * 4)[None]
    result = robust_inverse(Cholesky(), -_eye(3)[None], 1e-3, previous=previous, retries=3)
    assert _flags(result) == ["kept"]
    assert torch.equal(result.inverse, previous)


class Float32Fails(Solver):
    """Cholesky, but every float32 attempt reports failure (as round-off can make it do)."""

    name = "float32_fails"

    def __init__(self):
        self.dtypes: list[torch.dtype] = []

    def inverse_root(self, matrices, damping, power=1.0):
        self.dtypes.append(matrices.dtype)
        inv, ok = Cholesky().inverse_root(matrices, damping, power)
        return inv, ok & (matrices.dtype != torch.float32)


def test_float64_retry_recovers_a_float32_failure_without_changing_the_damping():
    mats = torch.stack([torch.eye(3) * 2, torch.eye(3) * 4])
    solver = Float32Fails()
    result = robust_inverse(solver, mats, torch.tensor([0.5, 1.0]))
    assert solver.dtypes == [torch.float32, torch.float64]
    assert _flags(result) == ["recovered", "recovered"]
    assert result.damping.tolist() == [0.5, 1.0]
    assert result.inverse.dtype == torch.float32
    assert_close(result.inverse, torch.stack([torch.eye(3) / 2.5, torch.eye(3) / 5]), rtol=1e-7,
                 what="float32 result of the float64 retry")


def test_a_rank_one_float32_factor_with_damping_below_its_resolution_is_recovered():
    """``ones(4,4) + 1e-10 I`` rounds to the singular ``ones`` in float32 (an exactly zero
    pivot) and is PD in float64: the float64 retry should recover it."""
    result = robust_inverse(Cholesky(), torch.ones(1, 4, 4), 1e-10)
    assert _flags(result) == ["recovered"]
    assert result.damping.tolist() == [1e-10]


@st.composite
def symmetric_matrices(draw):
    """Symmetric matrices with eigenvalues in [−1, 1] (some indefinite, some PD)."""
    n = draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(seeds()))
    e = torch.rand(n, generator=gen, dtype=F64) * 2 - 1
    if draw(st.booleans()):
        e = e.abs() + 0.1
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = (q * e) @ q.T
    return (a + a.T) / 2, e


@given(data=st.data(), b=st.integers(1, 4), retries=st.integers(0, 4))
def test_robust_inverse_reports_the_damping_it_used(data, b, retries):
    drawn = [data.draw(symmetric_matrices()) for _ in range(b)]
    d = max(a.shape[0] for a, _ in drawn)
    # pad to a common size with a PD block (the eigenvalue 1 changes nothing below)
    mats, lows = [], []
    for a, e in drawn:
        m = _eye(d).clone()
        m[:a.shape[0], :a.shape[0]] = a
        mats.append(m)
        lows.append(min(e.min().item(), 1.0))
    mats = torch.stack(mats)
    eps = torch.tensor([data.draw(dampings(1e-4, 1.0)) for _ in range(b)], dtype=F64)
    previous = torch.randn(b, d, d, dtype=F64)
    saved_prev, saved_mats = previous.clone(), mats.clone()
    result = robust_inverse(Cholesky(), mats, eps, previous=previous, retries=retries)
    flags = _flags(result)
    assert torch.equal(previous, saved_prev) and torch.equal(mats, saved_mats)
    for i, flag in enumerate(flags):
        used = result.damping[i].item()
        margin = 1e-9  # eigenvalues this close to −ε are left to the solver's judgement
        if flag == "kept":
            assert torch.equal(result.inverse[i], saved_prev[i])
            assert used == eps[i].item()
            assert lows[i] + eps[i].item() * 10.0**retries < margin
            continue
        # the inverse is that of A + (reported damping)·I (residual ≲ d·κ·u)
        damped = mats[i] + used * _eye(d)
        kappa = torch.linalg.cond(damped).item()
        assert_close(result.inverse[i] @ damped, _eye(d), atol=1e-14 * d * kappa,
                     what=f"inverse × (A + used·I), matrix {i}")
        k = round(math.log10(used / eps[i].item()))
        assert used == pytest.approx(eps[i].item() * 10.0**k, rel=1e-12)
        assert 0 <= k <= retries
        if flag == "ok":
            assert k == 0 and lows[i] + used > -margin
        elif k > 0:  # the smallest damping that worked: the previous one did not
            assert lows[i] + used / 10 < margin


def test_robust_inverse_accepts_a_scalar_or_per_matrix_damping():
    mats = torch.stack([_eye(2) * 2, _eye(2) * 3])
    a = robust_inverse(Cholesky(), mats, 0.5)
    b = robust_inverse(Cholesky(), mats, torch.tensor([0.5, 0.5]))
    assert torch.equal(a.inverse, b.inverse)
    assert a.damping.dtype == F64 and a.damping.shape == (2,)
    c = robust_inverse(Cholesky(), mats, torch.tensor([0.5, 1.0], dtype=F64))
    assert_close(c.inverse[1], _eye(2) / 4)
