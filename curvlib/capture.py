r"""Record layer inputs ``X`` and output gradients ``Z`` during forward and backward.

:class:`Capture` is a context manager. While it is active, every call of a watched module
appends a :class:`Call` holding the call's positional inputs (detached: ``X``), its output
``Y`` (still attached to the graph) and, once a backward pass reaches ``Y``, the gradient
``Z = ∂(loss)/∂Y`` of whatever scalar was differentiated::

    with Capture(model) as cap:
        outputs = model(inputs)
        cap.backward_to_outputs(likelihood.loss(outputs, targets).sum())
    for module, calls in cap.calls.items():
        X, Z = calls[0].inputs[0], calls[0].grad_output

Rules it keeps:

* **Nothing is written onto user modules.** Hooks are registered through PyTorch's hook
  handles and removed on exit, also when the body raises.
* **Every call is recorded.** A module called several times in one forward (weight
  sharing, a layer applied at several positions) gets one :class:`Call` per call, in order.
* ``Z`` is read by a hook on the output tensor registered at forward time, so it is the
  gradient with respect to the value the module returned, even if a later in-place
  operation (``ReLU(inplace=True)``) overwrote that tensor.
* Calls made with gradients disabled (``torch.no_grad()``, evaluation) are not recorded.
* A later backward pass overwrites ``Z`` (the calls keep the latest one);
  :meth:`Capture.clear_grads` forgets them.
* :meth:`Capture.backward_to_outputs` differentiates a scalar down to the recorded outputs
  only, so no parameter gradient is computed or accumulated (FNGD, Section IV-C): the
  per-sample quantities follow from ``X`` and ``Z`` through the layer plugins.

Watched modules are, by default, the modules that directly own a trainable parameter
(:func:`parameter_owners`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvlib.errors import CurvlibError

__all__ = ["Call", "Capture", "CaptureError", "parameter_owners"]


class CaptureError(CurvlibError, RuntimeError):
    """A capture was used in a way that cannot give correct per-sample quantities."""


@dataclass
class Call:
    """One call of a watched module.

    Attributes:
        inputs: the positional arguments, tensors detached from the graph (``X`` is
            ``inputs[0]`` for single-input layers).
        kwargs: the keyword arguments, tensors detached.
        output: the returned tensor ``Y``, attached to the graph (``None`` once released, and
            not kept by a ``Capture(grad_hooks=False, keep_outputs=False)``, which records
            only the graph edge that produced it).
        grad_output: ``Z = ∂(scalar)/∂Y`` from the latest backward pass, else ``None``.
        output_version: ``Y``'s version counter right after the call; a larger value later
            means an in-place operation changed ``Y``.
    """

    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor | None
    grad_output: Tensor | None = None
    output_version: int = 0
    _handle: Any = field(default=None, repr=False)
    _node: Any = field(default=None, repr=False)  # Y's gradient edge
    _meta: Any = field(default=None, repr=False)  # Y's (shape, dtype, device)
    #: the autograd nodes that produced the call's tensor inputs (where the call's own part
    #: of the graph begins; :func:`curvlib.coverage.unseen_uses` reads them)
    _input_nodes: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def input(self) -> Tensor:
        """The first positional input ``X``."""
        if not self.inputs:
            raise CaptureError(
                "this call had no positional input; layers that read X need it passed "
                "positionally"
            )
        return self.inputs[0]

    @property
    def batch_size(self) -> int:
        """Size of dimension 0 of the first tensor input (positional, else keyword)."""
        for value in (*self.inputs, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                return int(value.shape[0])
        raise CaptureError("this call had no tensor input with a batch dimension")


def parameter_owners(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that directly own a trainable parameter, by their qualified name.

    A module "owns" a parameter when the parameter is in its own ``_parameters`` (not in a
    child's). The model itself is included when it owns one. Tied parameters appear under
    every owner.
    """
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        if any(p is not None and p.requires_grad for p in module._parameters.values()):
            owners[name] = module
    return owners


def _grad_fns(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """The ``grad_fn`` of every tensor among a call's arguments (one level of tuples, lists
    and dict values), ``None``s left out."""
    out = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            if value.grad_fn is not None:
                out.append(value.grad_fn)
        elif isinstance(value, tuple | list):
            out.extend(v.grad_fn for v in value if isinstance(v, Tensor) and v.grad_fn is not None)
    return tuple(out)


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class _StoreGrad:
    """The tensor hook on a recorded output: stores ``Z`` on its call, then tells the
    capture's ``on_grad`` (through a weak reference: a hook never keeps a forgotten capture
    and its tensors alive)."""

    __slots__ = ("call", "capture", "module")

    def __init__(self, capture: weakref.ref, module: nn.Module, call: Call):
        self.capture, self.module, self.call = capture, module, call

    def __call__(self, grad: Tensor) -> None:
        self.call.grad_output = grad.detach()
        capture = self.capture()
        if capture is not None and capture.on_grad is not None:
            capture.on_grad(self.module, self.call)


_NOTHING_RECORDED = (
    "no recorded module output requires a gradient: run the forward pass inside the capture, "
    "with parameters that require gradients")


class _Paused:
    """``with capture.paused():`` (a plain class: it is entered several times per step)."""

    __slots__ = ("capture", "previous")

    def __init__(self, capture: Capture):
        self.capture = capture
        self.previous = False

    def __enter__(self) -> None:
        self.previous = self.capture._recording
        self.capture._recording = False

    def __exit__(self, *exc: object) -> None:
        self.capture._recording = self.previous


class Capture:
    """Context manager that records ``X``, ``Y`` and ``Z`` for a set of modules.

    Args:
        modules: a model (its :func:`parameter_owners` are watched), or an iterable of
            modules, or a mapping name → module.
        clear_on_call_of: a module (usually the model) whose every call starts a new forward
            pass: the calls recorded before are forgotten, so a long-lived capture never
            accumulates the records of forward passes nobody backpropagated.
        grad_hooks: ``True`` (default): a hook on every recorded output stores ``Z`` in
            *any* backward pass (``loss.backward()`` included) as it happens. ``False``:
            ``Z`` is recorded only by :meth:`backward_to_outputs`, from what that pass
            returns, as the gradient at the graph edge that produced ``Y`` (so an output
            overwritten in place later still gets the gradient of the value the module
            returned); no Python runs inside the backward pass and none at forward time
            beyond the record itself (the optimizers use this: it keeps the pass as lean as
            an ordinary one). ``on_grad`` is then called after the pass, in call order.
        keep_outputs: with ``grad_hooks=False``, whether calls keep their output ``Y``
            (``True``, default), or only its graph edge (``False``, or a set of modules
            whose outputs are kept: e.g. those whose layer plugin reads ``Call.output``).
            Not keeping ``Y`` lets its memory go as soon as autograd no longer needs it
            (a convolution's pre-activation output, which autograd does not save).

    Attributes:
        calls: module → list of :class:`Call`, in call order (filled while active).
        names: module → its name (qualified name within the model, or its position).
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module] | dict[str, nn.Module], *,
                 clear_on_call_of: nn.Module | None = None, grad_hooks: bool = True,
                 keep_outputs: bool | Iterable[nn.Module] = True):
        if isinstance(modules, nn.Module):
            named = parameter_owners(modules)
        elif isinstance(modules, dict):
            named = dict(modules)
        else:
            named = {str(i): m for i, m in enumerate(modules)}
        for name, module in named.items():
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Capture watches torch.nn.Module objects; entry {name!r} is a "
                    f"{type(module).__name__}"
                )
        self.names: dict[nn.Module, str] = {m: n for n, m in named.items()}
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in self.names}
        self._handles: list[Any] = []
        self._recording = False
        self._active = False
        self._root = clear_on_call_of
        self._ref = weakref.ref(self)
        self.grad_hooks = bool(grad_hooks)
        self.keep_outputs = keep_outputs
        #: If set, called as ``on_grad(module, call)`` once a backward pass recorded a call's
        #: ``Z``: inside that pass with ``grad_hooks`` (e.g. to form a layer's gradient while
        #: ``Z`` is hot), right after :meth:`backward_to_outputs` without.
        self.on_grad: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Register the hooks (what ``with`` does on entry)."""
        if self._active:
            raise CaptureError("this Capture is already active; it cannot be entered twice")
        ref = self._ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            capture = ref()  # a hook never keeps a forgotten capture (and its tensors) alive
            # a deep copy of a watched module carries this hook along: ignore the copy
            if capture is not None and module in capture.calls:
                capture._hook(module, args, kwargs, output)

        def new_pass(module: nn.Module, args: tuple) -> None:
            capture = ref()
            if (capture is not None and module is capture._root and capture._recording
                    and torch.is_grad_enabled()):
                capture.clear()

        try:
            if self._root is not None:
                self._handles.append(self._root.register_forward_pre_hook(new_pass))
            for module in self.names:
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        self._active = True
        self._recording = True

    def stop(self) -> None:
        """Remove every hook (what ``with`` does on exit); recorded calls are kept."""
        self._remove()
        self._active = False
        self._recording = False

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for calls in self.calls.values():
            for call in calls:
                if call._handle is not None:
                    call._handle.remove()
                    call._handle = None

    @property
    def active(self) -> bool:
        """Whether the hooks are registered."""
        return self._active

    def set_recording(self, on: bool) -> None:
        """Record calls (``True``) or ignore them (``False``) while the hooks stay registered."""
        self._recording = bool(on)

    @property
    def recording(self) -> bool:
        """Whether calls are being recorded."""
        return self._recording

    def paused(self) -> _Paused:
        """Do not record calls inside this ``with`` block (used when plugins re-run a
        module)."""
        return _Paused(self)

    def clear(self) -> None:
        """Forget every recorded call (the hooks stay registered)."""
        for calls in self.calls.values():
            for call in calls:
                if call._handle is not None:
                    call._handle.remove()
            calls.clear()

    def clear_grads(self) -> None:
        """Forget the recorded output gradients ``Z`` (keep ``X`` and ``Y``)."""
        for calls in self.calls.values():
            for call in calls:
                call.grad_output = None

    # -- recording ---------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return  # calls without gradients (evaluation) have no backward to record
        if not isinstance(output, Tensor):
            raise CaptureError(
                f"module {self.names[module]!r} ({type(module).__name__}) returned a "
                f"{type(output).__name__}; curvlib records the inputs and output gradient of "
                f"modules that return one tensor, so it has no per-sample statistics for this "
                f"module's parameters. In an optimizer, put them in a param group with "
                f"precondition=False (they then get SGD with momentum), or use a structure "
                f"that needs only batch gradients (tensor_normal, shampoo, diagonal); with a "
                f"Capture of your own, pass it the modules to watch instead of the model."
            )
        # this runs on every forward call of every watched module: the common case (tensor
        # arguments, no keywords) takes no recursion
        inputs = tuple(a.detach() if isinstance(a, Tensor) else _detach(a) for a in args)
        call = Call(inputs, _detach(kwargs) if kwargs else {}, output, None, output._version)
        if output.requires_grad:
            call._node = get_gradient_edge(output)
            call._input_nodes = _grad_fns(args, kwargs)
            if self.grad_hooks:
                call._handle = output.register_hook(_StoreGrad(self._ref, module, call))
            else:  # Z will be the gradient at the edge that produced Y
                call._meta = (output.shape, output.dtype, output.device)
                keep = self.keep_outputs
                if keep is not True and (keep is False or module not in keep):
                    call.output = None
        self.calls[module].append(call)

    # -- backward to the outputs ---------------------------------------------------------------

    def recorded_outputs(self) -> list[Tensor]:
        """The recorded outputs ``Y`` that take part in the graph (those a
        ``keep_outputs``-limited capture did not keep are not among them)."""
        return [
            c.output
            for calls in self.calls.values()
            for c in calls
            if c.output is not None and c.output.requires_grad
        ]

    def backward_to_outputs(
        self, scalar: Tensor, *, retain_graph: bool = False, also: tuple[Tensor, ...] = ()
    ) -> list[Tensor | None]:
        """Differentiate ``scalar`` down to the recorded outputs and record every ``Z``.

        No parameter gradient is computed or accumulated. Calls whose output does not
        influence ``scalar`` get a zero ``Z``. With ``grad_hooks=False`` every ``Z`` is the
        gradient at the graph edge that produced the call's output, so an output overwritten
        in place afterwards changes nothing. With output hooks, if an in-place operation
        overwrote a recorded output, the gradient is taken with respect to the parameters
        instead (the output hooks still see the right ``Z``), which costs the parameter
        gradients but keeps the result exact.

        ``also``: further tensors (e.g. parameters of unrecorded modules) whose gradients
        are computed in the same pass and returned, in order (``None`` where unused);
        nothing is accumulated into ``.grad``.
        """
        if scalar.dim() != 0:
            raise ValueError(
                f"backward_to_outputs needs a scalar, got shape {tuple(scalar.shape)}; "
                f"sum the per-sample losses first"
            )
        if not self.grad_hooks:
            return self._backward_to_edges(scalar, retain_graph, also)
        calls = []
        outputs = []
        overwritten = False
        for cs in self.calls.values():
            for c in cs:
                y = c.output
                if y is not None and y.requires_grad:
                    c.grad_output = None
                    calls.append(c)
                    outputs.append(y)
                    overwritten = overwritten or y._version != c.output_version
        if not calls:
            raise CaptureError(_NOTHING_RECORDED)
        if overwritten:
            targets: list[Tensor] = []
            seen: set[int] = set()
            for module in self.calls:
                for p in module.parameters(recurse=False):
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        targets.append(p)
        else:
            targets = outputs
        grads = torch.autograd.grad(scalar, targets + list(also), retain_graph=retain_graph,
                                    allow_unused=True)
        for c in calls:
            if c.grad_output is None:
                c.grad_output = torch.zeros_like(c.output).detach()
        return list(grads[len(targets):])

    def _backward_to_edges(self, scalar: Tensor, retain_graph: bool,
                           also: tuple[Tensor, ...]) -> list[Tensor | None]:
        """:meth:`backward_to_outputs` without output hooks: one ``autograd.grad`` to the
        recorded graph edges, whose results are the ``Z``."""
        calls = []
        modules = []
        edges = []
        for module, cs in self.calls.items():
            for c in cs:
                if c._node is not None:
                    c.grad_output = None
                    calls.append(c)
                    modules.append(module)
                    edges.append(c._node)
        if not calls:
            raise CaptureError(_NOTHING_RECORDED)
        grads = torch.autograd.grad(scalar, edges + list(also), retain_graph=retain_graph,
                                    allow_unused=True)
        for c, g in zip(calls, grads, strict=False):
            if g is None:  # the output does not reach the scalar
                shape, dtype, device = c._meta
                g = torch.zeros(shape, dtype=dtype, device=device)
            c.grad_output = g
        if self.on_grad is not None:
            for module, c in zip(modules, calls, strict=True):
                self.on_grad(module, c)
        return list(grads[len(calls):])

    def release_outputs(self) -> None:
        """Drop the references to the outputs ``Y`` (frees the graph once nothing else holds it)."""
        for calls in self.calls.values():
            for c in calls:
                if c._handle is not None:
                    c._handle.remove()
                    c._handle = None
                c.output = None
                c._node = None
                c._input_nodes = ()
