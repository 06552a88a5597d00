r"""BackPACK backend: curvlib's per-sample gradients computed by BackPACK.

`BackPACK <https://backpack.pt>`_ (``backpack-for-pytorch``) extends PyTorch's backward pass
with hand-written, layer-by-layer backpropagation rules for per-sample quantities. It shares
no code with curvlib's own path (the layer plugins of :mod:`curvlib.layers` and the generic
:mod:`torch.func` fallback), so it is an **independent second implementation**: the test suite
uses it to cross-check curvlib, and users can select it with ``backend="backpack"`` in
:func:`curvlib.per_sample_grads` and :func:`curvlib.gram` to check their own models. It is not
meant to be faster, and it covers fewer models than curvlib's own path.

What it computes (details and conversions in :func:`per_sample_grads`):

* data targets (sources ``empirical`` and ``GramSource(targets="data")``): BackPACK's
  ``BatchGrad``, converted so that row ``n`` is ``g_n = ∂ℓ_n/∂θ``, equal to curvlib's;
* sampled targets (``true_fisher``, ``TrueFisher(num_samples=S, ...)``,
  ``GramSource(targets="sampled", num_samples=S)``): BackPACK's ``SqrtGGNMC`` with
  ``mc_samples=S``, converted so that row ``s·N + n`` is the gradient ``∂ℓ(y, f(x_n))/∂θ`` for
  a target ``y ~ p(·|f(x_n))`` drawn by BackPACK. The draws differ from curvlib's own (they
  come from another random stream), so sampled rows agree with ``backend="curvlib"`` in
  distribution, not entry by entry.

BackPACK only sees what happens inside modules it knows. Everything it cannot handle exactly
raises :class:`NotImplementedError` naming the module or the setting and suggesting
``backend="curvlib"``: parameters of modules BackPACK has no rule for (for ``SqrtGGNMC`` also
parameter-free modules on the path, e.g. ``GELU``), parameters owned by a module that also
has children, shared (tied) parameters, a module called more than once per forward pass,
BatchNorm using batch statistics, convolutions with ``padding="same"`` or a non-zero
``padding_mode`` (on which BackPACK 1.7 returns wrong per-sample gradients without an error),
likelihoods other than the three built-ins, and BackPACK's own limitations (sampled Bernoulli
needs one output per sample; sampled Bernoulli and Gaussian need outputs ``(N, *)`` with at
least two dimensions).

The user's model is never modified: BackPACK's ``extend`` registers hooks on modules and its
forward hooks store inputs and outputs as module attributes, so BackPACK always runs on a
:func:`copy.deepcopy` of the model, and the hooks it registers are removed again (also from
BackPACK's global list of hook handles). Parameter ``.grad`` of the user's model is not
touched.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.extensions import BatchGrad, SqrtGGNMC
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from curvlib.likelihoods import Bernoulli, Categorical, Gaussian, as_likelihood
from curvlib.sources import Source, SourceError, as_source

__all__ = ["per_sample_grads"]

#: The likelihoods that have a BackPACK loss (exact classes; subclasses may change the loss).
_LOSS_KINDS: dict[type, str] = {
    Categorical: "categorical",
    Bernoulli: "bernoulli",
    Gaussian: "gaussian",
}

_FIX = "use backend='curvlib', which handles any module through torch.func"

# torch warns when a full backward hook fires on a module whose inputs need no gradient (the
# first layer: we detach the inputs). BackPACK needs only the output gradient there.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


def per_sample_grads(
    model: nn.Module,
    likelihood: Any,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    source: str | Source = "empirical",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Per-sample gradients by parameter name, computed by BackPACK; rows ``(S·N, *shape)``.

    Same arguments and result as :func:`curvlib.per_sample_grads` with
    ``backend="curvlib"``: a dict from the names of the trainable parameters
    (``model.named_parameters()``, in that order) to tensors ``(S·N, *param.shape)``, rows
    ordered draw-major (``row = s·N + n``; ``S = 1`` with data targets), each row
    ``∂ℓ(y, f(x_n))/∂θ`` not divided by ``N``. Results are in the parameters' dtype (at least
    float32) on their device; parameters whose module does not reach the loss get zero rows.

    **Losses.** The likelihood is mapped to a torch loss with ``reduction="sum"``, whose
    ``n``-th term BackPACK differentiates: ``categorical`` → ``CrossEntropyLoss`` (its term
    is ``ℓ_n``, summed over extra positions), ``bernoulli`` → ``BCEWithLogitsLoss`` (term
    ``ℓ_n``, summed over outputs), ``gaussian`` → ``MSELoss`` (term ``‖f_n − y_n‖² = 2ℓ_n``).

    **Data targets** (``empirical``, ``GramSource(targets="data")``): BackPACK's
    ``BatchGrad``, ``param.grad_batch`` of shape ``(N, *shape)``, is the gradient of the
    ``n``-th term. The rows are ``grad_batch`` for categorical and bernoulli and
    ``½ grad_batch`` for gaussian: exactly ``g_n``. As a guard against BackPACK rules that
    are silently wrong for a module, the rows of every parameter must sum to the gradient
    autograd accumulates in the same backward pass (to a round-off tolerance of the dtype).

    **Sampled targets** (``true_fisher``, ``TrueFisher(num_samples=S, per_sample=True)``,
    ``GramSource(targets="sampled", num_samples=S)``): BackPACK's ``SqrtGGNMC(mc_samples=S)``
    backpropagates, through the layers' Jacobians, one output-space vector ``v_{s,n}/√S`` per
    draw ``s`` and sample ``n``; ``param.sqrt_ggn_mc`` has shape ``(S, N, *shape)`` and holds
    ``J_nᵀ v_{s,n}/√S`` (``J_n = ∂f(x_n)/∂θ``). BackPACK 1.7's vectors (its
    ``_compute_sampled_grads_manual``, checked numerically by the tests) are

    * ``categorical``: ``v = softmax(f_n) − onehot(ỹ)`` with ``ỹ ~ Categorical(softmax(f_n))``
      drawn independently at every position — exactly the output gradient of ``ℓ(ỹ, f_n)``.
      Rows: ``√S · sqrt_ggn_mc``, the sampled gradient ``∂ℓ(ỹ, f(x_n))/∂θ`` for BackPACK's
      draw ``ỹ``.
    * ``bernoulli`` (one output per sample only, a BackPACK limitation):
      ``v = σ(f_n) − ỹ`` with ``ỹ ~ Bernoulli(σ(f_n))`` — the output gradient of ``ℓ(ỹ, f_n)``.
      Rows: ``√S · sqrt_ggn_mc``, the sampled gradient for BackPACK's draw.
    * ``gaussian``: BackPACK reads ``MSELoss`` as the negative log-likelihood of
      ``N(f, ½ I)``, draws ``ỹ ~ N(f_n, ½ I)`` and uses ``v = 2 (ỹ − f_n)``: its scale is that
      of the MSE gradient, and its sign is the *opposite* of the MSE gradient at ``ỹ``,
      ``2 (f_n − ỹ)``. Rows: ``−√(S/2) · sqrt_ggn_mc = J_nᵀ (f_n − y)`` with
      ``y = f_n + √2 (ỹ − f_n) ~ N(f_n, I)``, which is exactly curvlib's sampled gradient
      ``∂ℓ(y, f(x_n))/∂θ`` of ``ℓ = ½‖f − y‖²`` for the target ``y``, a deterministic function
      of BackPACK's draw, with curvlib's predictive distribution. (The factor ``+√(S/2)``
      would give the gradient for ``2 f_n − y``, which has the same distribution; the sign
      chosen keeps the target on the side of BackPACK's own draw.)

    So ``(1/(S·N)) Σ_r row_r row_rᵀ`` is an MC Fisher estimate, as with curvlib's rows; BackPACK's
    own ``V Vᵀ`` (concatenated ``sqrt_ggn_mc``) is ``N`` times it for categorical and bernoulli
    and ``2N`` times it for gaussian.

    **Randomness.** BackPACK samples from torch's global random number generator. A seed is
    drawn from ``generator`` (from the global generator if it is ``None``, which then advances
    once, as curvlib's own path without a generator does), and BackPACK's backward pass runs
    inside :func:`torch.random.fork_rng` seeded with it: the same generator state gives the
    same rows, and the global random state is left as it was. Data targets draw nothing. A
    model that draws random numbers in its forward pass (``Dropout`` in training mode) draws
    them from the global generator, outside the fork, as it does in curvlib's own path.

    Args:
        model: the model; it is deep-copied, never modified (see the module docstring).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or their objects.
        inputs: the batch, passed as ``model(inputs)`` (tensors in it are detached).
        targets: the data's targets (ignored with sampled targets).
        source: as in :func:`curvlib.per_sample_grads`.
        generator: the :class:`torch.Generator` the sampling seed comes from.

    Raises:
        NotImplementedError: the model, likelihood or source needs something BackPACK does not
            do (the message names it); ``backend="curvlib"`` handles it.
        curvlib.sources.SourceError: the source gives no per-sample gradients, or data targets
            are missing (as with ``backend="curvlib"``).
    """
    sampled, num_samples = _resolve_source(source)
    lik = as_likelihood(likelihood)
    kind = _loss_kind(lik)
    if not sampled and targets is None:
        raise SourceError(
            "the source uses the data's targets, but none were given; pass targets, or use the "
            "true_fisher source to sample them"
        )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameters that require gradients")
    _check_no_sharing(model)
    replica = _replica(model)
    ext: BackpropExtension = SqrtGGNMC(mc_samples=num_samples) if sampled else BatchGrad()
    supported = _supported_modules(ext)

    start = len(CTX.hook_handles)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING)
            for module in _leaves(replica):
                extend(module)
            calls = _count_calls(replica)
            try:
                outputs = replica(_detached(inputs))
            finally:
                for handle in calls.pop(None):
                    handle.remove()
            _check_modules(replica, calls, supported, sampled, type(ext).__name__)
            if not isinstance(outputs, Tensor) or outputs.dim() < 1:
                raise TypeError(
                    "the model must return one tensor with the samples in dimension 0, got "
                    f"{type(outputs).__name__}"
                )
            batch = int(outputs.shape[0])
            if not sampled:
                lik.loss(outputs.detach(), targets)  # the same shape checks as curvlib's path
            loss = _summed_loss(kind, outputs, targets, sampled)
            if sampled:
                seed = _draw_seed(generator)
                with _forked_rng(seed, outputs.device):
                    _backward(loss, ext)
            else:
                _backward(loss, ext)
            return _collect(model, replica, ext, kind, sampled, batch, num_samples)
    finally:
        ours = CTX.hook_handles[start:]
        for handle in ours:
            handle.remove()
        mine = {id(handle) for handle in ours}
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in mine]


# ----------------------------------------------------------------------------- arguments


def _resolve_source(source: str | Source) -> tuple[bool, int]:
    """``(sampled, S)`` for a source name or object, with curvlib's own checks."""
    if isinstance(source, str) and source == "true_fisher":
        return True, 1  # as curvlib: one sampled target per sample, per-sample rows
    src = as_source(source)
    if "per_sample_grads" not in src.provides:
        raise SourceError(
            f"source {src!r} does not provide 'per_sample_grads'; pass source='empirical', "
            f"'gram' or TrueFisher(per_sample=True)"
        )
    targets = getattr(src, "targets", None)
    num_samples = getattr(src, "num_samples", None)
    if targets not in ("data", "sampled") or not isinstance(num_samples, int):
        raise NotImplementedError(
            f"backend='backpack' supports sources whose gradients use data or sampled targets "
            f"(empirical, gram, true_fisher), not {src!r}; {_FIX}"
        )
    return targets == "sampled", num_samples


def _loss_kind(lik: Any) -> str:
    kind = _LOSS_KINDS.get(type(lik))
    if kind is None:
        raise NotImplementedError(
            f"backend='backpack' supports only likelihoods with a BackPACK loss: 'categorical' "
            f"(CrossEntropyLoss), 'bernoulli' (BCEWithLogitsLoss) and 'gaussian' (MSELoss); "
            f"{lik!r} has none. Use backend='curvlib', which works with any likelihood"
        )
    return kind


# --------------------------------------------------------------------------------- model


def _check_no_sharing(model: nn.Module) -> None:
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) in seen:
            raise NotImplementedError(
                f"parameter {seen[id(p)]!r} is shared with {name!r}: BackPACK stores one "
                f"result per module and does not add up shared parameters; {_FIX}"
            )
        seen.setdefault(id(p), name)


def _replica(model: nn.Module) -> nn.Module:
    """A deep copy for BackPACK to extend, without copied gradients."""
    try:
        replica = copy.deepcopy(model)
    except Exception as err:
        raise NotImplementedError(
            f"backend='backpack' runs BackPACK on a deep copy of the model (BackPACK adds "
            f"hooks and attributes to the modules it works on, and curvlib never modifies "
            f"yours), but copy.deepcopy failed ({type(err).__name__}: {err}); {_FIX}"
        ) from err
    for p in replica.parameters():
        p.grad = None
    return replica


def _leaves(model: nn.Module) -> list[nn.Module]:
    """Modules without children: the ones BackPACK's rules apply to.

    Containers are not extended: BackPACK skips ``nn.Sequential`` itself, but would hook any
    other container class and then fail to find a rule for it.
    """
    return [m for m in model.modules() if next(m.children(), None) is None]


def _count_calls(model: nn.Module) -> dict[Any, Any]:
    """Forward hooks counting the calls of every leaf; key ``None`` holds their handles."""
    counts: dict[Any, Any] = {None: []}
    for module in _leaves(model):
        counts[module] = 0

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            counts[mod] += 1

        counts[None].append(module.register_forward_hook(hook))
    return counts


def _own_trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module._parameters.items() if p is not None and p.requires_grad]


def _supported_modules(ext: BackpropExtension) -> set[type] | None:
    """The module classes BackPACK has rules for (``None`` if it cannot be read)."""
    table = getattr(ext, "_BackpropExtension__module_extensions", None)
    return set(table) if isinstance(table, dict) else None


def _check_modules(model: nn.Module, calls: dict[Any, Any], supported: set[type] | None,
                   sampled: bool, ext_name: str) -> None:
    """Refuse, naming the module, everything BackPACK would get wrong or fail on."""
    for name, module in model.named_modules():
        label = f"module {name or '<model>'!r} ({type(module).__name__})"
        own = _own_trainable(module)
        is_leaf = next(module.children(), None) is None
        if own and not is_leaf:
            raise NotImplementedError(
                f"{label} has parameters of its own ({', '.join(own)}) and child modules; "
                f"BackPACK only handles parameters of modules without children; {_FIX}"
            )
        called = calls.get(module, 0) if is_leaf else 0
        if not called:
            continue
        if called > 1 and (own or sampled):
            raise NotImplementedError(
                f"{label} is called {called} times in one forward pass; BackPACK keeps only "
                f"the last call's input and would return wrong results; {_FIX}"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or not module.track_running_stats
        ):
            raise NotImplementedError(
                f"{label} normalises with batch statistics, which mixes the samples, so "
                f"per-sample gradients are not defined; put it in eval() mode (with running "
                f"statistics), or {_FIX}"
            )
        if isinstance(module, nn.modules.conv._ConvNd) and (
            module.padding_mode != "zeros"
            or (isinstance(module.padding, str) and module.padding != "valid")
        ):
            raise NotImplementedError(
                f"{label} uses padding={module.padding!r}, padding_mode="
                f"{module.padding_mode!r}; BackPACK 1.7 supports only numeric zero padding "
                f"(its per-sample gradients are silently wrong otherwise); {_FIX}"
            )
        if supported is None or type(module) in supported:
            continue
        if own:
            raise NotImplementedError(
                f"{label} has parameters, but BackPACK's {ext_name} has no rule for "
                f"{type(module).__name__}; {_FIX}"
            )
        if sampled:
            raise NotImplementedError(
                f"{label} is on the path to the output, but BackPACK's {ext_name} (sampled "
                f"targets) needs a rule for every module on it and has none for "
                f"{type(module).__name__}; replace it by a module BackPACK supports, or {_FIX}"
            )


def _detached(value: Any) -> Any:
    """Tensors in (nested tuples, lists, dicts of) the inputs, detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------- loss


def _summed_loss(kind: str, outputs: Tensor, targets: Tensor | None, sampled: bool) -> Tensor:
    """The torch loss (``reduction="sum"``, extended) of the outputs.

    With sampled targets BackPACK ignores the targets (it draws its own); placeholders of the
    right shape are used. Its sampled MSE and BCE rules need outputs ``(N, K)``, so outputs
    with more dimensions pass through an (extended) ``nn.Flatten`` first.
    """
    if kind == "categorical":
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction="sum")
        if sampled:
            targets = torch.zeros((outputs.shape[0], *outputs.shape[2:]), dtype=torch.long,
                                  device=outputs.device)
        return extend(loss_fn)(outputs, targets.long())
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum") if kind == "bernoulli" else nn.MSELoss(
        reduction="sum")
    if not sampled:
        return extend(loss_fn)(outputs, targets.to(outputs.dtype))
    if outputs.dim() < 2:
        raise NotImplementedError(
            f"BackPACK's sampled {kind} rule needs outputs of shape (N, K), got "
            f"{tuple(outputs.shape)}; return outputs.unsqueeze(1) from the model, or {_FIX}"
        )
    if outputs.dim() > 2:
        outputs = extend(nn.Flatten())(outputs)
    if kind == "bernoulli" and outputs.shape[1] != 1:
        raise NotImplementedError(
            f"BackPACK (1.7) supports sampled targets for BCEWithLogitsLoss only with one output "
            f"per sample (its 'scalar-valued predictions' limitation), got {outputs.shape[1]} "
            f"outputs per sample; {_FIX}"
        )
    return extend(loss_fn)(outputs, torch.zeros_like(outputs))


def _backward(loss: Tensor, ext: BackpropExtension) -> None:
    """``loss.backward()`` with the extension; BackPACK failures become clear errors."""
    try:
        with backpack(ext):
            loss.backward()
    except torch.cuda.OutOfMemoryError:  # not BackPACK's failure: let it through
        raise
    except Exception as err:
        hint = ""
        if "backpropagation quantity" in str(err):
            hint = (
                " — BackPACK's second-order rules see only modules: operations between "
                "modules in a forward method (torch.tanh, x * 2, reshapes, residual sums) "
                "break their chain; use nn modules for them"
            )
        raise NotImplementedError(
            f"BackPACK's {type(ext).__name__} failed on this model ({type(err).__name__}: "
            f"{err}){hint}; {_FIX}"
        ) from err


# ------------------------------------------------------------------------------ sampling


def _draw_seed(generator: torch.Generator | None) -> int:
    if generator is None:
        return int(torch.randint(0, 2**62, ()))
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


@contextmanager
def _forked_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the CPU RNG (and that of ``device``), seed both with ``seed``, restore on exit."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        else:
            module.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------- results


def _collect(model: nn.Module, replica: nn.Module, ext: BackpropExtension, kind: str,
             sampled: bool, batch: int, num_samples: int) -> dict[str, Tensor]:
    """Convert BackPACK's results on the replica to rows, keyed by the user's names."""
    if sampled:
        factor = -math.sqrt(num_samples / 2) if kind == "gaussian" else math.sqrt(num_samples)
    else:
        factor = 0.5 if kind == "gaussian" else 1.0
    owners = {id(p): (name, module) for name, module in replica.named_modules()
              for p in module._parameters.values() if p is not None}
    rows = batch * num_samples
    replica_params = dict(replica.named_parameters())
    out: dict[str, Tensor] = {}
    for name, original in model.named_parameters():
        if not original.requires_grad:
            continue
        p = replica_params[name]
        value = getattr(p, ext.savefield, None)
        module_name, module = owners[id(p)]
        label = f"parameter {name!r} of module {module_name!r} ({type(module).__name__})"
        if value is None:
            if p.grad is not None:
                raise NotImplementedError(
                    f"BackPACK computed no {ext.savefield} for {label}, although the loss "
                    f"depends on it; {_FIX}"
                )
            value = torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
        else:
            value = value.detach().reshape(rows, *p.shape)
            if not sampled and p.grad is not None:
                _check_sum(value, p.grad, label)
            value = factor * value
        out[name] = value.to(torch.promote_types(value.dtype, torch.float32))
    return out


def _check_sum(per_sample: Tensor, grad: Tensor, label: str) -> None:
    """BackPACK's per-sample gradients must add up to autograd's gradient of the summed loss.

    Both come from the same backward pass; they differ by round-off only, which is bounded
    by a few hundred units of round-off times ``Σ_n ‖g_n‖`` (float32 matmuls and convolutions
    on a GPU may use TF32, with a 10-bit mantissa). A BackPACK rule that mishandles a module
    gives differences of the order of the gradients themselves.
    """
    eps = torch.finfo(per_sample.dtype).eps
    if per_sample.dtype == torch.float32 and per_sample.device.type == "cuda":
        eps = max(eps, 2.0**-10)
    err = torch.linalg.vector_norm(per_sample.sum(0) - grad).item()
    mass = torch.linalg.vector_norm(per_sample.reshape(per_sample.shape[0], -1), dim=1).sum()
    if not err <= 256 * eps * mass.item():
        raise NotImplementedError(
            f"BackPACK's per-sample gradients of {label} do not add up to the gradient "
            f"autograd computes (‖Σ_n g_n − g‖ = {err:.3e}, Σ_n ‖g_n‖ = {mass.item():.3e}): "
            f"BackPACK mishandles this module; {_FIX}"
        )
