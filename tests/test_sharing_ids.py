"""``coefficient_sharing(key="sample")`` with arbitrary integer ids.

The stored table grows with the number of distinct ids, not with their values: ids near
1e9 or 2**62, and negative ids, train exactly (bit for bit) as the same run with the ids
relabelled to 0, 1, 2, …; repeated ids in a batch and non-integer ids are refused with
:class:`~curvlib.errors.InputError`; the table round-trips through ``state_dict``, and one
saved in the earlier dense layout (indexed by the id itself) still loads.
"""

import io

import pytest
import torch
from torch import nn

import curvlib
from curvlib.errors import InputError

F64 = torch.float64
N_DATA = 10

#: Dataset index → id, for each labelling (all distinct; "small" is the identity).
LABELS = {
    "small": torch.arange(N_DATA),
    "near_1e9": 10**9 + torch.tensor([7, 0, 3, 9, 1, 8, 2, 6, 5, 4]),
    "near_2_62": 2**62 + torch.tensor([-5, 11, 2, 0, 7, -1, 3, 100, 9, 4]),
    "negative": -torch.tensor([3, 1, 4, 15, 9, 2, 6, 5, 35, 8]),
    "mixed": torch.tensor([-(2**63), 2**63 - 1, 0, -1, 10**12, 5, -(10**9), 17, 2**40, 3]),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def dataset(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N_DATA, 3, generator=gen, dtype=F64),
            torch.randint(0, 3, (N_DATA,), generator=gen))


def epochs(count, seed=2, batch=4):
    """Per epoch, the batches' dataset indices: reshuffled, the last batch smaller."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(N_DATA, generator=gen).split(batch) for _ in range(count)]


def run(opt, model, order, ids_of, data):
    xs, ys = data
    reports = []
    for batches in order:
        for index in batches:
            opt.zero_grad()
            opt.backward(model(xs[index]), ys[index], sample_ids=ids_of[index])
            opt.step()
            reports.append(dict(opt.last_refresh))
    return reports


def fngd(model, **options):
    return curvlib.FNGD(model, "categorical", **{"lr": 0.1, "alpha": 0.5, "key": "sample",
                                                 **options})


@pytest.mark.parametrize("labels", [k for k in LABELS if k != "small"])
@pytest.mark.parametrize("refresh_every", [None, 2])
def test_large_and_negative_ids_train_exactly_as_relabelled_small_ids(labels, refresh_every):
    data, order = dataset(), epochs(4)
    results = {}
    for name in ("small", labels):
        model = mlp()
        opt = fngd(model, refresh_every=refresh_every)
        reports = run(opt, model, order, LABELS[name], data)
        results[name] = (reports, [p.detach().clone() for p in model.parameters()], opt)
    (small_reports, small_params, _), (reports, params, opt) = results["small"], results[labels]
    assert reports == small_reports
    assert any(r.get("shared") for r in reports) and any(r.get("refreshed") for r in reports)
    for a, b in zip(small_params, params, strict=True):
        assert torch.equal(a, b)
    table = opt.structure_state["samples"]
    assert torch.equal(table["ids"], LABELS[labels].sort().values)
    assert table["size"].shape[0] <= 2 * N_DATA  # grows with the number of ids, not values
    for c in table["coefficients"].values():
        assert c.shape == table["size"].shape


def test_the_table_holds_one_slot_per_distinct_id():
    """8 samples with ids near 1e9 (once: a table sized by the largest id) store 8 entries,
    and each id's coefficient is the one of its own batch."""
    xs, ys = dataset()
    model = mlp()
    opt = fngd(model, momentum=0.0)
    ids = 10**9 + torch.tensor([12, 3, 40, 0, 7, 25, 1, 9])
    stored = {}
    for part in (slice(0, 4), slice(4, 8)):
        opt.zero_grad()
        opt.backward(model(xs[part]), ys[part], sample_ids=ids[part])
        opt.step()
        assert opt.last_refresh == {"refreshed": 1}
        table = opt.structure_state["samples"]
        order = torch.searchsorted(table["ids"], ids[part])
        stored.update({i: table["coefficients"]["2"][table["slots"][k]].item()
                       for i, k in zip(ids[part].tolist(), order.tolist(), strict=True)})
    table = opt.structure_state["samples"]
    assert table["ids"].tolist() == sorted(ids.tolist())
    assert table["slots"].unique().numel() == 8 and table["size"].shape[0] == 8
    assert table["size"].tolist() == [4] * 8 and table["uses"].tolist() == [1] * 8
    for i, k in zip(table["ids"].tolist(), table["slots"].tolist(), strict=True):
        assert table["coefficients"]["2"][k].item() == stored[i]
    assert all(t.dtype == torch.int64 for t in (table["ids"], table["slots"], table["size"]))


def _snapshot(store):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                {b: c.clone() for b, c in v.items()}) for k, v in store.items()}


def _same_store(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k].keys() == b[k].keys()
            assert all(torch.equal(a[k][blk], b[k][blk]) for blk in a[k])


@pytest.mark.parametrize("bad", [
    torch.tensor([5, 9, 5, 2]),
    torch.tensor([10**9, 2**62, 10**9, -1]),
    torch.tensor([-3, -3, -3, -3]),
])
def test_repeated_ids_in_a_batch_are_refused(bad):
    xs, ys = dataset()
    model = mlp()
    opt = fngd(model)
    run(opt, model, [[torch.arange(4)]], LABELS["near_2_62"], (xs, ys))
    before = _snapshot(opt.structure_state["samples"])
    opt.zero_grad()
    with pytest.raises(InputError, match=r"sample_ids must be distinct within a batch"):
        opt.backward(model(xs[:4]), ys[:4], sample_ids=bad)
    with pytest.raises(ValueError, match="sample_ids"):  # InputError is a ValueError
        opt.backward(model(xs[:4]), ys[:4], sample_ids=bad)
    _same_store(before, opt.structure_state["samples"])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("ids", "match"), [
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "sample_ids must be integers.*float32"),
    (torch.tensor([0, 1, 2, 3], dtype=torch.float64), "sample_ids must be integers.*float64"),
    (torch.tensor([True, False, True, False]), "sample_ids must be integers.*bool"),
    ([0.5, 1.0, 2.0, 3.0], "sample_ids must be integers.*float"),
    (torch.arange(3), r"sample_ids must have shape \(4,\)"),
    (torch.arange(4).reshape(2, 2), r"sample_ids must have shape \(4,\)"),
    ([0, 1, 2**64, 3], "sample_ids must be a \\(N,\\) integer tensor"),
])
def test_ids_of_the_wrong_dtype_or_shape_are_refused(ids, match):
    xs, ys = dataset()
    model = mlp()
    opt = fngd(model)
    with pytest.raises(InputError, match=match):
        opt.backward(model(xs[:4]), ys[:4], sample_ids=ids)
    assert opt.structure_state.get("samples", {}) == {}
    with pytest.raises(InputError, match="needs the batch's sample ids"):
        opt.backward(model(xs[:4]), ys[:4])


@pytest.mark.skipif(not hasattr(torch, "uint64"), reason="torch without uint64")
def test_uint64_ids_are_refused():
    xs, ys = dataset()
    model = mlp()
    with pytest.raises(InputError, match="uint64"):
        fngd(model).backward(model(xs[:4]), ys[:4],
                             sample_ids=torch.arange(4).to(torch.uint64))


@pytest.mark.parametrize("convert", [
    lambda ids: ids.tolist(), lambda ids: ids.to(torch.int32), lambda ids: ids.to(torch.int16),
    lambda ids: (ids + 40).to(torch.uint8)])
def test_other_integer_ids_are_the_same_keys(convert):
    data, order = dataset(), epochs(2)
    ids = LABELS["negative"]  # fits int16; + 40 fits uint8
    xs, ys = data
    params = []
    for given in (lambda index: ids[index], lambda index: convert(ids[index])):
        model = mlp()
        opt = fngd(model)
        for batches in order:
            for index in batches:
                opt.zero_grad()
                opt.backward(model(xs[index]), ys[index], sample_ids=given(index))
                opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
        assert opt.structure_state["samples"]["ids"].dtype == torch.int64
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


def _tensors_numbers_strings(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _tensors_numbers_strings(v) for k, v in value.items())
    return isinstance(value, torch.Tensor | int | float | str)


@pytest.mark.parametrize("labels", ["near_1e9", "near_2_62", "mixed"])
def test_state_dict_round_trip_with_large_ids(labels):
    data, order = dataset(), epochs(3)
    ids = LABELS[labels]
    model = mlp()
    opt = fngd(model)
    run(opt, model, order[:1], ids, data)  # the refresh epoch
    assert _tensors_numbers_strings(opt.structure_state)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    later = run(opt, model, order[1:], ids, data)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors, numbers and strings only
    fresh = mlp(9)
    fresh.load_state_dict(saved["model"])
    reopened = fngd(fresh)
    reopened.load_state_dict(saved["opt"])
    assert run(reopened, fresh, order[1:], ids, data) == later
    assert all(r == {"shared": 1} for r in later)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    _same_store(opt.structure_state["samples"], reopened.structure_state["samples"])


def test_a_table_of_the_earlier_dense_layout_is_converted():
    """Arrays indexed by the id itself (a size of 0: no coefficient), as curvlib saved them
    before: read as the same coefficients."""
    data, order = dataset(), epochs(3)
    ids = LABELS["small"][torch.tensor([3, 0, 5, 1, 7, 2, 9, 4, 8, 6])] * 2  # sparse, small
    results = []
    for dense in (False, True):
        model = mlp()
        opt = fngd(model)
        run(opt, model, order[:1], ids, data)
        if dense:
            table = opt.structure_state["samples"]
            capacity = int(ids.max()) + 1
            old = {"size": torch.zeros(capacity, dtype=torch.long),
                   "uses": torch.zeros(capacity, dtype=torch.long),
                   "coefficients": {b: torch.zeros(capacity, dtype=c.dtype)
                                    for b, c in table["coefficients"].items()}}
            slots = table["slots"]
            old["size"][table["ids"]] = table["size"][slots]
            old["uses"][table["ids"]] = table["uses"][slots]
            for b, c in table["coefficients"].items():
                old["coefficients"][b][table["ids"]] = c[slots]
            sd = opt.state_dict()
            sd["curvlib"]["structure"]["samples"] = old
            opt.load_state_dict(sd)
        reports = run(opt, model, order[1:], ids, data)
        assert all(r == {"shared": 1} for r in reports)
        results.append([p.detach().clone() for p in model.parameters()])
        assert torch.equal(opt.structure_state["samples"]["ids"], ids.sort().values)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_micro_batches_of_one_step_may_share_ids():
    """Micro-batches plan against the table as it was before the step and commit in order:
    an id stored by an earlier micro-batch is updated, not inserted twice (the later
    coefficient is kept)."""
    xs, ys = dataset()
    model = mlp()
    opt = fngd(model, lr=0.0)
    ids = LABELS["near_1e9"]
    opt.zero_grad()
    for part in (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])):
        opt.backward(model(xs[part]), ys[part], sample_ids=ids[part])
    opt.step()
    table = opt.structure_state["samples"]
    assert table["ids"].tolist() == sorted(ids[:6].tolist())
    assert table["slots"].sort().values.tolist() == list(range(6))
    # the later micro-batch's coefficients for ids 2 and 3: recomputed alone, they agree
    twin = mlp()  # lr = 0: the same weights
    alone = fngd(twin, lr=0.0)
    part = torch.tensor([2, 3, 4, 5])
    alone.zero_grad()
    alone.backward(twin(xs[part]), ys[part], sample_ids=ids[part])
    alone.step()
    other = alone.structure_state["samples"]
    for i in ids[part].tolist():
        k = table["slots"][torch.searchsorted(table["ids"], torch.tensor(i))]
        j = other["slots"][torch.searchsorted(other["ids"], torch.tensor(i))]
        for b, c in table["coefficients"].items():
            assert c[k].item() == other["coefficients"][b][j].item()
    # a shared step over all six ids then counts one more use of each
    opt.zero_grad()
    part = torch.arange(6)
    opt.backward(model(xs[part]), ys[part], sample_ids=ids[part])
    opt.step()
    assert opt.last_refresh == {"shared": 1}
    used = table["uses"][table["slots"]]
    assert used.tolist() == [2] * 6
