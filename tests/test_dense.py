"""The dense block structure against float64 formulas written from its definition.

Per block ``b`` (a module's tensors together, or one tensor), from ``R`` gradient rows
``g_r`` (flattened row-major, concatenated in block order): ``S_b = (1/R) Σ_r g_r g_rᵀ``
(per-sample rows; with ``statistics="batch"`` the ``S`` per-draw mean-loss gradients); the EMA
``F_b ← ema·F_b + (1 − ema)·S_b`` (first sets); the direction ``(F_b + λI)^{-1} vec(m_b)``,
here by :func:`torch.linalg.inv`. End to end, the assembled optimizer is checked against
:class:`curvlib.testing.reference.ReferenceOptimizer` around the dense reference
(:mod:`curvlib.testing.reference.dense`), whose statistics come from the oracles.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.solvers import Cholesky, Eigh
from curvlib.sources import TrueFisher
from curvlib.structures import Dense
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.fakes import (
    GradientStatistics as FakeStatistics,
)
from curvlib.testing.fakes import (
    constant_damping as _constant,
)
from curvlib.testing.fakes import (
    structure_items as _items,
)
from curvlib.testing.reference import ReferenceOptimizer
from curvlib.testing.strategies import ModelSpec, dampings, examples, make_targets, problems, seeds

F64 = torch.float64


def _rows(shapes, r: int, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(r, *s, generator=gen, dtype=F64) for n, s in shapes.items()}


def _blocks_of(shapes, blocks: str) -> list[tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for name in shapes:
        module, dot, _ = name.rpartition(".")
        out.setdefault(module if blocks == "layer" and dot else "#" + name, []).append(name)
    return [tuple(v) for v in out.values()]


def _flat(tensors: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)


@st.composite
def layouts(draw):
    """A few "modules" with one or two tensors each, and maybe a root-module tensor."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m in range(draw(st.integers(1, 3))):
        out, inp = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["linear", "weight_only", "conv"]))
        if kind == "conv":
            shapes[f"m{m}.weight"] = (out, inp, 2)
        else:
            shapes[f"m{m}.weight"] = (out, inp)
        if kind != "weight_only":
            shapes[f"m{m}.bias"] = (out,)
    if draw(st.booleans()):
        shapes["scale"] = ()
    return shapes


# -- the structure alone ---------------------------------------------------------------------


@given(shapes=layouts(), blocks=st.sampled_from(["layer", "tensor"]), rows=st.integers(1, 6),
       seed=seeds(), eps=dampings(), solver=st.sampled_from([Cholesky(), Eigh()]),
       statistics=st.sampled_from(["per_sample", "batch"]))
@settings(max_examples=examples(0.2))
def test_direction_is_the_damped_block_inverse(shapes, blocks, rows, seed, eps, solver,
                                               statistics):
    dense = Dense(blocks=blocks, statistics=statistics)
    items = _items(dense, shapes)
    grads = _rows(shapes, rows, seed)
    dense.update(items, FakeStatistics(grads), ema=0.9)
    dense.refresh(items, solver=solver, damping=_constant(eps))
    vectors = _rows(shapes, 1, seed + 1)
    found = dense.directions(items, [vectors[n][0] for n in shapes])
    found = dict(zip(shapes, found, strict=True))
    for block in _blocks_of(shapes, blocks):
        g = _flat(grads, block)
        f = g.T @ g / rows
        inv = torch.linalg.inv(f + eps * torch.eye(f.shape[0], dtype=F64))
        expected = inv @ _flat(vectors, block)[0]
        got = torch.cat([found[n].reshape(-1) for n in block])
        # a damped, possibly rank-deficient block: the two inverses agree to about κ·u
        kappa = torch.linalg.cond(f + eps * torch.eye(f.shape[0], dtype=F64)).item()
        assert_close(got, expected, rtol=max(1e-10, 50 * kappa * 2.2e-16), what=str(block))
    assert dense.curvature_blocks(items).keys() == set(_blocks_of(shapes, blocks))


def test_before_any_statistics_the_direction_is_the_vector():
    dense = Dense()
    items = _items(dense, {"a.weight": (2, 3), "a.bias": (2,)})
    vectors = [torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)]
    dense.refresh(items, solver=Cholesky(), damping=_constant(0.1))  # nothing to invert yet
    for v, d in zip(vectors, dense.directions(items, vectors), strict=True):
        assert torch.equal(v, d)
    assert dense.curvature_blocks(items) == {}


def test_a_block_member_without_a_vector_counts_as_zero():
    dense = Dense()
    shapes = {"a.weight": (2, 3), "a.bias": (2,)}
    items = _items(dense, shapes)
    grads = _rows(shapes, 4, seed=1)
    dense.update(items, FakeStatistics(grads), ema=0.9)
    dense.refresh(items, solver=Cholesky(), damping=_constant(0.2))
    g = _flat(grads, shapes)
    inv = torch.linalg.inv(g.T @ g / 4 + 0.2 * torch.eye(8, dtype=F64))
    for keep in (0, 1):  # only the weight, then only the bias, has a gradient
        v = torch.randn(shapes[list(shapes)[keep]], dtype=F64)
        full = torch.zeros(8, dtype=F64)
        full[slice(0, 6) if keep == 0 else slice(6, 8)] = v.reshape(-1)
        (d,) = dense.directions([items[keep]], [v])
        expected = (inv @ full)[slice(0, 6) if keep == 0 else slice(6, 8)]
        assert_close(d.reshape(-1), expected)
        assert_close(dense.direction(items[keep][1], items[keep][2], v).reshape(-1), expected)


def test_first_update_sets_then_ema_then_average():
    dense = Dense(blocks="tensor")
    shapes = {"w": (2, 2)}
    items = _items(dense, shapes)
    batches = [_rows(shapes, 3, seed=s) for s in range(3)]
    stats = [(_flat(b, ["w"]).T @ _flat(b, ["w"]) / 3) for b in batches]
    dense.update(items, FakeStatistics(batches[0]), ema=0.7)
    assert_close(dense.curvature_blocks(items)[("w",)], stats[0])
    dense.update(items, FakeStatistics(batches[1]), ema=0.7)
    assert_close(dense.curvature_blocks(items)[("w",)], 0.7 * stats[0] + 0.3 * stats[1])
    fresh = _items(dense, shapes)
    for b in batches:
        dense.update(fresh, FakeStatistics(b), ema=0.7, average=True)
    assert_close(dense.curvature_blocks(fresh)[("w",)], sum(stats) / 3)
    zero = _items(dense, shapes)
    for b in batches:
        dense.update(zero, FakeStatistics(b), ema=0.0)
    assert_close(dense.curvature_blocks(zero)[("w",)], stats[-1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_statistic_leaves_the_block_unchanged(bad):
    dense = Dense()
    shapes = {"a.weight": (2, 2), "a.bias": (2,), "b.weight": (1, 2)}
    items = _items(dense, shapes)
    dense.update(items, FakeStatistics(_rows(shapes, 3, seed=0)), ema=0.9)
    before = {n: {k: v.clone() for k, v in st.items()} for n, _, st in items}
    grads = _rows(shapes, 3, seed=1)
    grads["a.bias"][1, 0] = bad
    dense.update(items, FakeStatistics(grads), ema=0.9)
    for name, _, state in items:
        if name.startswith("a."):
            assert torch.equal(state["dense_F"], before[name]["dense_F"])
            assert int(state["dense_updates"]) == 1 and int(state["dense_skipped"]) == 1
        else:
            assert not torch.equal(state["dense_F"], before[name]["dense_F"])
            assert int(state["dense_updates"]) == 2


def test_blocks_of_equal_size_are_inverted_in_one_call():
    calls = []

    class Spy(Cholesky):
        def inverse_root(self, matrices, damping, power=1.0):
            calls.append(tuple(matrices.shape))
            return super().inverse_root(matrices, damping, power)

    dense = Dense()
    shapes = {"a.weight": (2, 2), "a.bias": (2,), "b.weight": (3, 2), "c.weight": (2, 3)}
    items = _items(dense, shapes)
    dense.update(items, FakeStatistics(_rows(shapes, 4, seed=2)), ema=0.9)
    report = dense.refresh(items, solver=Spy(), damping=_constant(0.1))
    assert calls == [(3, 6, 6)]  # a: 4 + 2 entries, b and c: 6 each → one call for 3 blocks
    calls.clear()
    shapes["d.weight"] = (1, 2)
    items = _items(dense, shapes)
    dense.update(items, FakeStatistics(_rows(shapes, 4, seed=2)), ema=0.9)
    report = dense.refresh(items, solver=Spy(), damping=_constant(0.1))
    assert sorted(calls) == [(1, 2, 2), (3, 6, 6)]
    assert report == {"factors": 4, "recovered": 0, "kept": 0}


def test_options_and_needs():
    assert Dense().needs == {"per_sample_grads"}
    assert Dense(statistics="batch").needs == {"batch_grads"}
    with pytest.raises(ValueError, match="blocks"):
        Dense(blocks="model")
    with pytest.raises(ValueError, match="statistics"):
        Dense(statistics="mean")
    with pytest.raises(ValueError, match="max_size"):
        Dense(max_size=0)
    with pytest.raises(ValueError, match="ema"):
        Dense().update([], FakeStatistics({}), ema=1.0)
    assert [repr(e) for e in Dense.examples()] == [
        "Dense(blocks='layer', statistics='per_sample', max_size=4096)",
        "Dense(blocks='tensor', statistics='per_sample', max_size=4096)",
        "Dense(blocks='layer', statistics='batch', max_size=4096)"]
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(CompatibilityError, match="per_sample_grads"):
        curvlib.assemble(model, "gaussian", source="true_fisher", structure="dense")
    curvlib.assemble(model, "gaussian", source="true_fisher", structure=Dense(statistics="batch"))
    curvlib.assemble(model, "gaussian", source=TrueFisher(per_sample=True), structure="dense")


# -- size limit ------------------------------------------------------------------------------


def test_a_tensor_over_max_size_is_refused_when_the_optimizer_is_built():
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 2))
    with pytest.raises(ValueError, match=r"shape \(20, 30\) \(in Linear\) has 600 entries, "
                                         r"more than max_size=500.*diagonal\), or "
                                         r"Dense\(max_size=600\)"):
        curvlib.assemble(model, "categorical", source="empirical",
                         structure=Dense(max_size=500))


def test_a_layer_over_max_size_is_refused_at_the_first_step_without_changing_state():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = curvlib.assemble(model, "categorical", source="empirical",
                           structure=Dense(max_size=24))  # 20 + 5 = 25 entries in layer 0
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 1, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    opt.backward(model(x), y)
    with pytest.raises(ValueError, match=r"block \('0.weight', '0.bias'\) has 25 entries.*"
                                         r"Dense\(blocks='tensor'\).*Dense\(max_size=25\)"):
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
        assert "dense_F" not in opt.state[p]
    # per tensor, the same limit is fine
    opt = curvlib.assemble(model, "categorical", source="empirical",
                           structure=Dense(blocks="tensor", max_size=24))
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()


# -- through the optimizer -------------------------------------------------------------------


SOURCES = {"mc": TrueFisher(per_sample=True, num_samples=2),
           "empirical": curvlib.sources.Empirical(), "batch_mc": TrueFisher(num_samples=2)}


@pytest.mark.parametrize("config", [
    ("mc", Dense()), ("empirical", Dense()), ("mc", Dense(blocks="tensor")),
    ("empirical", Dense(blocks="tensor")), ("batch_mc", Dense(statistics="batch")),
    ("batch_mc", Dense(blocks="tensor", statistics="batch")),
    ("empirical", Dense(statistics="batch")),
], ids=lambda c: f"{c[0]}-{c[1].blocks}-{c[1].statistics}")
@given(problem=problems(kinds=("mlp", "cnn1d"), spatial_output=False, sizes=st.integers(1, 4)),
       ema=st.sampled_from([0.0, 0.6]), schedule=st.sampled_from([(1, 1), (1, 3), (2, 2)]),
       damping=st.sampled_from([0.3, 1.0]))
# × 7 configurations; four optimizer steps with oracle gradients each
@settings(max_examples=examples(0.03))
def test_steps_equal_the_dense_reference(config, problem, ema, schedule, damping):
    source, structure = SOURCES[config[0]], config[1]
    model = problem.model
    seed = problem.seed
    # steps of at most ~lr/λ times the momentum: the runs stay bounded (a diverging run
    # amplifies round-off from step to step)
    hyper = dict(lr=0.1, damping=damping, momentum=0.5, weight_decay=0.01, ema=ema,
                 stat_every=schedule[0], inverse_every=schedule[1])
    opt = curvlib.assemble(model, problem.likelihood, source=copy.deepcopy(source),
                           structure=copy.deepcopy(structure),
                           generator=torch.Generator().manual_seed(seed), **hyper)
    ref = ReferenceOptimizer(model, problem.likelihood, source, structure,
                             damping_rule="constant",
                             generator=torch.Generator().manual_seed(seed), **hyper)
    gen = torch.Generator().manual_seed(seed + 3)
    for t in range(4):
        x = torch.randn(problem.batch_size, *problem.spec.in_shape, generator=gen, dtype=F64)
        y = make_targets(problem.likelihood, problem.spec.output_shape(), problem.batch_size,
                         seed + 5 + t)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
        change = ref.step(x, y)
        for name, p in model.named_parameters():
            assert_close(p, ref.params[name], atol=1e-14, what=f"step {t}: {name}")
            # the step measured from the parameters carries their round-off: 1e-8
            assert_close(p.detach() - before[name], change[name], rtol=1e-8, atol=1e-14,
                         what=f"step {t}: Δ{name}")


def _layer_blocks(model: nn.Module, matrix: torch.Tensor) -> dict[tuple[str, ...], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    starts = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
    out = {}
    for block in _blocks_of({n: None for n in names}, "layer"):
        index = torch.cat([torch.arange(starts[n], starts[n] + dict(
            zip(names, sizes, strict=True))[n]) for n in block])
        out[block] = matrix[index][:, index]
    return out


@pytest.mark.parametrize("lik", ["categorical", "gaussian", "bernoulli"])
def test_with_ema_zero_the_blocks_are_the_empirical_and_mc_fisher_blocks(lik):
    spec = ModelSpec("cnn1d", (2, 5), (3,), 2, kernel=2, seed=4)
    model = spec.build()
    x = spec.inputs(6, seed=1)
    y = make_targets(lik, spec.output_shape(), 6, seed=2)
    for name, source in (("empirical", "empirical"),
                         ("mc", TrueFisher(per_sample=True, num_samples=3))):
        opt = curvlib.assemble(model, lik, source=source, structure="dense", lr=0.0, ema=0.0,
                               generator=torch.Generator().manual_seed(7))
        for _ in range(2):  # the second statistics replace the first (ema = 0)
            opt.zero_grad()
            opt.backward(model(x), y)
            opt.step()
        found = opt.structure.curvature_blocks(opt._items(opt.param_groups[0]))
        if name == "empirical":
            full = oracles.empirical_fisher(model, lik, x, y)
        else:  # the same draws: the optimizer's generator after one statistics step
            gen = torch.Generator().manual_seed(7)
            oracles.mc_fisher(model, lik, x, 3, generator=gen)
            full = oracles.mc_fisher(model, lik, x, 3, generator=gen)
        expected = _layer_blocks(model, full)
        assert found.keys() == expected.keys()
        for block, matrix in expected.items():
            assert_close(found[block], matrix, what=f"{name}: {block}")
            assert found[block].dtype == F64


# -- state -----------------------------------------------------------------------------------


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("structure", Dense.examples(), ids=repr)
def test_state_dict_round_trip_continues_bit_identically(structure):
    spec = ModelSpec("mlp", (3,), (4,), 2, seed=3)
    model = spec.build()
    source = TrueFisher(per_sample=structure.statistics == "per_sample")
    kwargs = dict(lr=0.1, damping=0.1, weight_decay=0.01, stat_every=1, inverse_every=2)
    opt = curvlib.assemble(model, "categorical", source=source, structure=structure,
                           generator=torch.Generator().manual_seed(3), **kwargs)
    batches = [(spec.inputs(5, seed=s), make_targets("categorical", (2,), 5, seed=s))
               for s in range(5)]

    def train(o, m, bs):
        for x, y in bs:
            o.zero_grad()
            o.backward(m(x), y)
            o.step()

    train(opt, model, batches[:3])
    saved_opt, saved_model = _roundtrip(opt.state_dict()), _roundtrip(model.state_dict())
    fresh = ModelSpec("mlp", (3,), (4,), 2, seed=50).build()
    fresh_opt = curvlib.assemble(fresh, "categorical", source=source, structure=structure,
                                 generator=torch.Generator().manual_seed(9), **kwargs)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert any(k.startswith("dense_") for k in opt.state[p])
        for key, value in opt.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
            assert fresh_opt.state[q][key].dtype == value.dtype, key
    train(opt, model, batches[3:])
    train(fresh_opt, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("statistics", ["per_sample", "batch"])
def test_a_bfloat16_model_keeps_float32_state(statistics):
    spec = ModelSpec("mlp", (3,), (4,), 2, seed=5)
    model = spec.build(torch.bfloat16)
    source = TrueFisher(per_sample=statistics == "per_sample")
    opt = curvlib.assemble(model, "categorical", source=source,
                           structure=Dense(statistics=statistics), lr=0.1, damping=0.1,
                           generator=torch.Generator().manual_seed(0))
    x = spec.inputs(6, seed=0, dtype=torch.bfloat16)
    y = make_targets("categorical", (2,), 6, seed=1)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    for p in model.parameters():
        state = opt.state[p]
        assert state["dense_F"].dtype == state["dense_inv"].dtype == torch.float32
        assert state["momentum_buffer"].dtype == torch.bfloat16
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    saved = _roundtrip(opt.state_dict())
    fresh_opt = curvlib.assemble(model, "categorical", source=source,
                                 structure=Dense(statistics=statistics))
    fresh_opt.load_state_dict(saved)
    for p in model.parameters():
        assert fresh_opt.state[p]["dense_F"].dtype == torch.float32
        assert torch.equal(fresh_opt.state[p]["dense_inv"], opt.state[p]["dense_inv"])


# -- coverage --------------------------------------------------------------------------------


class Scaled(nn.Module):
    """An MLP times a learnable scalar owned by the root module."""

    def __init__(self):
        super().__init__()
        self.body = ModelSpec("mlp", (3,), (4,), 2, seed=8).build()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))

    def forward(self, x):
        return self.body(x) * self.scale


def test_root_parameters_are_blocks_of_their_own_and_frozen_ones_are_left_out():
    model = Scaled()
    model.body[2].bias.requires_grad_(False)
    opt = curvlib.assemble(model, "categorical", source="empirical", structure="dense",
                           lr=0.0, ema=0.0)
    x, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    items = [i for g in opt.param_groups for i in opt._items(g)]
    blocks = opt.structure.curvature_blocks(items)
    assert set(blocks) == {("scale",), ("body.0.weight", "body.0.bias"), ("body.2.weight",)}
    full = oracles.empirical_fisher(model, "categorical", x, y)  # trainable entries only
    assert_close(blocks[("scale",)], full[:1, :1])
    assert "dense_F" not in opt.state[model.body[2].bias]


def test_a_layer_split_across_param_groups_gets_a_block_per_group():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = curvlib.assemble(model, "gaussian", source="empirical", structure="dense",
                           params=[dict(params=[model[0].weight]),
                                   dict(params=[model[0].bias], damping=0.5)], lr=0.0)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    keys = [set(opt.structure.curvature_blocks(opt._items(g))) for g in opt.param_groups]
    assert keys == [{("0.weight",)}, {("0.bias",)}]
