"""Capture: hooks come and go cleanly, every call is recorded, Z is right after in-place ops."""

import weakref

import pytest
import torch
from torch import nn

from curvlib.capture import Capture, CaptureError, parameter_owners
from curvlib.testing.assertions import assert_close


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


def test_watches_parameter_owners_and_records_x_and_z():
    model = _model()
    assert list(parameter_owners(model)) == ["0", "2"]
    x = torch.randn(5, 3, dtype=torch.float64)
    with Capture(model) as cap:
        hidden = model[0](x)
        hidden.retain_grad()
        out = model[2](torch.tanh(hidden))
        loss = out.square().sum()
        loss.backward()
    first, last = cap.calls[model[0]], cap.calls[model[2]]
    assert len(first) == len(last) == 1
    assert_close(first[0].input, x, rtol=0)
    assert_close(first[0].grad_output, hidden.grad)
    assert_close(last[0].grad_output, 2 * out.detach())
    assert not first[0].input.requires_grad


def test_no_attributes_and_no_hooks_left_behind_also_on_error():
    model = _model()
    before = {id(m): set(vars(m)) for m in model.modules()}
    with pytest.raises(RuntimeError, match="boom"), Capture(model):
        model(torch.randn(2, 3, dtype=torch.float64))
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    assert {id(m): set(vars(m)) for m in model.modules()} == before
    cap = Capture(model)
    cap.start()
    assert _hooks(model) == 2
    with pytest.raises(CaptureError, match="already active"):
        cap.start()
    cap.stop()
    assert _hooks(model) == 0


def test_weight_sharing_records_every_call():
    lin = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with Capture([lin]) as cap:
        y1 = lin(x)
        y2 = lin(torch.sin(y1))
        y3 = lin(y2)
        cap.backward_to_outputs((y3 * y1).sum())
    calls = cap.calls[lin]
    assert len(calls) == 3
    assert_close(calls[1].input, torch.sin(y1).detach(), rtol=0)
    # Z of each call against autograd with respect to that call's output
    y1 = lin(x)
    y1.retain_grad()
    y2 = lin(torch.sin(y1))
    y2.retain_grad()
    y3 = lin(y2)
    y3.retain_grad()
    (y3 * y1).sum().backward()
    for call, y in zip(calls, (y1, y2, y3), strict=True):
        assert_close(call.grad_output, y.grad)


def test_sequence_inputs_are_recorded_whole():
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 6, 3, dtype=torch.float64)
    with Capture([lin]) as cap:
        cap.backward_to_outputs(lin(x).sum())
    assert cap.calls[lin][0].input.shape == (4, 5, 6, 3)
    assert cap.calls[lin][0].grad_output.shape == (4, 5, 6, 2)


def test_backward_to_outputs_leaves_parameter_grads_alone():
    model = _model()
    x = torch.randn(5, 3, dtype=torch.float64)
    with Capture(model) as cap:
        out = model(x)
        cap.backward_to_outputs(out.square().sum(), retain_graph=True)
        assert all(p.grad is None for p in model.parameters())
        out.square().sum().backward()  # the graph was retained
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        cap.backward_to_outputs(out)


@pytest.mark.parametrize("grad_hooks, keep_outputs", [(True, True), (False, True),
                                                       (False, False)])
def test_in_place_activation_after_a_layer_gives_the_right_z(grad_hooks, keep_outputs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with Capture(model, grad_hooks=grad_hooks, keep_outputs=keep_outputs) as cap:
        out = model(x)
        cap.backward_to_outputs(out.square().sum())
    z = cap.calls[model[0]][0].grad_output
    assert all(p.grad is None for p in model.parameters())  # the fallback accumulates nothing
    # reference: the same network without the in-place op
    hidden = model[0](x)
    hidden.retain_grad()
    model[2](torch.relu(hidden)).square().sum().backward()
    assert_close(z, hidden.grad)


def test_without_grad_hooks_z_comes_from_backward_to_outputs_only():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    seen = []
    with Capture(model, grad_hooks=False) as cap:
        out = model(x)
        out.square().sum().backward(retain_graph=True)  # an ordinary pass records nothing
        assert all(c.grad_output is None for cs in cap.calls.values() for c in cs)
        assert all(c._handle is None for cs in cap.calls.values() for c in cs)
        cap.on_grad = lambda module, call: seen.append((module, call.grad_output))
        cap.backward_to_outputs(out.square().sum())
    with Capture(model) as ref:  # the hooked capture is the reference
        ref.backward_to_outputs(model(x).square().sum())
    for module in (model[0], model[2]):
        assert_close(cap.calls[module][0].grad_output, ref.calls[module][0].grad_output)
    # on_grad ran after the pass, once per call, in call order, with Z already recorded
    assert [m for m, _ in seen] == [model[0], model[2]]
    for module, z in seen:
        assert z is cap.calls[module][0].grad_output


def test_without_kept_outputs_the_memory_of_y_is_freed_and_z_is_unchanged():
    """keep_outputs=False records Y's graph edge only: a Linear output that autograd does not
    save (the ReLU after it saves its own result) is freed during the forward pass."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    alive = []
    model[0].register_forward_hook(lambda m, a, y: alive.append(weakref.ref(y)))
    with Capture(model, grad_hooks=False, keep_outputs={model[2]}) as cap:
        out = model(x)
        assert alive[0]() is None  # the first layer's Y is gone
        assert cap.calls[model[0]][0].output is None
        assert cap.calls[model[2]][0].output is out  # kept: named in keep_outputs
        cap.backward_to_outputs(out.square().sum())
    with Capture(model) as ref:
        ref.backward_to_outputs(model(x).square().sum())
    for module in (model[0], model[2]):
        assert_close(cap.calls[module][0].grad_output, ref.calls[module][0].grad_output)


def test_optimizers_keep_outputs_only_where_a_plugin_reads_them():
    import curvlib
    from curvlib.layers.generic import GenericPlugin

    class Scale(nn.Module):  # no registered plugin: the generic one, which reads Y
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(2, 3), Scale(), nn.Linear(3, 2))
    opt = curvlib.assemble(model, "categorical", source="gram",
                           structure=curvlib.structures.SMW(cover="all"))
    assert GenericPlugin().needs_output and not curvlib.layers.base.plugin_for(
        model[0]).needs_output
    assert opt._capture.keep_outputs == {model[1]}
    model(torch.randn(4, 2))
    calls = opt._capture.calls
    assert calls[model[0]][0].output is None and calls[model[1]][0].output is not None


@pytest.mark.parametrize("grad_hooks", [True, False])
def test_modules_that_do_not_reach_the_loss_get_zero_z_and_unused_ones_no_calls(grad_hooks):
    a, b, unused = (nn.Linear(2, 2).double() for _ in range(3))
    x = torch.randn(3, 2, dtype=torch.float64)
    with Capture([a, b, unused], grad_hooks=grad_hooks, keep_outputs=False) as cap:
        ya = a(x)
        b(x)
        cap.backward_to_outputs(ya.sum())
    assert torch.count_nonzero(cap.calls[b][0].grad_output) == 0
    assert cap.calls[unused] == []


def test_paused_clear_release_and_errors():
    lin = nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with Capture({"lin": lin}) as cap:
        with cap.paused():
            lin(x)
        assert cap.calls[lin] == []
        y = lin(x)
        cap.backward_to_outputs(y.sum(), retain_graph=True)
        cap.clear_grads()
        assert cap.calls[lin][0].grad_output is None
        cap.release_outputs()
        assert cap.calls[lin][0].output is None
        with pytest.raises(CaptureError, match="no recorded module output"):
            cap.backward_to_outputs(y.sum())
        cap.clear()
        assert cap.calls[lin] == []
    assert cap.names[lin] == "lin"

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w, x

    pair = Pair()
    with pytest.raises(CaptureError, match="returned a tuple"), Capture([pair]):
        pair(torch.ones(1, 2))
    assert _hooks(pair) == 0
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Capture([lin, "not a module"])


def test_a_long_lived_capture_forgets_unused_passes_and_dies_with_its_owner():
    import gc

    model = _model()
    cap = Capture(model, clear_on_call_of=model)
    cap.start()
    x = torch.randn(2, 3, dtype=torch.float64)
    for _ in range(3):
        model(x)  # forward passes nobody backpropagates
    assert all(len(calls) == 1 for calls in cap.calls.values())
    with torch.no_grad():
        model(x)  # evaluation is not recorded (and does not clear)
    assert all(len(calls) == 1 for calls in cap.calls.values())
    del cap
    gc.collect()
    model(x)  # the hooks of a forgotten capture do nothing
