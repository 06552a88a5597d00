r"""Likelihoods: the distribution over targets that a loss stands for.

A likelihood maps a model output ``f`` (one row per sample, shape ``(N, *)``) to a
distribution ``p(y | f)``. It gives

* :meth:`~Likelihood.loss` — the per-sample loss ``ℓ_n = −log p(y_n | f_n)`` (up to a
  constant), shape ``(N,)``; the mini-batch loss is its mean;
* :meth:`~Likelihood.sample` — targets ``y ~ p(· | f)`` drawn with a caller-owned
  :class:`torch.Generator`;
* :meth:`~Likelihood.fisher` — the output-space Fisher ``Λ(f_n) = E_y[∇_f ℓ ∇_f ℓᵀ]`` in
  closed form, shape ``(N, K, K)`` with ``K`` the number of outputs of one sample, flattened
  row-major;
* :meth:`~Likelihood.fisher_sqrt` — a factor ``S`` with ``S Sᵀ = Λ``, shape ``(N, K, R)``.

One *sample* is always one row of the batch (index ``n`` of dimension 0); every other output
dimension belongs to that sample and the per-sample loss **sums** over it. The built-ins:

=================  =================================  ===================================
name               torch loss it matches              ``Λ(f)`` per sample
=================  =================================  ===================================
``categorical``    ``CrossEntropyLoss``               ``diag(p) − p pᵀ`` per position
``bernoulli``      ``BCEWithLogitsLoss``              ``diag(σ(f)(1 − σ(f)))``
``gaussian``       ``0.5 * MSELoss`` (unit variance)  ``I``
=================  =================================  ===================================

With torch's default ``reduction="mean"`` those losses average over *all* elements; ours average
over samples only, so ``mean(ℓ_n) = torch_loss(reduction="sum") / N`` (times ½ for the
Gaussian). See ``docs/conventions.md``.

Targets are checked by :meth:`~Likelihood.loss` (and so :meth:`~Likelihood.mean_loss`):
categorical class indices must lie in ``[0, C)`` and Bernoulli targets in ``[0, 1]`` (finite);
others raise :class:`~curvlib.errors.InputError` naming the likelihood, the range and the fix.
On the CPU torch's own bounds check of ``cross_entropy`` is used (no extra pass); on other
devices the indices are checked before torch sees them (one host synchronisation: an index
out of range would end in a device-side assert there), as are Bernoulli targets everywhere.
Targets drawn by :meth:`~Likelihood.sample`, and targets already checked against as many
classes and not changed in place since, are not checked again; neither are targets batched
by a :mod:`torch.func` transform (no data-dependent control flow there; on the CPU torch's
check still refuses an out-of-range class index).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlib.errors import InputError
from curvlib.registry import get, register

__all__ = ["Bernoulli", "Categorical", "Gaussian", "Likelihood", "as_likelihood"]


#: An ``ignore_index`` no class index can equal (``cross_entropy`` ignores -100 by default).
_NO_INDEX = -(2**62)


#: Attribute a tensor of targets carries once known valid: ``(likelihood, _version, bound)``.
_VALID = "_curvlib_valid_targets"
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _transformed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a :mod:`torch.func` transform (vmap, grad)."""
    return _is_wrapped is not None and bool(_is_wrapped(tensor))


def _mark_valid(targets: Tensor, likelihood: str, bound: int | None = None) -> Tensor:
    """Note on ``targets`` that they are valid for ``likelihood`` (categorical: for any
    number of classes ``≥ bound``) while not changed in place; returns ``targets``."""
    try:
        setattr(targets, _VALID, (likelihood, targets._version, bound))
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes or versions
        pass
    return targets


def _known_valid(targets: Tensor, likelihood: str, bound: int | None = None) -> bool:
    mark = getattr(targets, _VALID, None)
    if mark is None or mark[0] != likelihood:
        return False
    try:
        version = targets._version
    except RuntimeError:  # inference tensors keep no version counter
        return False
    return mark[1] == version and (bound is None or mark[2] <= bound)


def _checks_explicitly(targets: Tensor) -> bool:
    """Whether categorical indices are checked before ``cross_entropy``: not on the CPU, whose
    kernel refuses an index out of range (an ``IndexError`` caught and explained), but on
    devices whose kernels report one by a device-side assert."""
    return targets.device.type != "cpu"


def _class_index_error(targets: Tensor, classes: int) -> InputError:
    """The error for class indices outside ``[0, classes)``, with the values found."""
    found = ""
    if not _transformed(targets):
        bad = int(((targets < 0) | (targets >= classes)).sum())
        if bad:
            found = (f"; got {_span(int(targets.min()), int(targets.max()))}, {bad} "
                     f"outside the range")
    return InputError(
        f"categorical: targets must be class indices in [0, {classes}) — the outputs have "
        f"{classes} classes in dimension 1{found}. Relabel the targets to 0…{classes - 1} "
        f"(e.g. torch.unique(targets, return_inverse=True)[1]) or give the model as many "
        f"outputs as there are classes; curvlib's categorical ignores no index (torch's "
        f"CrossEntropyLoss skips -100 by default): drop such entries from the batch"
    )


def _span(low: float, high: float) -> str:
    return f"the value {low:g}" if low == high else f"values from {low:g} to {high:g}"


def _sum_per_sample(values: Tensor) -> Tensor:
    """Sum every dimension but the first: ``(N, *) -> (N,)``."""
    return values.reshape(values.shape[0], -1).sum(1)


def _check_batched(outputs: Tensor, min_dim: int, what: str) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"{what}: outputs must be a torch.Tensor, got {type(outputs).__name__}")
    if outputs.dim() < min_dim:
        raise InputError(
            f"{what}: outputs must have a batch dimension first and at least {min_dim} "
            f"dimensions, got shape {tuple(outputs.shape)}; for a single sample use "
            f"outputs.unsqueeze(0)"
        )
    if not outputs.is_floating_point():
        raise TypeError(f"{what}: outputs must be floating point, got {outputs.dtype}")


class Likelihood(abc.ABC):
    """Base class of likelihoods (kind ``likelihood``); subclass it to add your own.

    Subclasses implement :meth:`loss`, :meth:`sample`, :meth:`fisher` and
    :meth:`fisher_sqrt` for outputs of shape ``(N, *)``. They must work under
    :func:`torch.func.vmap` and :func:`torch.func.grad` (no data-dependent Python control
    flow, no ``.item()``), because the oracles differentiate :meth:`loss` per sample.
    :func:`curvlib.testing.assertions.check_likelihood` tests a new likelihood's
    consistency: ``S Sᵀ = Λ``, ``Λ`` symmetric PSD, and ``Λ`` equal to the covariance of the
    sampled score ``∇_f ℓ``.
    """

    #: The registry name (set by subclasses; informational).
    name: str = ""

    @abc.abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample loss ``−log p(y_n | f_n)`` (up to a constant), shape ``(N,)``."""

    @abc.abstractmethod
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets ``y_n ~ p(· | f_n)``, shaped as :meth:`loss` expects; no gradient flows."""

    @abc.abstractmethod
    def fisher(self, outputs: Tensor) -> Tensor:
        """Output-space Fisher ``Λ(f_n)``, shape ``(N, K, K)``, ``K = outputs[0].numel()``."""

    @abc.abstractmethod
    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        """A factor ``S_n`` with ``S_n S_nᵀ = Λ(f_n)``, shape ``(N, K, R)``."""

    def mean_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mini-batch loss ``(1/N) Σ_n ℓ_n`` (the loss whose gradient is ``g``)."""
        return self.loss(outputs, targets).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register("likelihood", "categorical")
class Categorical(Likelihood):
    """Categorical likelihood over classes in dimension 1, matching ``CrossEntropyLoss``.

    Outputs are logits of shape ``(N, C)`` or ``(N, C, *)``; targets are class indices of
    shape ``(N,)`` or ``(N, *)``. With extra dimensions ``*`` (pixels of a segmentation,
    tokens of a sequence) each position holds an independent categorical variable and the
    **sample is still the row** ``n``: its loss sums the cross-entropy over the positions,
    ``ℓ_n = −Σ_s log p_{n, y_{n,s}, s}``, and ``Λ(f_n)`` is block-diagonal over positions
    with blocks ``diag(p_s) − p_s p_sᵀ`` (in the row-major order of ``(C, *)``).
    """

    name = "categorical"

    @staticmethod
    def _check(outputs: Tensor) -> None:
        _check_batched(outputs, 2, "categorical")
        if outputs.shape[1] < 2:
            raise InputError(
                f"categorical: outputs need at least 2 classes in dimension 1, got shape "
                f"{tuple(outputs.shape)}; for one logit per sample use 'bernoulli'"
            )

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample cross-entropy summed over positions; targets are class indices in
        ``[0, C)`` (others raise :class:`~curvlib.errors.InputError`, module docstring)."""
        self._check(outputs)
        expected = (outputs.shape[0], *outputs.shape[2:])
        if (not isinstance(targets, Tensor) or targets.is_floating_point()
                or targets.is_complex() or tuple(targets.shape) != expected):
            got = (f"{targets.dtype} of shape {tuple(targets.shape)}"
                   if isinstance(targets, Tensor) else type(targets).__name__)
            raise InputError(
                f"categorical: targets must be integer class indices of shape {expected} for "
                f"outputs of shape {tuple(outputs.shape)}, got {got}"
            )
        classes = outputs.shape[1]
        indices = targets.long()
        if (_checks_explicitly(indices) and not _transformed(indices)
                and not _known_valid(targets, "categorical", classes)):
            if bool(((indices < 0) | (indices >= classes)).any()):  # one host sync
                raise _class_index_error(indices, classes)
            _mark_valid(targets, "categorical", classes)
        # one fused op (log-softmax and pick); no class index is ignored: an index out of
        # range, negative ones included, raises (on the CPU; only an index equal to
        # _NO_INDEX would pass there, ignored)
        try:
            per_entry = F.cross_entropy(outputs, indices, reduction="none",
                                        ignore_index=_NO_INDEX)
        except (IndexError, RuntimeError) as error:
            if _transformed(indices):
                if "out of bounds" not in str(error):
                    raise
            elif not bool(((indices < 0) | (indices >= classes)).any()):
                raise
            raise _class_index_error(indices, classes) from error
        return per_entry if per_entry.dim() == 1 else _sum_per_sample(per_entry)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(outputs)
        probs = outputs.detach().softmax(1).movedim(1, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat, 1, generator=generator)
        return _mark_valid(draws.reshape(probs.shape[:-1]), "categorical", outputs.shape[1])

    def _probs(self, outputs: Tensor) -> Tensor:
        """Probabilities as ``(N, C, S)`` with ``S`` the number of positions."""
        self._check(outputs)
        return outputs.softmax(1).reshape(outputs.shape[0], outputs.shape[1], -1)

    def fisher(self, outputs: Tensor) -> Tensor:
        p = self._probs(outputs)
        n, c, s = p.shape
        eye_s = torch.eye(s, dtype=p.dtype, device=p.device)
        diag = torch.diag_embed(p.reshape(n, c * s))
        outer = torch.einsum("ncs,nds,st->ncsdt", p, p, eye_s).reshape(n, c * s, c * s)
        return diag - outer

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        # S = diag(√p) − p √pᵀ per position: S Sᵀ = diag(p) − 2 p pᵀ + p (√pᵀ√p) pᵀ and Σ p = 1.
        p = self._probs(outputs)
        n, c, s = p.shape
        root = p.sqrt()
        eye_s = torch.eye(s, dtype=p.dtype, device=p.device)
        diag = torch.diag_embed(root.reshape(n, c * s))
        outer = torch.einsum("ncs,nds,st->ncsdt", p, root, eye_s).reshape(n, c * s, c * s)
        return diag - outer


@register("likelihood", "bernoulli")
class Bernoulli(Likelihood):
    """Independent Bernoulli variables with logits ``f``, matching ``BCEWithLogitsLoss``.

    Outputs have any shape ``(N, *)``; targets have the same shape with values in ``[0, 1]``
    (soft targets allowed, as in torch). The per-sample loss sums over all output dimensions:
    ``ℓ_n = Σ_k softplus(f_nk) − y_nk f_nk`` — the autoencoder loss of the TNT paper.
    ``Λ(f_n) = diag(σ(f_n) ⊙ (1 − σ(f_n)))``.
    """

    name = "bernoulli"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample binary cross-entropy with logits summed over outputs; targets in
        ``[0, 1]`` (others raise :class:`~curvlib.errors.InputError`, module docstring)."""
        _check_batched(outputs, 1, "bernoulli")
        _check_same_shape(outputs, targets, "bernoulli")
        if targets.is_complex():
            raise InputError(f"bernoulli: targets must be real numbers in [0, 1], got "
                             f"{targets.dtype}")
        if (targets.dtype != torch.bool and not _transformed(targets)
                and not _known_valid(targets, "bernoulli")):
            inside = (targets >= 0) & (targets <= 1)  # False for NaN too
            if not bool(inside.all()):  # one host sync off the CPU
                raise _probability_error(targets, inside)
            _mark_valid(targets, "bernoulli")
        elementwise = F.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs.dtype), reduction="none"
        )
        return _sum_per_sample(elementwise)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batched(outputs, 1, "bernoulli")
        p = outputs.detach().sigmoid()
        # u < p with u ~ U[0, 1) is Bernoulli(p); about 3× faster than torch.bernoulli on CPU
        u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        return _mark_valid((u < p).to(p.dtype), "bernoulli")

    def _variance(self, outputs: Tensor) -> Tensor:
        _check_batched(outputs, 1, "bernoulli")
        p = outputs.sigmoid().reshape(outputs.shape[0], -1)
        return p * (1 - p)

    def fisher(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed(self._variance(outputs))

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed(self._variance(outputs).sqrt())


@register("likelihood", "gaussian")
class Gaussian(Likelihood):
    """Unit-variance Gaussian ``y ~ N(f, I)``: ``ℓ_n = ½‖f_n − y_n‖²`` summed over outputs.

    Outputs have any shape ``(N, *)``; targets the same shape. This is
    ``0.5 * MSELoss(reduction="sum") / N`` for the batch mean, and ``Λ(f_n) = I``.
    """

    name = "gaussian"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_batched(outputs, 1, "gaussian")
        _check_same_shape(outputs, targets, "gaussian")
        return 0.5 * _sum_per_sample((outputs - targets.to(outputs.dtype)) ** 2)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batched(outputs, 1, "gaussian")
        noise = torch.randn(
            outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        return outputs.detach() + noise

    def _identity(self, outputs: Tensor) -> Tensor:
        _check_batched(outputs, 1, "gaussian")
        n, k = outputs.shape[0], math.prod(outputs.shape[1:])
        eye = torch.eye(k, dtype=outputs.dtype, device=outputs.device)
        return eye.expand(n, k, k)

    def fisher(self, outputs: Tensor) -> Tensor:
        return self._identity(outputs)

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        return self._identity(outputs)


def _probability_error(targets: Tensor, inside: Tensor) -> InputError:
    """The error for Bernoulli targets outside ``[0, 1]`` (``inside`` marks the good ones)."""
    bad = targets[~inside]
    finite = bad[torch.isfinite(bad)] if bad.is_floating_point() else bad
    parts = []
    if finite.numel():
        parts.append(_span(finite.min().item(), finite.max().item()))
    if finite.numel() < bad.numel():
        parts.append(f"{bad.numel() - finite.numel()} NaN or infinite")
    return InputError(
        f"bernoulli: targets must be probabilities in [0, 1] (0/1 labels or soft targets), "
        f"got {bad.numel()} outside it ({', '.join(parts)}). For labels of two classes use "
        f"0 and 1 (e.g. (labels == positive).float()); for logits or scores as targets apply "
        f"torch.sigmoid first; for real-valued targets use 'gaussian'"
    )


def _check_same_shape(outputs: Tensor, targets: Tensor, what: str) -> None:
    if not isinstance(targets, Tensor) or targets.shape != outputs.shape:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise InputError(
            f"{what}: targets must have the outputs' shape {tuple(outputs.shape)}, got {shape}"
        )


_REQUIRED = ("loss", "sample", "fisher", "fisher_sqrt")


def as_likelihood(likelihood: Any) -> Likelihood:
    """Resolve a registered name, a likelihood class or a likelihood object to an object.

    Any object with ``loss``, ``sample``, ``fisher`` and ``fisher_sqrt`` methods is accepted
    as it is (it need not subclass :class:`Likelihood`).
    """
    if isinstance(likelihood, str):
        likelihood = get("likelihood", likelihood)
    if isinstance(likelihood, type):
        likelihood = likelihood()
    missing = [m for m in _REQUIRED if not callable(getattr(likelihood, m, None))]
    if missing:
        raise TypeError(
            f"{likelihood!r} is not a likelihood: it lacks {', '.join(missing)}. Pass a "
            f"registered name (see curvlib.available('likelihood')) or a curvlib.Likelihood"
        )
    return likelihood
