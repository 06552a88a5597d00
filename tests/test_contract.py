"""The correctness contract: every model ends *exact* or *refused*.

For models outside the MLP/CNN families — a registered layer whose ``forward`` is not called
(``nn.MultiheadAttention``'s ``out_proj``), a weight reused functionally, an LM-style tied
embedding and head — every recipe either gives what the dense float64 definitions give, or
raises a :class:`curvlib.CurvlibError` before any state changes. The training-loop protocol
(``step`` without ``opt.backward``, accumulation, ``add_param_group``, hooks, ``deepcopy``),
the non-finite policy, hyperparameter checks and state-dict checks are tested here too.

References come from :mod:`curvlib.testing.oracles` (``torch.func`` per-sample gradients in
float64) and from the definitions written out below; they never call the components they
check.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import curvlib
from curvlib.errors import (
    CoverageError,
    CurvlibError,
    HyperparameterError,
    InputError,
    StateDictError,
    UsageError,
)
from curvlib.structures.smw import SMW
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import examples

F64 = torch.float64


# -- the model families ----------------------------------------------------------------------


class FunctionalReuse(nn.Module):
    """``lin2.weight`` is used by ``lin2`` and again through ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin1(x))
        return self.lin2(h) + 0.5 * F.linear(h, self.lin2.weight)


class TiedLM(nn.Module):
    """An LM-style head tied to the embedding, the Linear registered first."""

    def __init__(self, vocab=5, dim=3):
        super().__init__()
        self.head = nn.Linear(dim, vocab, bias=False)
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (its ``out_proj`` forward is never called), then a Linear."""

    def __init__(self, dim=4, heads=2, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(h.mean(1))


class Encoder(nn.Module):
    """A ``TransformerEncoderLayer`` (eval mode: no dropout) and a Linear head."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(self.layer(x).mean(1))


def family(name: str, seed: int, n: int):
    """(model, inputs, targets), float64."""
    torch.manual_seed(seed)
    if name == "functional":
        model, x = FunctionalReuse(), torch.randn(n, 3)
    elif name == "tied":
        model, x = TiedLM(), torch.randint(0, 5, (n,))
    elif name == "attention":
        model, x = Attention(), torch.randn(n, 2, 4)
    else:
        model, x = Encoder().eval(), torch.randn(n, 2, 4)
    model = model.to(F64)
    x = x.to(F64) if x.is_floating_point() else x
    with torch.no_grad():
        classes = model(x).shape[-1]
    y = torch.randint(0, classes, (n,))
    return model, x, y


FAMILIES = ["functional", "tied", "attention", "encoder"]


def recipes():
    """name → builder(model) for every recipe (and a plain ``smw``), gentle settings."""
    return {
        "TNT": lambda m: curvlib.TNT(m, "categorical", lr=0.1, damping=0.1,
                                     generator=torch.Generator().manual_seed(0)),
        "EmpiricalTNT": lambda m: curvlib.EmpiricalTNT(m, "categorical", lr=0.1, damping=0.1),
        "Shampoo": lambda m: curvlib.Shampoo(m, "categorical", lr=0.1, damping=0.1),
        "KFAC": lambda m: curvlib.KFAC(m, "categorical", lr=0.1, damping=0.1,
                                       generator=torch.Generator().manual_seed(0)),
        "FNGD": lambda m: curvlib.FNGD(m, "categorical", lr=0.1, alpha=1e12,
                                       steps_per_epoch=1),
        "NaturalGradient": lambda m: curvlib.NaturalGradient(
            m, "categorical", lr=0.1, damping=0.1, generator=torch.Generator().manual_seed(0)),
        "smw": lambda m: curvlib.assemble(m, "categorical", source="gram",
                                          structure=SMW(blocks="tensor", cover="all"),
                                          damping_rule="constant", lr=0.1, damping=0.5),
    }


#: What each recipe does on each family: "exact" (checked) or "refused".
EXPECTED = {
    # batch gradients from ordinary backward passes see every use of every parameter
    **{(f, r): "exact" for f in FAMILIES for r in ("TNT", "EmpiricalTNT", "Shampoo")},
    # per-sample statistics from layer records: a tied weight is summed over its owners,
    # a use outside every owner's forward is refused
    ("tied", "FNGD"): "exact", ("tied", "smw"): "exact", ("tied", "NaturalGradient"): "exact",
    ("tied", "KFAC"): "refused",
    **{(f, r): "refused" for f in ("functional", "attention", "encoder")
       for r in ("FNGD", "smw", "NaturalGradient", "KFAC")},
}


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before, model):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def run_or_refuse(build, model, x, y):
    """Build and take one step; on a refusal check that nothing changed. Returns the
    optimizer (None if refused at construction) and whether it was refused."""
    before = snapshot(model)
    try:
        opt = build(model)
    except CurvlibError as err:
        assert str(err)
        return None, True
    gen = opt.generator.get_state()
    opt.zero_grad()
    try:
        opt.backward(model(x), y)
    except CurvlibError as err:
        assert "precondition=False" in str(err) or "Put it" in str(err)
        assert all(p.grad is None for p in model.parameters())
        assert not opt.state and opt.step_count == 0 and unchanged(before, model)
        assert torch.equal(opt.generator.get_state(), gen)
        return opt, True
    return opt, False


def check_exact(name, opt, model, x, y, stats_seen):
    """The step's curvature input equals its definition."""
    rows = oracles.per_sample_grads(model, "categorical", x, y)  # (N, P), data targets
    flat_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    if opt.structure.preconditions == "vector":
        assert_close(flat_grad, rows.mean(0), rtol=1e-10, what=f"{name}: gradient")
    if name in ("TNT", "EmpiricalTNT", "Shampoo"):
        (stats,) = stats_seen
        batch = stats.batch_grads()
        targets = stats.targets[0] if stats.sampled else y
        expected = oracles.gradient(model, "categorical", x, targets)
        got = torch.cat([batch[n][0].flatten() for n, _ in model.named_parameters()])
        assert_close(got, expected, rtol=1e-10, what=f"{name}: batch gradient statistics")
    elif name == "FNGD":  # α = 1e12: the SMW direction is the plain gradient
        assert_close(flat_grad, rows.mean(0), rtol=1e-8, what="FNGD at huge alpha")
    elif name == "smw":  # blocks="tensor", constant λ: λ (λI + UᵀU/N)⁻¹ g per tensor
        lam, start, expected = 0.5, 0, []
        for p in model.parameters():
            u = rows[:, start:start + p.numel()]
            start += p.numel()
            g = u.mean(0)
            a = lam * torch.eye(u.shape[1], dtype=F64) + u.T @ u / u.shape[0]
            expected.append(lam * torch.linalg.solve(a, g))
        assert_close(flat_grad, torch.cat(expected), rtol=1e-9, what="smw direction")
    elif name == "NaturalGradient":
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@settings(max_examples=examples(0.25), deadline=None)
@given(name=st.sampled_from(FAMILIES), recipe=st.sampled_from(sorted(recipes())),
       seed=st.integers(0, 2**16), n=st.integers(1, 5))
def test_every_recipe_on_every_family_is_exact_or_refused(name, recipe, seed, n):
    model, x, y = family(name, seed, n)
    build = recipes()[recipe]
    seen = []

    def spying(m):
        opt = build(m)
        collect = opt.source.collect

        def spy(*args, **kwargs):
            stats = collect(*args, **kwargs)
            seen.append(stats)
            return stats

        opt.source.collect = spy
        return opt

    opt, refused = run_or_refuse(spying, model, x, y)
    assert ("refused" if refused else "exact") == EXPECTED[(name, recipe)], (name, recipe)
    if refused:
        return
    check_exact(recipe, opt, model, x, y, seen)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_refusal_names_the_parameter_and_a_fix_that_works():
    """KFAC on attention: refused naming out_proj; the suggested param group then works."""
    model, x, y = family("attention", 0, 4)
    opt = curvlib.KFAC(model, "categorical", lr=0.1, damping=0.1)
    with pytest.raises(CoverageError, match=r"attn\.out_proj\.weight"):
        opt.backward(model(x), y)
    out_proj = [model.get_parameter("attn.out_proj.weight"),
                model.get_parameter("attn.out_proj.bias")]
    others = [p for p in model.parameters() if all(p is not q for q in out_proj)]
    opt = curvlib.KFAC(model, "categorical", lr=0.1, damping=0.1,
                       params=[{"params": others}, {"params": out_proj, "precondition": False}])
    opt.backward(model(x), y)
    opt.step()
    rows = {r.name: r for r in opt.coverage()}
    assert not rows["attn.out_proj.weight"].preconditioned
    assert "precondition=False" in rows["attn.out_proj.weight"].reason
    assert rows["out.weight"].preconditioned
    assert "in_proj_weight" in curvlib.format_coverage(opt.coverage(), only_fallbacks=True)


def test_lstm_models_fall_back_visibly_under_kfac_and_run_under_tnt_shampoo():
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.norm(self.rnn(x)[0][:, -1]))

    x, y = torch.randn(5, 3, 3), torch.randint(0, 2, (5,))
    for build in (curvlib.KFAC, curvlib.Shampoo, curvlib.EmpiricalTNT, curvlib.TNT):
        model = Seq()
        opt = build(model, "categorical", lr=0.1, damping=0.1)
        opt.backward(model(x), y)
        opt.step()
        fallbacks = {r.name: r.reason for r in opt.coverage() if not r.preconditioned}
        if build is curvlib.KFAC:
            assert set(fallbacks) == {n for n, _ in model.named_parameters()
                                      if not n.startswith("out.")}
            assert "LSTM" in fallbacks["rnn.weight_ih_l0"]
        else:
            assert not any(r.startswith("rnn") for r in fallbacks)


# -- the training loop -----------------------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)


def data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_a_plain_backward_then_step_is_refused_for_every_recipe(recipe):
    model = mlp()
    x, y = data()
    opt = recipes()[recipe](model)
    before = snapshot(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(UsageError, match=r"opt\.backward"):
        opt.step()
    assert unchanged(before, model) and not opt.state and opt.step_count == 0


@pytest.mark.parametrize("structure", ["tensor_normal", "kfac", "shampoo", "diagonal", "dense"])
def test_accumulated_micro_batches_give_the_statistics_of_the_whole_batch(structure):
    """Two ``opt.backward`` calls, one step: ``.grad`` is the sum of the micro-batches'
    gradients (as torch accumulates) and the statistics are the concatenated batch's."""
    x, y = data(7)
    states = []
    for split in ([slice(0, 7)], [slice(0, 3), slice(3, 7)]):
        model = mlp()
        opt = curvlib.assemble(model, "categorical", source="empirical", structure=structure,
                               solver="eigh",
                               lr=0.1, damping=0.1, momentum=0.0, inverse_every=1)
        opt.zero_grad()
        for s in split:
            opt.backward(model(x[s]), y[s])
        summed = oracles.per_sample_grads(mlp(), "categorical", x, y)
        expected = sum(summed[s].mean(0) for s in split)
        assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), expected,
                     rtol=1e-10, what=".grad")
        opt.step()
        states.append({(i, k): v for i, p in enumerate(model.parameters())
                       for k, v in opt.state[p].items()
                       if isinstance(v, torch.Tensor) and k != "momentum_buffer"})
    whole, parts = states
    assert whole.keys() == parts.keys() and whole
    for k in whole:
        assert_close(parts[k].to(F64), whole[k].to(F64), rtol=1e-10, what=str(k))


def test_micro_batches_that_cannot_be_merged_are_refused_before_anything_changes():
    model = mlp()
    x, y = data(6)
    opt = curvlib.assemble(model, "categorical", source=curvlib.sources.TrueFisher(
        num_samples=1, per_sample=True), structure="tensor_normal", lr=0.1, damping=0.1)
    opt.backward(model(x[:3]), y[:3])
    opt.source.num_samples = 2  # a source that changed its draws between micro-batches
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(UsageError, match="accumulated"):
        opt.backward(model(x[3:]), y[3:])
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_smw_accumulation_sums_each_micro_batch_own_direction():
    x, y = data(7)

    def build(m):
        return curvlib.assemble(m, "categorical", source="gram", structure="smw",
                                lr=0.1, damping=0.3, momentum=0.0)

    expected = []
    for s in (slice(0, 3), slice(3, 7)):
        model = mlp()
        opt = build(model)
        opt.backward(model(x[s]), y[s])
        expected.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model = mlp()
    opt = build(model)
    for s in (slice(0, 3), slice(3, 7)):
        opt.backward(model(x[s]), y[s])
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_close(got, expected[0] + expected[1], rtol=1e-10, what="accumulated smw")


def test_add_param_group_is_preconditioned_and_stray_tensors_refused():
    x, y = data()
    whole = mlp()
    ref = curvlib.FNGD(whole, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=1)
    ref.backward(whole(x), y)
    model = mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=1,
                       params=first)
    opt.add_param_group({"params": second})
    opt.backward(model(x), y)
    for p, q in zip(model.parameters(), whole.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=1e-10, what="grad of an added group")
    assert all(r.preconditioned for r in opt.coverage())
    with pytest.raises(UsageError, match=r"between opt\.backward and step"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=F64))]})
    opt.step()
    with pytest.raises(UsageError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=F64))]})
    assert len(opt.param_groups) == 1 + 1


def test_tensor_hooks_act_on_the_preconditioned_gradient():
    """A pruning mask registered with ``p.register_hook`` masks what lands in ``.grad``."""
    x, y = data()
    plain = mlp()
    ref = curvlib.FNGD(plain, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=1)
    ref.backward(plain(x), y)
    model = mlp()
    mask = (torch.arange(12).reshape(4, 3) % 2).to(F64)
    model[0].weight.register_hook(lambda g: g * mask)
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=1)
    opt.backward(model(x), y)
    assert_close(model[0].weight.grad, plain[0].weight.grad * mask, rtol=1e-12, what="masked")
    assert_close(model[2].weight.grad, plain[2].weight.grad, rtol=1e-12, what="unhooked")


@pytest.mark.parametrize("recipe", ["TNT", "KFAC", "FNGD"])
def test_deepcopy_gives_a_working_independent_optimizer(recipe):
    x, y = data()
    model = mlp()
    opt = recipes()[recipe](model)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    twin = copy.deepcopy(opt)
    assert twin.model is not model
    for o in (opt, twin):
        o.zero_grad()
        o.backward(o.model(x), y)
        o.step()
    for p, q in zip(model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(p, q)
    if opt._capture is not None:  # each watches its own model, and only that
        assert twin._capture is not opt._capture
        assert set(twin._capture.calls) == set(twin.model[i] for i in (0, 2))
        opt._capture.clear()
        twin.model(x)
        assert all(not calls for calls in opt._capture.calls.values())


# -- bad numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(recipes()))
def test_a_non_finite_batch_skips_the_step_and_changes_nothing(recipe):
    x, y = data()
    model = mlp()
    opt = recipes()[recipe](model)
    opt.backward(model(x), y)
    opt.step()
    before = snapshot(model)
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for p in model.parameters()}
    store = copy.deepcopy(opt.structure_state)
    bad = x.clone()
    bad[0, 0] = math.inf
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.backward(model(bad), y)
    assert torch.isnan(loss)
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 1 and unchanged(before, model)
    for p in model.parameters():
        for k, v in state[id(p)].items():
            assert torch.equal(v, opt.state[p][k]), k
    assert repr(opt.structure_state) == repr(store)
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.backward(model(x), y)
    opt.step()
    assert opt.step_count == 2 and opt.state_dict()["curvlib"]["skipped"] == 1


@pytest.mark.parametrize("key", ["lr", "damping", "momentum", "weight_decay", "ema"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_hyperparameters_are_refused_everywhere(key, value):
    model = mlp()
    x, y = data()
    with pytest.raises(HyperparameterError, match=key):
        curvlib.assemble(model, "categorical", source="true_fisher", structure="tensor_normal",
                         **{key: value})
    opt = curvlib.assemble(model, "categorical", source="true_fisher",
                           structure="tensor_normal", params=list(model[0].parameters()))
    with pytest.raises(HyperparameterError, match=key):
        opt.add_param_group({"params": list(model[2].parameters()), key: value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(model[2].parameters())})
    opt.param_groups[1][key] = value  # edited (say by a scheduler) before a step
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match="param group 1"):
        opt.backward(model(x), y)
    assert unchanged(before, model) and all(p.grad is None for p in model.parameters())


def test_zero_damping_is_refused_at_construction_where_it_must_be_positive():
    with pytest.raises(HyperparameterError, match="positive"):
        curvlib.FNGD(mlp(), "categorical", lr=0.1, alpha=0.0, steps_per_epoch=1)
    with pytest.raises(HyperparameterError, match="positive"):
        curvlib.assemble(mlp(), "categorical", source="gram", structure="smw", damping=0.0)


def test_empty_batches_frozen_models_and_closed_optimizers_are_clear_errors():
    model = mlp()
    opt = curvlib.TNT(model, "categorical", lr=0.1, damping=0.1)
    x, y = data()
    with pytest.raises(InputError, match="empty batch"):
        opt.backward(model(x[:0]), y[:0])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(UsageError, match="nothing to optimize"):
        curvlib.TNT(frozen, "categorical", lr=0.1, damping=0.1)
    opt.close()
    with pytest.raises(UsageError, match="closed"):
        opt.backward(model(x), y)


def test_a_refused_backward_does_not_consume_the_generator():
    model = mlp()
    x, y = data()
    opt = curvlib.TNT(model, "categorical", lr=0.1, damping=0.1,
                      generator=torch.Generator().manual_seed(3))
    state = opt.generator.get_state()
    with pytest.raises(InputError):
        opt.backward(model(x), torch.full_like(y, 7))  # class 7 of 3
    assert torch.equal(opt.generator.get_state(), state)


# -- state dicts ----------------------------------------------------------------------------


def test_load_state_dict_refuses_another_recipe_or_model():
    x, y = data()
    model = mlp()
    tnt = curvlib.TNT(model, "categorical", lr=0.1, damping=0.1)
    tnt.backward(model(x), y)
    tnt.step()
    saved = tnt.state_dict()
    kfac = curvlib.KFAC(mlp(), "categorical", lr=0.1, damping=0.1)
    with pytest.raises(StateDictError, match="saved by an optimizer with"):
        kfac.load_state_dict(saved)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    target = curvlib.TNT(other, "categorical", lr=0.1, damping=0.1)
    with pytest.raises(StateDictError, match="other parameters"):
        target.load_state_dict(saved)
    assert not target.state and target.step_count == 0
    same = curvlib.TNT(mlp(), "categorical", lr=0.1, damping=0.1)
    same.load_state_dict(saved)
    assert same.step_count == 1


def test_compare_prints_the_fallbacks_of_each_run_that_has_any():
    from curvlib import compare

    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    opt = curvlib.KFAC(model, "categorical", lr=0.1, damping=0.1)
    rows = [{"name": r.name, "shape": list(r.shape), "group": r.group,
             "preconditioned": r.preconditioned, "treatment": r.treatment}
            for r in opt.coverage()]
    everything = [dict(r, preconditioned=True) for r in rows]
    text = compare.format_fallbacks({"runs": {"KFAC": {"coverage": rows},
                                              "TNT": {"coverage": everything}}})
    assert text.startswith("KFAC: 1 of 3 parameter tensors are not preconditioned")
    assert "0.weight" in text and "Embedding" in text and "TNT" not in text
    assert compare.format_fallbacks({"runs": {"TNT": {"coverage": everything}}}) == ""


def test_fngd_accumulation_gives_each_micro_batch_its_own_coefficients():
    """Refresh epoch then a shared epoch, two micro-batches a step: each micro-batch's
    ``.grad`` share equals the one of an optimizer that saw that micro-batch alone."""
    x, y = data(7)
    parts = (slice(0, 3), slice(3, 7))

    def build(m):
        return curvlib.FNGD(m, "categorical", lr=0.0, alpha=0.3, momentum=0.0,
                            steps_per_epoch=1)

    alone = []
    for s in parts:
        model = mlp()
        opt = build(model)
        got = []
        for _ in range(2):  # refresh, then shared (stored coefficients at the same point)
            opt.zero_grad()
            opt.backward(model(x[s]), y[s])
            got.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
        alone.append(got)
    model = mlp()
    opt = build(model)
    for step in range(2):
        opt.zero_grad()
        for s in parts:
            opt.backward(model(x[s]), y[s])
        assert opt.last_refresh.get("shared" if step else "refreshed") == 1
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert_close(got, alone[0][step] + alone[1][step], rtol=1e-10, what=f"step {step}")
        opt.step()
    with pytest.raises(UsageError, match="already used"):
        opt.zero_grad()
        opt.backward(model(x[:3]), y[:3], key="a")
        opt.backward(model(x[3:]), y[3:], key="a")


def test_freezing_a_layer_after_construction_is_seen_at_the_next_backward():
    x, y = data()
    model = mlp()
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=1)
    opt.backward(model(x), y)
    opt.step()
    model[0].requires_grad_(False)
    opt.zero_grad()
    opt.backward(model(x), y)
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    rows = {r.name: r for r in opt.coverage()}
    assert rows["0.weight"].reason.startswith("frozen") and rows["2.weight"].preconditioned
    with pytest.raises(UsageError, match="requires_grad changed"):
        model[0].requires_grad_(True)
        opt.backward(model(x), y)


class Upstream(nn.Module):
    """``sq.weight`` used functionally *before* ``sq`` is called on the result: the use lies
    upstream of ``sq``'s recorded call, not inside it."""

    def __init__(self):
        super().__init__()
        self.sq, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x, reuse=True):
        h = torch.tanh(F.linear(x, self.sq.weight)) if reuse else x
        return self.head(torch.tanh(self.sq(h)))


@pytest.mark.parametrize("recipe", ["FNGD", "smw", "KFAC"])
def test_a_use_upstream_of_the_owner_call_is_refused(recipe):
    torch.manual_seed(0)
    model = Upstream().to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    opt = recipes()[recipe](model)
    with pytest.raises(CoverageError, match=r"sq\.weight"):
        opt.backward(model(x), y)


def test_the_audit_runs_again_when_the_calls_per_module_change():
    """A first step without the functional use passes; a later one whose forward calls a
    module more often and reuses a weight is refused, before it changes anything."""
    torch.manual_seed(0)

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x, more=False):
            h = torch.tanh(self.a(x))
            if more:
                h = torch.tanh(self.a(h)) + F.linear(h, self.a.weight)
            return self.b(h)

    model = Branch().to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    opt = recipes()["FNGD"](model)
    opt.backward(model(x), y)
    opt.step()
    before = snapshot(model)
    opt.zero_grad()
    with pytest.raises(CoverageError, match=r"a\.weight"):
        opt.backward(model(x, more=True), y)
    assert unchanged(before, model) and opt.step_count == 1


def test_batch_gradients_from_per_sample_rows_are_each_draws_mean_gradient():
    """With S = 2 draws, ``Statistics.batch_grads()`` (formed from the per-sample rows)
    holds each draw's gradient of the mean loss — 1/N per draw, not 1/(S·N)."""
    from curvlib.capture import Capture
    from curvlib.sources import TrueFisher

    model = mlp()
    x, _ = data()
    with Capture(model) as cap:
        out = model(x)
        stats = TrueFisher(num_samples=2, per_sample=True).collect(
            model, "categorical", out, None, capture=cap,
            generator=torch.Generator().manual_seed(0))
        batch = stats.batch_grads()
    assert len(stats.targets) == 2
    for s, t in enumerate(stats.targets):
        got = torch.cat([batch[n][s].flatten() for n, _ in model.named_parameters()])
        assert_close(got, oracles.gradient(model, "categorical", x, t), rtol=1e-10,
                     what=f"draw {s}")
