"""Likelihoods against torch's losses, autograd Hessians and exact enumeration."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import curvlib
from curvlib.testing.assertions import assert_close, assert_psd, check_likelihood
from curvlib.testing.strategies import likelihood_names, seeds, tensor_shapes

F64 = torch.float64


def outputs_for(name, shape, seed):
    """Random outputs of ``shape`` (categorical: at least two classes in dim 1)."""
    if name == "categorical":
        shape = (shape[0], max(2, shape[1]) if len(shape) > 1 else 2, *shape[2:])
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(shape, generator=gen, dtype=F64)


@given(shape=tensor_shapes(1, 4, max_side=4), seed=seeds())
def test_categorical_matches_cross_entropy(shape, seed):
    f = outputs_for("categorical", shape if len(shape) > 1 else (shape[0], 2), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(f.shape[1], (f.shape[0], *f.shape[2:]), generator=gen)
    lik = curvlib.Categorical()
    per_element = torch.nn.CrossEntropyLoss(reduction="none")(f, y)
    assert_close(lik.loss(f, y), per_element.reshape(f.shape[0], -1).sum(1), rtol=1e-14)
    # mean over samples = torch's "sum" reduction / N = torch's "mean" × positions per sample
    total = torch.nn.CrossEntropyLoss(reduction="sum")(f, y)
    assert_close(lik.mean_loss(f, y), total / f.shape[0], rtol=1e-14)
    positions = f[0, 0].numel()
    assert_close(lik.mean_loss(f, y), torch.nn.CrossEntropyLoss()(f, y) * positions, rtol=1e-13)


@given(shape=tensor_shapes(1, 4, max_side=4), seed=seeds())
def test_bernoulli_and_gaussian_match_torch(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=gen, dtype=F64)
    y01 = torch.rand(shape, generator=gen, dtype=F64)  # soft targets, as torch allows
    n = shape[0]
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")(f, y01).reshape(n, -1).sum(1)
    assert_close(curvlib.Bernoulli().loss(f, y01), bce, rtol=1e-14)
    y = torch.randn(shape, generator=gen, dtype=F64)
    mse = 0.5 * torch.nn.MSELoss(reduction="none")(f, y).reshape(n, -1).sum(1)
    assert_close(curvlib.Gaussian().loss(f, y), mse, rtol=1e-14)


@given(name=likelihood_names(), shape=tensor_shapes(1, 3, max_side=4), seed=seeds())
def test_fisher_is_the_loss_hessian_and_the_square_of_its_root(name, shape, seed):
    """All three pairs are canonical: Λ(f) equals ∂²ℓ/∂f², computed here by autograd."""
    lik = curvlib.as_likelihood(name)
    if name == "categorical" and len(shape) == 1:
        shape = (*shape, 2)
    f = outputs_for(name, shape, seed)
    y = lik.sample(f, torch.Generator().manual_seed(seed))
    n, k = f.shape[0], f[0].numel()

    def loss_of_flat(fn, yn):
        return lik.loss(fn.reshape(1, *f.shape[1:]), yn.unsqueeze(0)).sum()

    hess = torch.stack([
        torch.autograd.functional.hessian(lambda v, i=i: loss_of_flat(v, y[i]), f[i].flatten())
        for i in range(n)
    ])
    lam = lik.fisher(f)
    assert lam.shape == (n, k, k)
    assert_close(lam, hess, rtol=1e-12, what="Λ and the loss Hessian")
    root = lik.fisher_sqrt(f)
    assert_close(root @ root.mT, lam, rtol=1e-12, what="S Sᵀ and Λ")
    assert_psd(lam, what="Λ")


@given(classes=st.integers(2, 3), positions=st.integers(1, 2), n=st.integers(1, 3), seed=seeds())
def test_categorical_fisher_by_exact_enumeration(classes, positions, n, seed):
    """Λ = Σ_y p(y|f) ∇_f ℓ ∇_f ℓᵀ, summing over every joint target of the positions."""
    f = outputs_for("categorical", (n, classes, positions), seed)
    lik = curvlib.Categorical()
    lam = lik.fisher(f)
    expected = torch.zeros_like(lam)
    for joint in itertools.product(range(classes), repeat=positions):
        y = torch.tensor(joint).expand(n, positions)
        leaf = f.clone().requires_grad_(True)
        loss = lik.loss(leaf, y)
        (score,) = torch.autograd.grad(loss.sum(), leaf)
        prob = torch.exp(-loss.detach())  # p(y | f) of the whole joint target
        s = score.reshape(n, -1)
        expected += prob[:, None, None] * s[:, :, None] * s[:, None, :]
    assert_close(lam, expected, rtol=1e-12)
    assert_close(lam.sum(-1), torch.zeros(lam.shape[:2], dtype=F64), atol=1e-14,
                 what="row sums of Λ")


@pytest.mark.parametrize(
    ("name", "shape"),
    [("categorical", (3, 4)), ("categorical", (2, 3, 2)), ("bernoulli", (3, 2, 2)),
     ("gaussian", (2, 5))],
)
def test_sampling_has_the_score_moments_of_the_fisher(name, shape):
    """Mean score 0 and second moment Λ: for these likelihoods that pins E[y] and Var[y].

    Statistical (fixed seeds): ``check_likelihood`` allows 4 Monte-Carlo standard errors,
    estimated from the draws themselves (its docstring gives the false-alarm bound).
    """
    f = outputs_for(name, shape, 0)
    check_likelihood(name, f, generator=torch.Generator().manual_seed(1), canonical=True)


def test_check_likelihood_catches_a_wrong_fisher():
    class Wrong(curvlib.Gaussian):
        def fisher(self, outputs):
            return 1.1 * super().fisher(outputs)

        def fisher_sqrt(self, outputs):
            return 1.1**0.5 * super().fisher_sqrt(outputs)

    f = outputs_for("gaussian", (3, 4), 0)
    with pytest.raises(AssertionError, match="second moment"):
        check_likelihood(Wrong(), f, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["categorical", "bernoulli", "gaussian"])
def test_sampling_is_reproducible_and_well_typed(name):
    lik = curvlib.as_likelihood(name)
    f = outputs_for(name, (4, 3, 2), 3)
    a = lik.sample(f, torch.Generator().manual_seed(7))
    b = lik.sample(f, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    if name == "categorical":
        assert a.dtype == torch.int64 and a.shape == (4, 2)
        assert a.min() >= 0 and a.max() < 3
    else:
        assert a.shape == f.shape and a.dtype == F64
    if name == "bernoulli":
        assert set(a.unique().tolist()) <= {0.0, 1.0}
    lik.loss(f, a)  # sampled targets are valid targets


def test_float32_outputs_work():
    f = torch.randn(3, 4)
    for name in ("categorical", "bernoulli", "gaussian"):
        lik = curvlib.as_likelihood(name)
        y = lik.sample(f, torch.Generator().manual_seed(0))
        assert lik.loss(f, y).dtype == torch.float32
        assert lik.fisher(f).dtype == torch.float32


def test_bad_inputs_have_clear_errors():
    cat = curvlib.Categorical()
    f = torch.randn(3, 4)
    with pytest.raises(ValueError, match="integer class indices of shape"):
        cat.loss(f, torch.rand(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        cat.loss(f, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"at least 2 classes.*bernoulli"):
        cat.fisher(torch.randn(3, 1))
    with pytest.raises(ValueError, match="batch dimension first"):
        curvlib.Gaussian().fisher(torch.tensor(1.0))
    with pytest.raises(ValueError, match="targets must have the outputs' shape"):
        curvlib.Bernoulli().loss(f, torch.zeros(3))
    with pytest.raises(TypeError, match="floating point"):
        curvlib.Gaussian().fisher(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(curvlib.registry.UnknownComponentError, match="categorical"):
        curvlib.as_likelihood("categorial")
    with pytest.raises(TypeError, match="lacks loss, sample, fisher, fisher_sqrt"):
        curvlib.as_likelihood(object())


def test_as_likelihood_accepts_names_classes_and_objects():
    obj = curvlib.Bernoulli()
    assert curvlib.as_likelihood(obj) is obj
    assert isinstance(curvlib.as_likelihood(curvlib.Gaussian), curvlib.Gaussian)
    assert isinstance(curvlib.as_likelihood("categorical"), curvlib.Categorical)


# -- targets out of range ----------------------------------------------------------------------


@pytest.fixture(params=["torch", "explicit"])
def index_check(request, monkeypatch):
    """Both ways categorical indices are checked: torch's CPU bounds check (caught and
    explained), and the explicit check used off the CPU (forced here on the CPU)."""
    if request.param == "explicit":
        monkeypatch.setattr(curvlib.likelihoods, "_checks_explicitly", lambda t: True)
    return request.param


@pytest.mark.parametrize(("shape", "bad"), [
    ((4, 3), 3), ((4, 3), 5), ((4, 3), -1), ((4, 3), -100), ((2, 3, 2, 2), 7),
    ((2, 3, 5), -2)])
def test_categorical_targets_out_of_range_are_input_errors(index_check, shape, bad):
    f = outputs_for("categorical", shape, 0)
    y = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    y.view(-1)[1] = bad
    lik = curvlib.Categorical()
    for call in (lik.loss, lik.mean_loss):
        with pytest.raises(curvlib.errors.InputError,
                           match=r"categorical: targets must be class indices in \[0, 3\)"
                                 r".*outside the range\. Relabel") as caught:
            call(f, y)
        assert isinstance(caught.value, ValueError)
        if index_check == "torch":
            assert isinstance(caught.value.__cause__, IndexError)  # torch's, explained
        else:
            assert caught.value.__cause__ is None  # refused before cross_entropy ran
    if bad == -100:
        assert "skips -100" in str(caught.value)
    y.view(-1)[1] = 2
    lik.loss(f, y)  # in range again


def test_the_explicit_check_also_refuses_the_index_nothing_else_ignores(monkeypatch):
    monkeypatch.setattr(curvlib.likelihoods, "_checks_explicitly", lambda t: True)
    y = torch.tensor([0, curvlib.likelihoods._NO_INDEX, 1])
    with pytest.raises(curvlib.errors.InputError, match=r"\[0, 2\)"):
        curvlib.Categorical().loss(torch.randn(3, 2), y)


def test_categorical_targets_out_of_range_under_vmap_are_input_errors():
    """The oracles differentiate the loss per sample under torch.func.vmap (no explicit
    check there); torch's CPU bounds check still refuses, and is explained."""
    from curvlib.testing import oracles

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3).to(F64)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(curvlib.errors.InputError, match=r"categorical.*\[0, 3\)"):
        oracles.per_sample_grads(model, "categorical", x, torch.tensor([0, 1, 3, 2]))


class _Syncs:
    """Counts ``bool(tensor)`` calls: the host synchronisations of the checks."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = torch.Tensor.__bool__

        def counted(tensor):
            self.count += 1
            return original(tensor)

        monkeypatch.setattr(torch.Tensor, "__bool__", counted)


def test_the_explicit_check_syncs_once_and_skips_sampled_and_checked_targets(monkeypatch):
    monkeypatch.setattr(curvlib.likelihoods, "_checks_explicitly", lambda t: True)
    lik = curvlib.Categorical()
    f = outputs_for("categorical", (5, 4, 3), 1)
    sampled = lik.sample(f, torch.Generator().manual_seed(0))
    data = sampled.clone()
    syncs = _Syncs(monkeypatch)
    lik.loss(f, sampled)
    assert syncs.count == 0  # in range by construction
    lik.loss(f, data)
    assert syncs.count == 1  # one check
    lik.mean_loss(f, data)
    lik.loss(outputs_for("categorical", (5, 6, 3), 1), data)  # more classes: still valid
    assert syncs.count == 1  # checked already, not changed since
    with pytest.raises(curvlib.errors.InputError, match=r"\[0, 2\)"):
        lik.loss(f[:, :2], data)  # fewer classes: checked again
    data[0, 0] = 4  # changed in place: checked again
    with pytest.raises(curvlib.errors.InputError, match=r"\[0, 4\)"):
        lik.loss(f, data)
    sampled[1, 1] = -1
    with pytest.raises(curvlib.errors.InputError, match=r"\[0, 4\)"):
        lik.loss(f, sampled)


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan"), float("inf"), -float("inf"), 2])
def test_bernoulli_targets_outside_0_1_are_input_errors(bad):
    f = torch.randn(3, 2, dtype=F64)
    y = (torch.full((3, 2), 0.5, dtype=F64) if isinstance(bad, float)
         else torch.ones(3, 2, dtype=torch.long))
    y[1, 0] = bad
    lik = curvlib.Bernoulli()
    for call in (lik.loss, lik.mean_loss):
        with pytest.raises(curvlib.errors.InputError,
                           match=r"bernoulli: targets must be probabilities in \[0, 1\]"):
            call(f, y)
    if bad != bad or abs(bad) == float("inf"):
        with pytest.raises(ValueError, match="NaN or infinite"):
            lik.loss(f, y)


def test_bernoulli_accepts_soft_integer_and_boolean_targets_and_skips_sampled(monkeypatch):
    lik = curvlib.Bernoulli()
    f = torch.randn(4, 3, dtype=F64)
    soft = torch.tensor([0.0, 1.0, 0.3], dtype=F64).expand(4, 3)
    hard = (soft > 0.5).long()
    expected = lik.loss(f, hard.to(F64))
    assert torch.equal(lik.loss(f, hard), expected)
    assert torch.equal(lik.loss(f, hard.bool()), expected)
    lik.loss(f, soft)
    sampled = lik.sample(f, torch.Generator().manual_seed(2))
    syncs = _Syncs(monkeypatch)
    lik.loss(f, sampled)
    assert syncs.count == 0
    sampled[0, 0] = 3.0
    with pytest.raises(curvlib.errors.InputError, match="bernoulli"):
        lik.loss(f, sampled)


@pytest.mark.parametrize("recipe", ["FNGD", "TNT"])
def test_the_optimizers_refuse_targets_out_of_range(recipe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).to(F64)
    options = {"alpha": 0.5, "steps_per_epoch": 1} if recipe == "FNGD" else {"damping": 0.1}
    opt = getattr(curvlib, recipe)(model, "categorical", lr=0.1, **options)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(curvlib.errors.InputError, match=r"categorical.*\[0, 3\)"):
        opt.backward(model(x), torch.tensor([0, 1, 3, 2]))
    assert all(p.grad is None for p in model.parameters())
