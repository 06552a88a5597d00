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
from curvlib.testing.families import FAMILIES, FamilyCase, family_cases
from curvlib.testing.reference import check_steps
from curvlib.testing.strategies import examples

F64 = torch.float64


# -- the model families (curvlib.testing.families) --------------------------------------------


def family(name: str, seed: int, n: int):
    """(model, inputs, targets) of a fixed member of a family, float64."""
    case = FamilyCase(name, width=4, heads=2, classes=3, length=2, batch_size=n, seed=seed)
    return case.model, case.inputs, case.targets


def recipes():
    """name → builder(model) for every recipe (and a plain ``smw``), gentle settings."""
    def gen():  # each optimizer its own generator
        return {"generator": torch.Generator().manual_seed(0)}

    return {
        "TNT": lambda m, **kw: curvlib.TNT(m, "categorical", lr=0.1, damping=0.1, **gen(), **kw),
        "EmpiricalTNT": lambda m, **kw: curvlib.EmpiricalTNT(m, "categorical", lr=0.1,
                                                             damping=0.1, **kw),
        "Shampoo": lambda m, **kw: curvlib.Shampoo(m, "categorical", lr=0.1, damping=0.1, **kw),
        "KFAC": lambda m, **kw: curvlib.KFAC(m, "categorical", lr=0.1, damping=0.1, **gen(),
                                             **kw),
        "FNGD": lambda m, **kw: curvlib.FNGD(m, "categorical", lr=0.1, alpha=0.5,
                                             steps_per_epoch=2, **kw),
        "NaturalGradient": lambda m, **kw: curvlib.NaturalGradient(
            m, "categorical", lr=0.1, damping=0.1, **gen(), **kw),
        "smw": lambda m, **kw: curvlib.assemble(m, "categorical", source="gram",
                                                structure=SMW(blocks="tensor", cover="all"),
                                                damping_rule="constant", lr=0.1, damping=0.5,
                                                **kw),
    }


RECIPES = sorted(recipes())


#: What each recipe does on each family: "exact" (equal to the dense reference) or "refused".
EXPECTED = {
    # every component handles the plain MLP
    **{("mlp", r): "exact" for r in RECIPES},
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


def with_an_added_group(build):
    """``build`` on the first module's parameters, the rest added with ``add_param_group``
    with another ``lr`` and ``damping`` (the groups keep every layer whole)."""

    def built(model):
        names = [n for n, _ in model.named_parameters()]
        first = [p for n, p in model.named_parameters()
                 if n.rpartition(".")[0] == names[0].rpartition(".")[0]]
        rest = [p for p in model.parameters() if all(p is not q for q in first)]
        opt = build(model, params=first)
        group = opt.param_groups[0]
        opt.add_param_group({"params": rest, "lr": group["lr"] / 2,
                             "damping": group["damping"] * 3})
        return opt

    return built


@settings(deadline=None)  # the profile's full count
@given(case=family_cases(), recipe=st.sampled_from(RECIPES), added=st.booleans())
def test_every_recipe_on_every_family_is_exact_or_refused(case, recipe, added):
    """Refused before anything changes, or three steps (FNGD: refresh, shared, refresh) equal
    to :func:`curvlib.testing.reference.check_steps`'s dense float64 reference, parameters and
    steps to 1e-10 — also with the layers after the first added by ``add_param_group``."""
    build = recipes()[recipe]
    if added:
        build = with_an_added_group(build)
    _, refused = run_or_refuse(build, case.model, case.inputs, case.targets)
    assert ("refused" if refused else "exact") == EXPECTED[(case.family, recipe)], case
    if refused:
        return
    model = case.new_model()
    opt = build(model)
    batches = [(case.inputs, case.targets), case.batch(case.seed + 2), case.batch(case.seed + 3)]
    check_steps(opt, model, "categorical", batches, step_rtol=1e-10, step_atol=None)
    assert opt.skipped_steps == 0 and all(r.preconditioned for r in opt.coverage())


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


#: builders whose statistics are deterministic (data targets), so a batch cut in two
#: micro-batches has the same statistics as the whole: the recipes, and empirical-source
#: assemblies of every vector structure
ACCUMULATING = {
    **{r: recipes()[r] for r in ("EmpiricalTNT", "Shampoo", "FNGD", "smw")},
    **{s: (lambda m, s=s: curvlib.assemble(m, "categorical", source="empirical", structure=s,
                                           solver="eigh", lr=0.1, damping=0.1, momentum=0.0,
                                           inverse_every=1))
       for s in ("tensor_normal", "kfac", "shampoo", "diagonal", "dense")},
}
def _grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _structure_state(opt, model):
    return {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor) and k != "momentum_buffer"}


@settings(max_examples=examples(0.5), deadline=None)
@given(case=family_cases(min_batch=2, max_batch=6), name=st.sampled_from(sorted(ACCUMULATING)),
       cut=st.integers(1, 5))
def test_accumulated_micro_batches_are_the_sum_of_their_own_steps(case, name, cut):
    """Two ``opt.backward`` calls, one step. ``.grad`` is the sum of what each micro-batch
    would have given alone: the micro-batches' gradients (vector structures, from the
    oracles), or their own preconditioned gradients (batch structures, each from an optimizer
    that saw that micro-batch alone); a vector structure's statistics are the concatenated
    batch's (its state after the step equals that of one backward on the whole batch).
    Where the whole batch is refused, the first micro-batch is, with nothing changed."""
    build = ACCUMULATING[name]
    x, y = case.inputs, case.targets
    cut = min(cut, len(y) - 1)
    parts = (slice(0, cut), slice(cut, len(y)))
    whole_model = case.new_model()
    whole = build(whole_model)
    try:
        whole.backward(whole_model(x), y)
    except CurvlibError as refusal:
        model = case.new_model()
        opt = build(model)
        with pytest.raises(type(refusal)):
            opt.backward(model(x[parts[0]]), y[parts[0]])
        assert all(p.grad is None for p in model.parameters()) and not opt.state
        return
    whole.step()
    model = case.new_model()
    opt = build(model)
    opt.zero_grad()
    for s in parts:
        opt.backward(model(x[s]), y[s])
    got = _grad(model)
    if opt.structure.preconditions == "vector":
        rows = oracles.per_sample_grads(case.new_model(), "categorical", x, y)
        expected = sum(rows[s].mean(0) for s in parts)
        assert_close(got, expected, rtol=1e-10, what=".grad, accumulated")
        opt.step()
        mine, theirs = _structure_state(opt, model), _structure_state(whole, whole_model)
        assert mine.keys() == theirs.keys() and mine, name
        for k in mine:
            assert_close(mine[k].to(F64), theirs[k].to(F64), rtol=1e-10, what=f"{name} {k}")
    else:
        alone = []
        for s in parts:
            m = case.new_model()
            o = build(m)
            o.backward(m(x[s]), y[s])
            alone.append(_grad(m))
        assert_close(got, alone[0] + alone[1], rtol=1e-10, what=f"{name}, accumulated")


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


@pytest.mark.parametrize("kernel", [True, False], ids=["amp-kernel", "fallback"])
@pytest.mark.parametrize("bad", [None, math.inf, -math.inf, math.nan, 3e38])
def test_the_non_finite_flag_sees_every_inf_and_nan_and_leaves_values_alone(
        kernel, bad, monkeypatch):
    """The check behind the policy: flags ±Inf and NaN in any tensor, any floating dtype,
    sparse values too, never a large finite value (3e38 in float32: a norm would overflow),
    and leaves every value as it was; the same with torch's kernel and without it."""
    from curvlib.optim import _non_finite_flag

    if not kernel:
        def missing(*args, **kwargs):
            raise NotImplementedError("no kernel")
        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=F64), torch.randn(2, 2).to_sparse(),
               torch.arange(3), torch.zeros(0)]
    for where in range(3):
        copies = [t.clone() for t in tensors]
        if bad is not None:
            target = copies[where]
            if target.is_sparse:
                target._values()[1] = bad
            else:
                target.view(-1)[1] = bad
        before = [t.clone() for t in copies]
        flag = _non_finite_flag(copies, torch.device("cpu"))
        finite = bad is None or math.isfinite(bad)
        assert bool(flag) == (not finite), (where, bad)
        for a, b in zip(before, copies, strict=True):
            a, b = (a.to_dense(), b.to_dense()) if a.is_sparse else (a, b)
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


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
