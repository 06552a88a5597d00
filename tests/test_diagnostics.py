"""curvlib.diagnostics against the oracles, and structures' curvature blocks.

Exact and empirical Fisher blocks are slices of :mod:`curvlib.testing.oracles`' dense
matrices; block-Fisher directions are dense solves written out here; TNT's curvature block is
the Kronecker product of eq. (5)'s normalised factors, built with :func:`torch.kron` from the
reference module's formulas. All float64, 1e-10 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib import diagnostics
from curvlib.structures import Dense, TensorNormal
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.reference.tensor_normal import mode_statistic, normalised, tnt_dims
from curvlib.testing.strategies import ModelSpec, dampings, examples, make_targets, problems

F64 = torch.float64


def _slices(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _block(matrix: torch.Tensor, model: nn.Module, names) -> torch.Tensor:
    rows = _slices(model)
    index = torch.cat([torch.arange(rows[n].start, rows[n].stop) for n in names])
    return matrix[index][:, index]


def _problem(kind="mlp", lik="categorical", n=6, seed=0):
    spec = (ModelSpec("mlp", (3,), (4,), 3, seed=seed) if kind == "mlp" else
            ModelSpec("cnn1d", (2, 5), (2,), 3, kernel=2, seed=seed))
    model = spec.build()
    x = spec.inputs(n, seed=seed + 1)
    y = make_targets(lik, spec.output_shape(), n, seed=seed + 2)
    return model, x, y


def _step(opt, model, x, y, times=1):
    for _ in range(times):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()


# -- block Fisher and its direction ------------------------------------------------------------


@given(problem=problems(kinds=("mlp", "cnn1d"), spatial_output=False, sizes=st.integers(1, 4)),
       blocks=st.sampled_from(["layer", "tensor", "model"]), empirical=st.booleans())
@settings(max_examples=examples(0.1))
def test_block_fisher_is_the_oracles_diagonal_blocks(problem, blocks, empirical):
    model, x, y = problem.model, problem.inputs, problem.targets
    found = diagnostics.block_fisher(model, problem.likelihood, x,
                                     targets=y if empirical else None, blocks=blocks)
    full = (oracles.empirical_fisher(model, problem.likelihood, x, y) if empirical
            else oracles.exact_fisher(model, problem.likelihood, x))
    names = [n for n, _ in model.named_parameters()]
    groups: dict[str, list[str]] = {}
    for n in names:
        key = {"layer": n.rpartition(".")[0], "tensor": n, "model": ""}[blocks]
        groups.setdefault(key, []).append(n)
    assert list(found) == [tuple(g) for g in groups.values()]
    for key, matrix in found.items():
        assert matrix.dtype == F64
        assert_close(matrix, _block(full, model, key), what=str(key))


def test_block_fisher_refuses_a_large_model():
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 2))
    with pytest.raises(ValueError, match=r"1292 trainable entries, more than max_params=1000"):
        diagnostics.block_fisher(model, "categorical", torch.randn(2, 40), max_params=1000)


@given(seed=st.integers(0, 100), damping=dampings())
@settings(max_examples=examples(0.1))
def test_damped_direction_solves_each_block(seed, damping):
    model, x, y = _problem(seed=seed)
    blocks = diagnostics.block_fisher(model, "categorical", x, targets=y)
    gen = torch.Generator().manual_seed(seed)
    vectors = {n: torch.randn(p.shape, generator=gen, dtype=F64)
               for n, p in model.named_parameters()}
    found = diagnostics.damped_direction(blocks, vectors, damping)
    for key, f in blocks.items():
        v = torch.cat([vectors[n].reshape(-1) for n in key])
        inv = torch.linalg.inv(f + damping * torch.eye(f.shape[0], dtype=F64))
        expected = inv @ v
        got = torch.cat([found[n].reshape(-1) for n in key])
        kappa = torch.linalg.cond(f + damping * torch.eye(f.shape[0], dtype=F64)).item()
        assert_close(got, expected, rtol=max(1e-10, 10 * kappa * 2.2e-16), what=str(key))
    with pytest.raises(ValueError, match="no vector for"):
        diagnostics.damped_direction(blocks, {"0.weight": vectors["0.weight"]}, damping)
    with pytest.raises(ValueError, match="non-negative"):
        diagnostics.damped_direction(blocks, vectors, -1.0)


def test_cosine_similarities_by_layer_tensor_and_model():
    model, _, _ = _problem()
    gen = torch.Generator().manual_seed(0)
    a = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters()}
    b = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters()}

    def cos(names):
        x = torch.cat([a[n].reshape(-1) for n in names])
        y = torch.cat([b[n].reshape(-1) for n in names])
        return float(x @ y / (x.norm() * y.norm()))

    by_layer = diagnostics.cosine_similarities(a, b, model=model)
    assert list(by_layer) == ["0", "2"]
    assert by_layer["0"] == pytest.approx(cos(["0.weight", "0.bias"]), rel=1e-12)
    by_tensor = diagnostics.cosine_similarities(a, b, by="tensor")
    assert by_tensor["2.bias"] == pytest.approx(cos(["2.bias"]), rel=1e-12)
    whole = diagnostics.cosine_similarities(a, b, by="model")
    assert whole["model"] == pytest.approx(cos(list(a)), rel=1e-12)
    assert diagnostics.cosine_similarities(a, a, by="model")["model"] == pytest.approx(1.0)
    zero = {n: torch.zeros_like(v) for n, v in a.items()}
    assert diagnostics.cosine_similarities(zero, zero, by="model") == {"model": 1.0}
    assert diagnostics.cosine_similarities(a, zero, by="model") == {"model": 0.0}
    with pytest.raises(ValueError, match="no parameter in common"):
        diagnostics.cosine_similarities({"x": a["0.bias"]}, b)
    with pytest.raises(ValueError, match="by/blocks"):
        diagnostics.cosine_similarities(a, b, by="row")


# -- preview ---------------------------------------------------------------------------------


def _state_snapshot(opt):
    return {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in state.items()} for p, state in opt.state.items()}


def _assert_same_state(opt, snapshot):
    assert set(snapshot) == {id(p) for p in opt.state}
    for p, state in opt.state.items():
        assert set(state) == set(snapshot[id(p)])
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, snapshot[id(p)][k]) and v.dtype == snapshot[id(p)][k].dtype


class Scaled(nn.Module):
    """An MLP times a learnable scalar (TNT leaves order-0 tensors to the fallback)."""

    def __init__(self):
        super().__init__()
        self.body = ModelSpec("mlp", (3,), (4,), 3, seed=8).build()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))

    def forward(self, x):
        return self.body(x) * self.scale


@pytest.mark.parametrize("structure", ["tensor_normal", "dense", Dense(blocks="tensor")],
                         ids=str)
def test_preview_changes_nothing_and_is_the_next_steps_direction(structure):
    model = Scaled()
    x, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 2, 2, 1])
    opt = curvlib.assemble(model, "categorical", source="empirical", structure=structure,
                           lr=0.1, damping=0.2, momentum=0.0, stat_every=5, inverse_every=5)
    # before any step: no state is created, and every direction is the vector itself
    opt.zero_grad()
    opt.backward(model(x), y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    first = diagnostics.preview(opt)
    assert len(opt.state) == 0
    for n, g in grads.items():
        assert torch.equal(first[n], g)
    opt.step()  # statistics and inverses at t = 0; none at t = 1 (stat_every = 5)
    opt.zero_grad()
    opt.backward(model(x), y)
    snapshot = _state_snapshot(opt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    found = diagnostics.preview(opt)
    _assert_same_state(opt, snapshot)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])
    opt.step()
    for n, p in model.named_parameters():
        assert_close(p.detach() - before[n], -0.1 * found[n], rtol=1e-12, what=n)
    if structure == "tensor_normal":  # the scalar is not covered: the fallback
        assert torch.equal(found["scale"], grads["scale"])


def test_preview_takes_given_vectors_and_checks_them():
    model, x, y = _problem()
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="dense",
                           damping=0.3)
    _step(opt, model, x, y)
    v = {"0.weight": torch.randn(4, 3, dtype=F64)}
    found = diagnostics.preview(opt, v)
    assert list(found) == ["0.weight"]
    state_w, state_b = opt.state[model[0].weight], opt.state[model[0].bias]
    inv = torch.cat([state_w["dense_inv"], state_b["dense_inv"]])  # the layer's inverse
    expected = (inv @ torch.cat([v["0.weight"].reshape(-1), torch.zeros(4, dtype=F64)]))[:12]
    assert_close(found["0.weight"].reshape(-1), expected)
    with pytest.raises(ValueError, match="not a parameter this optimizer optimizes"):
        diagnostics.preview(opt, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        diagnostics.preview(opt, {"0.weight": torch.zeros(3, 4)})


@pytest.mark.parametrize("structure", ["smw", "coefficient_sharing"])
def test_batch_structures_have_no_preview(structure):
    model, x, _ = _problem()
    opt = curvlib.assemble(model, "categorical", source="gram", structure=structure)
    with pytest.raises(TypeError, match=r"inside opt\.backward"):
        diagnostics.preview(opt)
    with pytest.raises(TypeError, match=r"inside opt\.backward"):
        diagnostics.block_errors(opt, x)


# -- direction cosines -----------------------------------------------------------------------


@pytest.mark.parametrize("kind,lik", [("mlp", "categorical"), ("cnn", "gaussian"),
                                      ("cnn", "bernoulli")])
def test_dense_empirical_direction_is_the_block_fisher_direction(kind, lik):
    """Dense per-sample statistics from the data's targets with ema = 0 hold exactly the
    empirical layer blocks: its direction is the block-Fisher direction, cosine 1."""
    model, x, y = _problem(kind, lik)
    opt = curvlib.assemble(model, lik, source="empirical", structure="dense", lr=0.0, ema=0.0,
                           damping=0.3)
    _step(opt, model, x, y)
    opt.zero_grad()
    opt.backward(model(x), y)
    for by in ("layer", "tensor", "model"):
        found = diagnostics.direction_cosines(opt, x, damping=0.3, targets=y, by=by)
        for key, value in found.items():
            assert value == pytest.approx(1.0, abs=1e-12), (by, key)
    # the directions themselves, not only their angle
    blocks = diagnostics.block_fisher(model, lik, x, targets=y)
    grads = {n: p.grad for n, p in model.named_parameters()}
    expected = diagnostics.damped_direction(blocks, grads, 0.3)
    for n, d in diagnostics.preview(opt).items():
        assert_close(d, expected[n], what=n)


def test_direction_cosines_of_tnt_and_of_sgd():
    model, x, y = _problem("cnn", "categorical")
    tnt = curvlib.assemble(model, "categorical", source="empirical", structure="tensor_normal",
                           lr=0.0, damping=0.1)
    _step(tnt, model, x, y, times=2)
    tnt.zero_grad()
    tnt.backward(model(x), y)
    found = diagnostics.direction_cosines(tnt, x, damping=0.1, targets=y)
    assert list(found) == ["0", "3"]
    assert all(-1.0 <= c <= 1.0 + 1e-12 for c in found.values())
    # TNT's blocks are per tensor: its direction is not the layer-block direction
    assert min(found.values()) < 1 - 1e-6
    # with momentum buffers as the vectors (the paper's averaged gradient)
    buffers = {n: tnt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    by_model = diagnostics.direction_cosines(tnt, x, damping=0.1, targets=y, vectors=buffers,
                                             by="model")
    blocks = diagnostics.block_fisher(model, "categorical", x, targets=y)
    expected = diagnostics.cosine_similarities(
        diagnostics.preview(tnt, buffers), diagnostics.damped_direction(blocks, buffers, 0.1),
        by="model")
    assert by_model["model"] == pytest.approx(expected["model"], rel=1e-12)


# -- block errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,lik", [("mlp", "categorical"), ("cnn", "gaussian")])
def test_dense_block_errors_vanish_against_the_empirical_blocks(kind, lik):
    model, x, y = _problem(kind, lik)
    opt = curvlib.assemble(model, lik, source="empirical", structure="dense", lr=0.0, ema=0.0)
    _step(opt, model, x, y)
    errors = diagnostics.block_errors(opt, x, targets=y)
    layers = [tuple(n for n, _ in model.named_parameters() if n.startswith(m + "."))
              for m in ("0", "2" if kind == "mlp" else "3")]
    assert list(errors) == layers
    assert max(errors.values()) < 1e-10
    # against the exact Fisher the empirical blocks differ, and that is what is measured
    exact = diagnostics.block_fisher(model, lik, x)
    mine = opt.structure.curvature_blocks(opt._items(opt.param_groups[0]))
    for key, error in diagnostics.block_errors(opt, x).items():
        f = exact[key]
        assert error == pytest.approx(float((mine[key] - f).norm() / f.norm()), rel=1e-12)


def test_block_errors_compare_on_unions_of_blocks():
    """Tensor blocks against layer blocks: one union per layer, the structure's cross terms
    zero; layer blocks against tensor blocks: one union per layer, the reference's zero."""
    model, x, y = _problem()
    opt = curvlib.assemble(model, "categorical", source="empirical",
                           structure=Dense(blocks="tensor"), lr=0.0, ema=0.0)
    _step(opt, model, x, y)
    full = oracles.empirical_fisher(model, "categorical", x, y)
    errors = diagnostics.block_errors(opt, x, targets=y)
    for layer in ("0", "2"):
        key = (f"{layer}.weight", f"{layer}.bias")
        f = _block(full, model, key)
        diag = f.clone()
        n = model.get_parameter(key[0]).numel()
        diag[:n, n:] = 0
        diag[n:, :n] = 0
        assert errors[key] == pytest.approx(float((diag - f).norm() / f.norm()), rel=1e-10)
    by_tensor = diagnostics.block_errors(opt, x, targets=y, blocks="tensor")
    assert max(by_tensor.values()) < 1e-10 and len(by_tensor) == 4

    layered = curvlib.assemble(model, "categorical", source="empirical", structure="dense",
                               lr=0.0, ema=0.0)
    _step(layered, model, x, y)
    whole = diagnostics.block_errors(layered, x, targets=y, blocks="model")
    names = tuple(n for n, _ in model.named_parameters())
    assert list(whole) == [names]
    cut = full.clone()
    cut[:16, 16:] = 0  # layer 0 holds 12 + 4 entries
    cut[16:, :16] = 0
    assert whole[names] == pytest.approx(float((cut - full).norm() / full.norm()), rel=1e-10)


def test_block_errors_scale_options():
    model, x, y = _problem()
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="dense",
                           lr=0.0, ema=0.0)
    _step(opt, model, x, y)
    mine = opt.structure.curvature_blocks(opt._items(opt.param_groups[0]))
    exact = diagnostics.block_fisher(model, "categorical", x)
    for scale in (2.0, "fit"):
        found = diagnostics.block_errors(opt, x, scale=scale)
        for key, c in mine.items():
            f = exact[key]
            alpha = float((c * f).sum() / (c * c).sum()) if scale == "fit" else scale
            assert found[key] == pytest.approx(float((alpha * c - f).norm() / f.norm()),
                                               rel=1e-10)
    with pytest.raises(ValueError, match="scale"):
        diagnostics.block_errors(opt, x, scale="best")


# -- tensor_normal's curvature blocks --------------------------------------------------------


@given(seed=st.integers(0, 1000), max_dim=st.sampled_from([None, 2, 3]),
       reshape=st.sampled_from(["out_in_kernel", "out_rest", "as_is"]),
       statistics=st.sampled_from(["batch", "per_sample"]))
@settings(max_examples=examples(0.075))
def test_tensor_normal_blocks_are_the_kronecker_product_of_normalised_factors(
        seed, max_dim, reshape, statistics):
    spec = ModelSpec("cnn2d", (2, 4, 4), (3,), 2, kernel=2, seed=seed)
    model = spec.build()
    x = spec.inputs(5, seed=seed)
    y = make_targets("categorical", (2,), 5, seed=seed + 1)
    structure = TensorNormal(reshape=reshape, max_dim=max_dim, statistics=statistics)
    source = "empirical"
    opt = curvlib.assemble(model, "categorical", source=source, structure=structure, ema=0.5,
                           lr=0.0)
    _step(opt, model, x, y, times=2)
    found = opt.structure.curvature_blocks(opt._items(opt.param_groups[0]))
    rows = oracles.per_sample_grads(model, "categorical", x, y)
    start = 0
    for name, p in model.named_parameters():
        g = rows[:, start:start + p.numel()]
        start += p.numel()
        dims = tnt_dims(p.shape, reshape)
        on = [max_dim is None or d <= max_dim for d in dims]
        if not any(on):
            assert (name,) not in found
            continue
        if statistics == "batch":
            draws, scale = g.mean(0).reshape(1, *dims), 1.0
        else:
            draws, scale = g.reshape(-1, *dims), 1.0 / 5
        hs = [mode_statistic(draws, i) * scale if f else None for i, f in enumerate(on)]
        us = normalised(hs, dims)
        trace = torch.stack([torch.trace(h) for h in hs if h is not None]).mean()
        c0 = (trace / math.prod(dims)) ** (1 / len(dims))
        kron = torch.ones(1, 1, dtype=F64)
        for u, d in zip(us, dims, strict=True):
            kron = torch.kron(kron, c0 * torch.eye(d, dtype=F64) if u is None else u)
        # the same batch twice with lr = 0: the EMA is the statistic itself
        assert_close(found[(name,)], kron, what=name)
        assert torch.trace(found[(name,)]).item() == pytest.approx(trace.item(), rel=1e-10)


def test_tensor_normal_blocks_skip_tensors_without_statistics():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = curvlib.assemble(model, "gaussian", source="empirical", structure="tensor_normal")
    assert opt.structure.curvature_blocks(opt._items(opt.param_groups[0])) == {}
