"""FNGD: coefficient sharing around ``smw``, against dense float64 computations.

* During the refresh epoch FNGD is per-batch empirical-Fisher NGD (``smw``), step by step.
* The coefficients it stores are those of the dense computation
  ``c = λ (UᵀU + λM I)⁻¹ 1`` (``U`` from :func:`curvlib.testing.oracles.per_sample_grads`,
  ``λ = α‖UᵀU‖_F``), and a shared step's gradient is ``Σ_m c_m g_m`` with the oracle's
  per-sample gradients of the new batch.
* Keys (positions, explicit keys, sample ids), refresh periods, the batch-size rule, the
  one-vector-per-model mode and the ``state_dict`` round trip.

Float64, 1e-10 relative unless noted.
"""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.optim import CompatibilityError
from curvlib.sources import Statistics
from curvlib.structures import SMW, CoefficientSharing
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import examples, problems, seeds

F64 = torch.float64


def layer_slices(model):
    """Module name → index tensor of its parameters' entries (model.parameters() order)."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        idx = torch.arange(start, start + p.numel())
        out[owner] = idx if owner not in out else torch.cat([out[owner], idx])
        start += p.numel()
    return out


def dense_coefficients(rows, alpha):
    """c = λ (K + λM I)⁻¹ 1 with K = UᵀU, λ = α‖K‖_F (the "sgd" scale)."""
    k = rows @ rows.T
    m = k.shape[0]
    if not k.any():  # no gradient (U = 0): any c gives U c = 0; curvlib stores the limit 1/M
        return torch.full((m,), 1.0 / m, dtype=F64)
    lam = alpha * torch.linalg.matrix_norm(k)
    return lam * torch.linalg.solve(k + lam * m * torch.eye(m, dtype=F64),
                                    torch.ones(m, dtype=F64))


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def batches(problem, count, seed):
    """``count`` batches of the problem's shapes (inputs and data targets)."""
    gen = torch.Generator().manual_seed(seed)
    n = problem.batch_size
    out = []
    for _ in range(count):
        x = torch.randn(problem.inputs.shape, generator=gen, dtype=F64)
        perm = torch.randperm(n, generator=gen)
        out.append((x, problem.targets[perm]))
    return out


def train(opt, model, data, **kwargs):
    for x, y in data:
        opt.zero_grad()
        opt.backward(model(x), y, **kwargs)
        opt.step()


# -- refresh epoch == smw, shared steps == stored coefficients ---------------------------------


@settings(max_examples=examples(0.1))
@given(problem=problems(kinds=("mlp", "cnn1d", "cnn2d"), sizes=st.integers(2, 5)),
       alpha=st.floats(0.05, 5.0), momentum=st.sampled_from([0.0, 0.9]),
       wd=st.sampled_from([0.0, 0.01]), seed=seeds())
def test_refresh_epoch_is_smw_and_shared_steps_use_the_dense_coefficients(
        problem, alpha, momentum, wd, seed):
    steps = 2
    data = batches(problem, 2 * steps, seed)
    model = problem.model
    twin = copy.deepcopy(model)
    fngd = curvlib.FNGD(model, problem.likelihood, lr=0.05, alpha=alpha, momentum=momentum,
                        weight_decay=wd, steps_per_epoch=steps)
    smw = curvlib.assemble(twin, problem.likelihood, source="gram", structure="smw", lr=0.05,
                           damping=alpha, momentum=momentum, weight_decay=wd)
    slices = layer_slices(model)
    stored_ref = {}
    for t, (x, y) in enumerate(data[:steps]):  # the refresh epoch
        rows = oracles.per_sample_grads(model, problem.likelihood, x, y)
        stored_ref[t] = {name: dense_coefficients(rows[:, idx], alpha)
                         for name, idx in slices.items()}
        for opt, m in ((fngd, model), (smw, twin)):
            opt.zero_grad()
            opt.backward(m(x), y)
            opt.step()
        assert fngd.last_refresh.get("refreshed") == 1
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert_close(a, b, rtol=1e-10, what=f"FNGD vs smw at refresh step {t}")
    for t in range(steps):
        stored = fngd.structure_state["positions"][t]["coefficients"]
        for name, c in stored_ref[t].items():
            assert_close(stored[name], c, rtol=1e-9, what=f"stored coefficients of {name}")
    for t, (x, y) in enumerate(data[steps:]):  # the shared epoch
        rows = oracles.per_sample_grads(model, problem.likelihood, x, y)
        expected = torch.empty(rows.shape[1], dtype=F64)
        for name, idx in slices.items():
            expected[idx] = stored_ref[t][name] @ rows[:, idx]
        fngd.zero_grad()
        fngd.backward(model(x), y)
        assert fngd.last_refresh.get("shared") == 1
        assert_close(flat_grads(model), expected, rtol=1e-9, what=f"shared step {t}")
        fngd.step()


def test_shared_steps_compute_no_gram(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, steps_per_epoch=1)
    train(opt, model, [(x, y)])

    def forbidden(self):
        raise AssertionError("a shared step computed a Gram")

    monkeypatch.setattr(Statistics, "gram", forbidden)
    train(opt, model, [(x, y)] * 2)


# -- keys -----------------------------------------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def data_of(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen))
            for n in sizes]


def test_position_keys_cycle_with_the_epoch():
    model = mlp()
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, steps_per_epoch=3)
    seen = []
    for x, y in data_of([4] * 7):
        opt.zero_grad()
        opt.backward(model(x), y)
        seen.append("refreshed" in opt.last_refresh)
        opt.step()
    assert seen == [True, True, True, False, False, False, False]
    entries = opt.structure_state["positions"]
    assert sorted(entries) == [0, 1, 2]
    assert [entries[k]["uses"] for k in range(3)] == [3, 2, 2]


def test_explicit_keys_and_refresh_every():
    model = mlp()
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, refresh_every=2)
    pattern = []
    for i, (x, y) in enumerate(data_of([4] * 6)):
        opt.zero_grad()
        opt.backward(model(x), y, key=("batch", i % 2))
        pattern.append("refreshed" in opt.last_refresh)
        opt.step()
    # each key: used at uses 1, 2, 3 → refreshed at its 1st and 3rd use (every 2nd use)
    assert pattern == [True, True, False, False, True, True]


def test_missing_key_information_is_a_clear_error():
    model = mlp()
    (x, y), = data_of([4])
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        opt.backward(model(x), y)
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, key="sample")
    with pytest.raises(ValueError, match="sample_ids"):
        opt.backward(model(x), y)
    with pytest.raises(ValueError, match="distinct"):
        opt.backward(model(x), y, sample_ids=torch.tensor([0, 0, 1, 2]))
    assert opt.structure_state.get("samples", {}) == {}
    assert all(p.grad is None for p in model.parameters())


def test_sample_keys_follow_the_samples_and_rescale_to_the_batch_size():
    """Coefficients stored per sample id; a batch of N reuses c_m · M_m / N."""
    model = mlp()
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(10, 3, generator=gen, dtype=F64)
    ys = torch.randint(0, 3, (10,), generator=gen)
    opt = curvlib.FNGD(model, "categorical", lr=0.0, alpha=1.0, key="sample", momentum=0.0)
    for ids in (torch.arange(0, 5), torch.arange(5, 10)):  # the first epoch: M_m = 5
        opt.zero_grad()
        opt.backward(model(xs[ids]), ys[ids], sample_ids=ids)
        assert opt.last_refresh.get("refreshed") == 1
        opt.step()  # step() commits the coefficients to the store
    table = opt.structure_state["samples"]
    ids = torch.tensor([7, 1, 3, 9])  # reshuffled, and a batch of 4
    opt.zero_grad()
    opt.backward(model(xs[ids]), ys[ids], sample_ids=ids)
    assert opt.last_refresh.get("shared") == 1
    rows = oracles.per_sample_grads(model, "categorical", xs[ids], ys[ids])
    expected = torch.empty(rows.shape[1], dtype=F64)
    for name, idx in layer_slices(model).items():
        c = table["coefficients"][name][ids] * 5 / 4
        expected[idx] = c @ rows[:, idx]
    assert_close(flat_grads(model), expected, rtol=1e-10, what="sample-keyed shared step")
    opt.step()
    table = opt.structure_state["samples"]
    assert table["uses"][ids].tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("rule", ["recompute", "uniform", "error"])
def test_a_batch_of_another_size_follows_the_rule(rule):
    model = mlp()
    opt = curvlib.FNGD(model, "categorical", lr=0.0, alpha=1.0, momentum=0.0,
                       size_mismatch=rule)
    (x4, y4), (x3, y3) = data_of([4, 3])
    opt.zero_grad()
    opt.backward(model(x4), y4, key="last")
    opt.step()  # step() commits the coefficients to the store
    stored = {k: v.clone() for k, v in
              opt.structure_state["positions"]["last"]["coefficients"].items()}
    opt.zero_grad()
    if rule == "error":
        with pytest.raises(ValueError, match="computed for 4"):
            opt.backward(model(x3), y3, key="last")
        return
    opt.backward(model(x3), y3, key="last")
    opt.step()
    entry = opt.structure_state["positions"]["last"]
    if rule == "recompute":
        assert opt.last_refresh.get("refreshed") == 1 and entry["size"] == 3
        return
    assert opt.last_refresh.get("shared") == 1 and entry["size"] == 4
    rows = oracles.per_sample_grads(model, "categorical", x3, y3)
    expected = torch.empty(rows.shape[1], dtype=F64)
    for name, idx in layer_slices(model).items():
        expected[idx] = (stored[name].sum() / 3) * rows[:, idx].sum(0)
    assert_close(flat_grads(model), expected, rtol=1e-10, what="uniform rule")


# -- one vector for the whole model ------------------------------------------------------------


def norm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


@settings(max_examples=examples(0.05))
@given(seed=seeds(), n=st.integers(1, 5), alpha=st.floats(0.05, 5.0))
def test_model_vector_shared_step_is_one_backward_of_weighted_losses(seed, n, alpha):
    model = norm_model(seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    opt = curvlib.FNGD(model, "categorical", lr=0.0, alpha=alpha, momentum=0.0,
                       blocks="model", steps_per_epoch=1)
    names = [name for name, _ in model.named_parameters()]
    covered = [i for i, name in enumerate(names) if name.startswith(("0.", "3."))]
    sizes = [p.numel() for p in model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    idx = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in covered])
    rows = oracles.per_sample_grads(model, "categorical", x, y)
    c = dense_coefficients(rows[:, idx], alpha)
    for step in range(2):  # refresh, then shared (one weighted backward)
        opt.zero_grad()
        opt.backward(model(x), y)
        assert ("refreshed" if step == 0 else "shared") in opt.last_refresh
        expected = rows.mean(0)  # LayerNorm: the plain gradient
        expected[idx] = c @ rows[:, idx]
        assert_close(flat_grads(model), expected, rtol=1e-9, what=f"model vector, step {step}")
        opt.step()


# -- state_dict and composition ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["position", "sample"])
def test_state_dict_round_trip_includes_stored_coefficients(key):
    data = data_of([4] * 6, seed=5)
    model = mlp(2)
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.5, steps_per_epoch=3, key=key)

    def run(opt, model, part):
        for i, (x, y) in part:
            opt.zero_grad()
            ids = torch.arange(4 * (i % 3), 4 * (i % 3) + 4) if key == "sample" else None
            opt.backward(model(x), y, sample_ids=ids)
            opt.step()

    run(opt, model, list(enumerate(data))[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(opt, model, list(enumerate(data))[4:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = mlp(9)
    fresh.load_state_dict(saved["model"])
    reopened = curvlib.FNGD(fresh, "categorical", lr=0.1, alpha=0.5, steps_per_epoch=3, key=key)
    reopened.load_state_dict(saved["opt"])
    assert reopened.structure_state.keys() == opt.structure_state.keys()
    run(reopened, fresh, list(enumerate(data))[4:])
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sharing_needs_data_targets_and_a_coefficient_structure():
    model = mlp()
    with pytest.raises(CompatibilityError, match="data's targets"):
        curvlib.assemble(model, "categorical", source=curvlib.sources.GramSource("sampled"),
                         structure="coefficient_sharing")
    with pytest.raises(TypeError, match="produces coefficients"):
        CoefficientSharing("tensor_normal")
    with pytest.raises(ValueError, match="size_mismatch"):
        CoefficientSharing(size_mismatch="drop")
    assert repr(CoefficientSharing(SMW(blocks="tensor"))).startswith("CoefficientSharing(")


def test_plain_parameters_get_the_mean_gradient():
    """Norm layers and embeddings: plain gradient by default (as the paper)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 6), nn.LayerNorm(6),
                          nn.Linear(6, 3)).to(F64)
    x, y = torch.randint(0, 7, (5, 2)), torch.randint(0, 3, (5,))
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, steps_per_epoch=2)
    opt.zero_grad()
    opt.backward(model(x), y)
    plain = torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                [model[0].weight, model[3].weight, model[3].bias])
    for p, g in zip([model[0].weight, model[3].weight, model[3].bias], plain, strict=True):
        assert_close(p.grad, g, rtol=1e-12, what="plain gradient")


def test_a_model_with_no_registered_layer_steps_with_plain_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(3)).to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 3, (4,))
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=1.0, momentum=0.0, steps_per_epoch=1)
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                   list(model.parameters()))
    opt.zero_grad()
    opt.backward(model(x), y)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert_close(p.grad, g, rtol=1e-12, what="plain gradient")
    opt.step()
    assert opt.structure_state == {}


class Twice(nn.Module):
    """One Linear applied twice (weight sharing: two calls per forward) and an unused one."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("blocks", ["layer", "tensor"])
def test_shared_weighted_gradients_sum_repeated_calls_and_handle_tensor_blocks(blocks):
    """A shared step forms Σ c_m g_m layer by layer from the recorded X and Z after the
    backward pass: a module called twice sums its calls, per-tensor blocks give weight and
    bias their own c, an unused module gets zero."""
    torch.manual_seed(0)
    model = Twice().to(F64)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(5, 3, generator=gen, dtype=F64) for _ in range(2))
    y1, y2 = (torch.randint(0, 2, (5,), generator=gen) for _ in range(2))
    opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.5, steps_per_epoch=1,
                       blocks=blocks)
    train(opt, model, [(x1, y1)])
    stored = opt.structure_state["positions"][0]["coefficients"]
    opt.zero_grad()
    opt.backward(model(x2), y2)
    assert opt.last_refresh == {"shared": 1}
    rows = oracles.per_sample_grads(model, "categorical", x2, y2)
    start = 0
    for name, p in model.named_parameters():
        idx = torch.arange(start, start + p.numel())
        start += p.numel()
        c = stored[name if blocks == "tensor" else name.rpartition(".")[0]] \
            if not name.startswith("unused") else torch.zeros(5, dtype=F64)
        assert_close(p.grad.flatten(), c @ rows[:, idx], rtol=1e-10, atol=1e-300,
                     what=f"shared direction of {name}")


def test_in_place_activations_give_the_same_refresh_and_shared_steps():
    """The optimizer's capture reads Z from the backward pass it runs (no output hooks): a
    ReLU(inplace=True) that overwrites a layer's output must not change any step."""
    torch.manual_seed(3)

    def net(inplace):
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5),
                             nn.ReLU(inplace=inplace), nn.Linear(5, 3)).to(F64)

    plain = net(False)
    inplace = net(True)
    inplace.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(7, 4, generator=gen, dtype=F64), torch.randint(0, 3, (7,), generator=gen))
            for _ in range(4)]
    opts = [curvlib.FNGD(m, "categorical", lr=0.1, alpha=0.3, steps_per_epoch=2)
            for m in (plain, inplace)]
    for t, (x, y) in enumerate(data):  # two refresh steps, then two shared steps
        for opt, m in zip(opts, (plain, inplace), strict=True):
            opt.zero_grad()
            opt.backward(m(x), y)
            opt.step()
        assert opts[1].last_refresh == ({"refreshed": 1} if t < 2 else {"shared": 1})
        for a, b in zip(plain.parameters(), inplace.parameters(), strict=True):
            assert_close(b, a, rtol=1e-12, what=f"in-place vs plain ReLU at step {t}")


def test_a_shared_step_uses_the_stored_coefficients_as_they_are_now():
    """Shared steps keep working copies of the stored coefficients; editing or replacing the
    stored ones (by hand, or by load_state_dict) is seen by the next shared step."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 3, generator=gen, dtype=F64), torch.randint(0, 2, (6,), generator=gen)
    opt = curvlib.FNGD(model, "categorical", lr=0.0, alpha=0.5, steps_per_epoch=1)
    train(opt, model, [(x, y), (x, y)])  # a refresh, then a shared step (cached copies)
    rows = oracles.per_sample_grads(model, "categorical", x, y)
    slices = layer_slices(model)
    stored = opt.structure_state["positions"][0]["coefficients"]

    def expected():
        out = torch.empty(rows.shape[1], dtype=F64)
        for name, idx in slices.items():
            out[idx] = stored[name] @ rows[:, idx]
        return out

    stored["0"].mul_(3.0)  # in place
    opt.zero_grad()
    opt.backward(model(x), y)
    assert opt.last_refresh == {"shared": 1}
    assert_close(flat_grads(model), expected(), rtol=1e-10, what="after an in-place edit")
    opt.step()
    sd = opt.state_dict()
    sd["curvlib"]["structure"]["positions"][0]["coefficients"]["2"] *= -1.0
    opt.load_state_dict(sd)
    stored = opt.structure_state["positions"][0]["coefficients"]
    opt.zero_grad()
    opt.backward(model(x), y)
    assert_close(flat_grads(model), expected(), rtol=1e-10, what="after load_state_dict")
