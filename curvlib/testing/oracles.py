r"""Dense float64 references, written from the definitions (``docs/conventions.md``).

Everything here is deliberately plain: :mod:`torch.func` per sample, dense matrices, no
structure, no shortcuts, and no import of the curvlib components they are used to check
(only the likelihood, whose ``Λ`` is part of the definition of the Fisher). Use them on
models small enough that a ``P × P`` matrix fits in memory.

Conventions:

* ``P`` counts the entries of the parameters that require gradients, in
  ``model.parameters()`` order, each tensor flattened row-major (``Tensor.flatten``);
* ``N`` samples; every matrix averages over them; a per-sample gradient
  ``g_n = ∂ℓ_n/∂θ`` is not divided by ``N``;
* the model is evaluated on one sample at a time, so it must treat samples independently
  (put BatchNorm and similar layers in ``eval()`` mode);
* parameters, floating buffers and floating inputs are copied to float64; the model itself
  is not modified.

``likelihood`` is a registered name (``"categorical"``, …) or a likelihood object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from curvlib.likelihoods import as_likelihood

__all__ = [
    "blocks",
    "empirical_fisher",
    "exact_fisher",
    "ggn",
    "gradient",
    "gram",
    "jacobians",
    "mc_fisher",
    "natural_gradient",
    "per_sample_grads",
]

DTYPE = torch.float64


def _to64(x: Tensor) -> Tensor:
    return x.detach().to(DTYPE) if x.is_floating_point() else x.detach()


def _state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """float64 copies of the trainable parameters and of the buffers (by name)."""
    params = {n: _to64(p) for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameters that require gradients")
    buffers = {n: _to64(b) for n, b in model.named_buffers()}
    return params, buffers


def _flatten(tree: dict[str, Tensor], lead: int) -> Tensor:
    """Concatenate per-parameter results ``(*lead_shape, *param_shape)`` along the last dim."""
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tree.values()], dim=-1)


def _forward_one(model: nn.Module, buffers: dict[str, Tensor]) -> Callable[..., Tensor]:
    """``f(params, x_n)``: the model's output for one sample (with its batch dim of 1)."""

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (x.unsqueeze(0),))

    return forward


def _outputs_and_jacobians(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    params, buffers = _state(model)
    forward = _forward_one(model, buffers)
    x = _to64(inputs)
    outputs = vmap(forward, in_dims=(None, 0))(params, x).squeeze(1)  # (N, *out)

    def flat_output(p: dict[str, Tensor], xn: Tensor) -> Tensor:
        return forward(p, xn).flatten()

    jac = vmap(jacrev(flat_output), in_dims=(None, 0))(params, x)  # name -> (N, K, *shape)
    return outputs, _flatten(jac, lead=2)


def jacobians(model: nn.Module, inputs: Tensor) -> Tensor:
    """Per-sample output Jacobians ``J_n = ∂f(x_n)/∂θ``, shape ``(N, K, P)``.

    ``K`` counts the outputs of one sample, flattened row-major.
    """
    return _outputs_and_jacobians(model, inputs)[1]


def per_sample_grads(
    model: nn.Module, likelihood: Any, inputs: Tensor, targets: Tensor
) -> Tensor:
    """Per-sample gradients ``g_n = ∂ℓ(y_n, f(x_n))/∂θ``, shape ``(N, P)`` (not divided by N)."""
    lik = as_likelihood(likelihood)
    params, buffers = _state(model)
    forward = _forward_one(model, buffers)

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return lik.loss(forward(p, x), y.unsqueeze(0)).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, _to64(inputs), _to64(targets))
    return _flatten(grads, lead=1)


def gradient(model: nn.Module, likelihood: Any, inputs: Tensor, targets: Tensor) -> Tensor:
    """The mini-batch gradient ``g = (1/N) Σ_n g_n`` of the mean loss, shape ``(P,)``."""
    return per_sample_grads(model, likelihood, inputs, targets).mean(0)


def exact_fisher(model: nn.Module, likelihood: Any, inputs: Tensor) -> Tensor:
    """Exact Fisher ``F = (1/N) Σ_n J_nᵀ Λ(f_n) J_n``, shape ``(P, P)``."""
    lik = as_likelihood(likelihood)
    outputs, jac = _outputs_and_jacobians(model, inputs)
    lam = lik.fisher(outputs)
    return torch.einsum("nkp,nkl,nlq->pq", jac, lam, jac) / jac.shape[0]


def mc_fisher(
    model: nn.Module,
    likelihood: Any,
    inputs: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo Fisher ``(1/(N S)) Σ_n Σ_s g_{n,s} g_{n,s}ᵀ``, shape ``(P, P)``.

    ``g_{n,s}`` is the gradient of ``ℓ(y_{n,s}, f(x_n))`` with ``y_{n,s} ~ p(· | f(x_n))``.
    Draw ``s`` samples the whole batch's targets with one ``likelihood.sample`` call, in
    order ``s = 0, 1, …``, from ``generator`` (which must live on the inputs' device), so the
    same generator state gives the same matrix, and ``mc_fisher(S)`` equals the mean of
    ``S`` consecutive ``mc_fisher(1)`` calls.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    lik = as_likelihood(likelihood)
    params, buffers = _state(model)
    outputs = vmap(_forward_one(model, buffers), in_dims=(None, 0))(params, _to64(inputs))
    outputs = outputs.squeeze(1)
    total = None
    for _ in range(num_samples):
        targets = lik.sample(outputs, generator=generator)
        g = per_sample_grads(model, lik, inputs, targets)
        total = g.T @ g if total is None else total + g.T @ g
    return total / (outputs.shape[0] * num_samples)


def empirical_fisher(
    model: nn.Module, likelihood: Any, inputs: Tensor, targets: Tensor
) -> Tensor:
    """Empirical Fisher ``(1/N) Σ_n g_n g_nᵀ`` with the data's targets, shape ``(P, P)``."""
    g = per_sample_grads(model, likelihood, inputs, targets)
    return g.T @ g / g.shape[0]


def gram(model: nn.Module, likelihood: Any, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample Gram ``UᵀU`` with ``U = [g_1 … g_N]``: entry ``(m, n)`` is ``g_mᵀ g_n``."""
    g = per_sample_grads(model, likelihood, inputs, targets)
    return g @ g.T


def ggn(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> Tensor:
    """Generalised Gauss–Newton ``(1/N) Σ_n J_nᵀ H_n J_n``, shape ``(P, P)``.

    ``H_n = ∂²ℓ_n/∂f²`` is the Hessian of the per-sample loss with respect to the sample's
    flattened output. ``loss_fn(outputs, targets)`` is called on batches of one sample and
    must return that sample's loss: per-sample losses of shape ``(1,)`` or a scalar (a
    likelihood's ``loss`` works, and so does a torch loss whose reduction you intend).
    """
    outputs, jac = _outputs_and_jacobians(model, inputs)
    out_shape = outputs.shape[1:]

    def loss_one(f_flat: Tensor, y: Tensor) -> Tensor:
        return loss_fn(f_flat.reshape(1, *out_shape), y.unsqueeze(0)).sum()

    flat = outputs.reshape(outputs.shape[0], -1)
    hess = vmap(hessian(loss_one))(flat, _to64(targets))  # (N, K, K)
    return torch.einsum("nkp,nkl,nlq->pq", jac, hess, jac) / jac.shape[0]


def blocks(matrix: Tensor, model: nn.Module) -> list[Tensor]:
    """The diagonal block of each parameter tensor, in ``model.parameters()`` order."""
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    if matrix.shape != (sum(sizes), sum(sizes)):
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} does not match the model's "
            f"{sum(sizes)} trainable parameter entries"
        )
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [matrix[s : s + d, s : s + d] for s, d in zip(starts, sizes, strict=True)]


def natural_gradient(matrix: Tensor, grad: Tensor, damping: float) -> Tensor:
    """The damped natural gradient ``(F + λI)⁻¹ g`` by a dense solve, shape of ``grad``.

    ``grad`` is ``(P,)`` or ``(P, R)`` (several right-hand sides); ``damping`` is ``λ ≥ 0``.
    """
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    p = matrix.shape[0]
    if matrix.shape != (p, p) or grad.shape[0] != p:
        raise ValueError(
            f"matrix {tuple(matrix.shape)} and grad {tuple(grad.shape)} do not match: "
            f"expected (P, P) and (P,) or (P, R)"
        )
    eye = torch.eye(p, dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.solve(matrix + damping * eye, grad)
