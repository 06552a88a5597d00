"""``smw``: the per-batch damped Fisher direction against a dense float64 computation.

The reference is written from the definitions, not from the push-through form: per block
(a layer's weight and bias together, one tensor, or the whole model) it slices the per-sample
gradients of :func:`curvlib.testing.oracles.per_sample_grads` (``torch.func``), forms the
dense ``F = UUᵀ/R`` and solves ``(F + λI) d = g`` with ``torch.linalg.solve`` (through
:func:`oracles.natural_gradient`). ``λ`` is ``α‖UᵀU‖_F`` (frobenius rule) or the constant.
Everything is float64; tolerances are 1e-10 relative except where noted: the dense solve
in P dimensions and the M-dimensional Cholesky solve round differently, by about
``cond(F + λI)·u``, and the drawn dampings keep that below 1e-10 relative.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.layers.linear import PatchPlugin
from curvlib.optim import CompatibilityError
from curvlib.solvers import Cholesky, Eigh, robust_solve
from curvlib.sources import GramSource, TrueFisher
from curvlib.structures import SMW
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import examples, problems, seeds

F64 = torch.float64


# -- the dense reference -----------------------------------------------------------------------


def owner_blocks(model: nn.Module, how: str) -> list[list[int]]:
    """Index lists (into model.parameters() order) of each block."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if how == "tensor":
        return [[i] for i in range(len(names))]
    if how == "model":
        return [list(range(len(names)))]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.rpartition(".")[0], []).append(i)
    return list(groups.values())


def dense_direction(model, rows, grad, how, rule, value, scale, include=None):
    """Per block: λ·(λI + UUᵀ/R)⁻¹g ("sgd") or (λI + UUᵀ/R)⁻¹g ("natural"), dense.

    ``rows`` is (R, P) per-sample gradients, ``grad`` (P,) the data gradient; ``include``
    the parameter indices covered (others are left as the plain gradient).
    """
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    params = list(range(len(sizes))) if include is None else include
    out = grad.clone()
    for block in owner_blocks(model, how):
        block = [i for i in block if i in params]
        if not block:
            continue
        idx = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in block])
        u = rows[:, idx]
        r = u.shape[0]
        k = u @ u.T
        lam = value * torch.linalg.matrix_norm(k).item() if rule == "frobenius" else value
        if not u.any():  # no gradient in this block (U = 0, so g = 0): it does not move
            out[idx] = 0.0
            continue
        d = oracles.natural_gradient(u.T @ u / r, grad[idx], lam)
        out[idx] = lam * d if scale == "sgd" else d
    return out


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


# -- the identity itself -------------------------------------------------------------------------


@given(p=st.integers(1, 12), m=st.integers(1, 8), lam=st.floats(1e-3, 1e2), seed=seeds())
def test_push_through_identity(p, m, lam, seed):
    """(λI + UUᵀ/M)⁻¹ (U1/M) = U (UᵀU + λM I)⁻¹ 1 (FNGD eq. 9, simplified)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(p, m, generator=gen, dtype=F64)
    ones = torch.ones(m, dtype=F64)
    lhs = torch.linalg.solve(lam * torch.eye(p, dtype=F64) + u @ u.T / m, u @ ones / m)
    rhs = u @ torch.linalg.solve(u.T @ u + lam * m * torch.eye(m, dtype=F64), ones)
    assert_close(rhs, lhs, rtol=1e-9, what="push-through form")


# -- data targets ------------------------------------------------------------------------------


@settings(max_examples=examples(0.2))
@given(problem=problems(), how=st.sampled_from(["layer", "tensor", "model"]),
       rule=st.sampled_from(["frobenius", "constant"]), scale=st.sampled_from(["sgd", "natural"]),
       value=st.floats(0.05, 10.0))
def test_smw_equals_dense_damped_empirical_fisher(problem, how, rule, scale, value):
    model = problem.model
    opt = curvlib.assemble(model, problem.likelihood, source="gram",
                           structure=SMW(blocks=how, scale=scale), damping_rule=rule,
                           lr=0.1, damping=value, momentum=0.0)
    opt.zero_grad()
    opt.backward(model(problem.inputs), problem.targets)
    rows = oracles.per_sample_grads(model, problem.likelihood, problem.inputs, problem.targets)
    expected = dense_direction(model, rows, rows.mean(0), how, rule, value, scale)
    assert_close(flat_grads(model), expected, rtol=1e-9, what="smw direction")
    # the step moves along it
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    after = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(),
                                                                   strict=True)])
    assert_close(after, 0.1 * expected, rtol=1e-9, what="step")


class Scaled(nn.Module):
    """y = x * weight + shift: no registered plugin (the generic one handles it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=F64))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, d, dtype=F64))

    def forward(self, x):
        return x * self.weight + self.shift


def generic_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Scaled(5), nn.LayerNorm(5),
                         nn.Linear(5, 3)).to(F64)


@settings(max_examples=examples(0.075))
@given(seed=seeds(), n=st.integers(1, 6), value=st.floats(0.05, 5.0),
       cover=st.sampled_from(["all", "registered"]))
def test_smw_generic_blocks_and_plain_parameters(seed, n, value, cover):
    """cover='all': the Scaled and LayerNorm blocks go through the generic plugin;
    cover='registered': they get the plain mean gradient."""
    model = generic_model(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    opt = curvlib.assemble(model, "categorical", source="gram", structure=SMW(cover=cover),
                           lr=0.1, damping=value, momentum=0.0)
    opt.zero_grad()
    opt.backward(model(x), y)
    rows = oracles.per_sample_grads(model, "categorical", x, y)
    names = [name for name, _ in model.named_parameters()]
    include = None if cover == "all" else [i for i, name in enumerate(names)
                                           if name.startswith(("0.", "4."))]
    expected = dense_direction(model, rows, rows.mean(0), "layer", "frobenius", value, "sgd",
                               include)
    assert_close(flat_grads(model), expected, rtol=1e-9, what=f"cover={cover}")


def test_registered_layers_never_materialise_per_sample_gradients(monkeypatch):
    """smw's direction and Gram for Linear and Conv go through contractions and the weighted
    gradient; a per-sample gradient request would raise here."""
    def forbidden(self, module, calls):
        raise AssertionError("per-sample gradients were materialised")

    monkeypatch.setattr(PatchPlugin, "per_sample_grads", forbidden)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 4))
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    for structure in ("smw", curvlib.structures.CoefficientSharing(steps_per_epoch=1)):
        opt = curvlib.assemble(model, "categorical", source="gram", structure=structure,
                               lr=0.1, damping=1.0)
        for _ in range(2):  # with sharing: one refresh, one shared step
            opt.zero_grad()
            opt.backward(model(x), y)
            opt.step()
        opt.close()


# -- sampled targets -----------------------------------------------------------------------------


@settings(max_examples=examples(0.125))
@given(problem=problems(kinds=("mlp", "cnn1d")), draws=st.integers(1, 2),
       scale=st.sampled_from(["sgd", "natural"]), value=st.floats(0.05, 10.0),
       how=st.sampled_from(["layer", "tensor"]), per_sample_source=st.booleans())
def test_smw_sampled_targets_equals_dense_woodbury(problem, draws, scale, value, how,
                                                   per_sample_source):
    """Sampled rows U (R = S·M of them) and the data gradient g: (λI + UUᵀ/R)⁻¹g."""
    model = problem.model
    source = (TrueFisher(num_samples=draws, per_sample=True) if per_sample_source
              else GramSource(targets="sampled", num_samples=draws))
    gen = torch.Generator().manual_seed(problem.seed)
    opt = curvlib.assemble(model, problem.likelihood, source=source,
                           structure=SMW(blocks=how, scale=scale), lr=0.1, damping=value,
                           momentum=0.0, generator=gen)
    replay = torch.Generator().manual_seed(problem.seed)
    opt.zero_grad()
    outputs = model(problem.inputs)
    lik = curvlib.as_likelihood(problem.likelihood)
    sampled = [lik.sample(outputs.detach(), generator=replay) for _ in range(draws)]
    opt.backward(outputs, problem.targets)
    rows = torch.cat([oracles.per_sample_grads(model, lik, problem.inputs, y) for y in sampled])
    g = oracles.gradient(model, lik, problem.inputs, problem.targets)
    expected = dense_direction(model, rows, g, how, "frobenius", value, scale)
    assert_close(flat_grads(model), expected, rtol=1e-9, what="sampled smw direction")


# -- robustness and errors ---------------------------------------------------------------------


def small_mlp(dtype=F64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def test_a_non_finite_block_skips_the_whole_step():
    """The non-finite policy (curvlib.optim): a block that cannot be solved rejects the
    batch; the step that follows changes nothing and is counted in ``skipped_steps``."""
    model = small_mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    opt = curvlib.assemble(model, "categorical", source="gram", structure="smw", lr=0.1,
                           damping=1.0, momentum=0.0)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")  # the last layer's Gram is not finite
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="step is skipped"):
        loss = opt.backward(model(x), y)
    assert opt.last_refresh["skipped"] >= 1 and torch.isnan(loss)
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_keep_float32_coefficients(dtype):
    model = small_mlp(dtype)
    x, y = torch.randn(6, 3).to(dtype), torch.randint(0, 2, (6,))
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, steps_per_epoch=1)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    assert all(p.grad.dtype == dtype for p in model.parameters())
    stored = opt.structure_state["positions"][0]["coefficients"]
    assert all(c.dtype == F64 for c in stored.values())


def test_errors_are_clear():
    model = small_mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="damping must be positive"):  # at construction
        curvlib.assemble(model, "categorical", source="gram", structure="smw", lr=0.1,
                         damping=0.0)
    opt = curvlib.assemble(model, "categorical", source="gram", structure="smw", lr=0.1,
                           damping=1.0)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"loss\.backward"):
        opt.step()
    with pytest.raises(TypeError, match="keeps none"):
        opt.warm_start([(x, y)])
    with pytest.raises(CompatibilityError, match="gram"):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="smw")
    tnt = curvlib.TNT(model, "categorical", lr=0.1, damping=1.0)
    with pytest.raises(TypeError, match="key="):
        tnt.backward(model(x), y, key=0)


# -- the solve and the damping rule ------------------------------------------------------------


@settings(max_examples=examples(0.15))
@given(b=st.integers(1, 3), m=st.integers(1, 6), lam=st.floats(1e-4, 1e2), seed=seeds(),
       solver=st.sampled_from([Cholesky(), Eigh()]))
def test_robust_solve_matches_dense_solve(b, m, lam, seed, solver):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, m, m + 1, generator=gen, dtype=F64)
    a = u @ u.transpose(1, 2)
    rhs = torch.randn(b, m, generator=gen, dtype=F64)
    result = robust_solve(solver, a, lam, rhs)
    expected = torch.linalg.solve(a + lam * torch.eye(m, dtype=F64), rhs)
    assert result.ok.all() and not result.failed.any()
    assert_close(result.solution, expected, rtol=1e-9, what=f"{solver!r} solve")


def test_robust_solve_reports_non_finite_and_singular():
    a = torch.zeros(3, 2, 2, dtype=F64)
    a[0] = torch.eye(2)
    a[1, 0, 0] = float("nan")
    rhs = torch.ones(3, 2, dtype=F64)
    result = robust_solve(Cholesky(), a, torch.tensor([0.0, 1.0, 0.0], dtype=F64), rhs)
    assert result.ok.tolist() == [True, False, False]
    assert result.failed.tolist() == [False, True, True]  # a zero matrix with zero damping
    assert torch.equal(result.solution[1:], torch.zeros(2, 2, dtype=F64))


def test_frobenius_damping_is_alpha_times_the_norm():
    mats = torch.randn(4, 3, 3, dtype=F64)
    got = curvlib.damping.Frobenius()(0.3, mats)
    expected = torch.tensor([0.3 * math.sqrt((m**2).sum().item()) for m in mats], dtype=F64)
    assert_close(got, expected, rtol=1e-14)


def test_robust_solve_recovers_by_raising_the_damping():
    """A matrix with eigenvalue −1e-3: damping 1e-4 and 1e-3 fail (not positive definite),
    1e-2 succeeds; the solution is that of the dense damped system at the damping used."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=F64))
    a = (q @ torch.diag(torch.tensor([-1e-3, 1.0, 2.0], dtype=F64)) @ q.T).unsqueeze(0)
    rhs = torch.ones(1, 3, dtype=F64)
    result = robust_solve(Cholesky(), a, 1e-4, rhs)
    assert not result.ok.item() and result.recovered.item() and not result.failed.item()
    assert result.damping.item() == pytest.approx(1e-2, rel=1e-12)
    expected = torch.linalg.solve(a[0] + 1e-2 * torch.eye(3, dtype=F64), rhs[0])
    assert_close(result.solution[0], expected, rtol=1e-10, what="recovered solve")
