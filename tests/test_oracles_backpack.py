r"""Cross-check of the dense oracles against BackPACK, an independent second implementation.

``curvlib.testing.oracles`` computes everything with :mod:`torch.func` (per-sample ``grad``,
``jacrev``) from the definitions; BackPACK (``backpack-for-pytorch``) computes the same
quantities by its own hand-written backpropagation rules, layer by layer. Agreement to
float64 round-off (``1e-10`` relative, norm-wise) on small random MLPs (Linear with Tanh,
ReLU, Sigmoid) and CNNs (Conv1d / Conv2d + Flatten + Linear), with and without biases, for
the three built-in likelihoods, is evidence that both are right.

What is compared, and how the scalings are converted:

* ``oracles.per_sample_grads`` ``(N, P)``, not divided by ``N``, against BackPACK's
  ``BatchGrad`` (``param.grad_batch``, ``[N, *param.shape]``, concatenated over parameters
  in ``model.parameters()`` order). BackPACK's docstring of ``BatchGrad`` states that it
  returns ``[g₁, …, gₙ]`` for a loss that is a sum ``∑ᵢ fᵢ`` and ``[g₁/n, …, gₙ/n]`` for a
  mean; we always use ``reduction="sum"``, so its per-sample gradients are unscaled, as ours.
  The torch losses are chosen so that the per-sample loss is curvlib's ``ℓ_n``:

  - categorical ↔ ``CrossEntropyLoss(reduction="sum")`` (no conversion);
  - bernoulli ↔ ``BCEWithLogitsLoss(reduction="sum")`` (no conversion; ``BatchGrad`` never
    differentiates the loss module itself, so soft targets and several outputs are fine);
  - gaussian ↔ ``0.5 * MSELoss(reduction="sum")``. BackPACK cannot scale a loss module
    (its second-order rules need the loss to be an extended ``MSELoss`` at the end of the
    graph), so we use ``MSELoss(reduction="sum")`` itself and **divide BackPACK's results by
    2**: ``∇‖f − y‖² = 2 (f − y)``.

* ``oracles.exact_fisher`` ``(P, P)`` against BackPACK's ``SqrtGGNExact``. For these
  canonical (likelihood, link) pairs the loss Hessian with respect to the output equals the
  output Fisher ``Λ(f)``, so the exact Fisher is the generalised Gauss–Newton matrix.
  ``param.sqrt_ggn_exact`` has shape ``[C, N, *param.shape]``; viewed as ``(C·N, numel)`` and
  concatenated over all parameters along ``P`` it is ``V`` with ``GGN = Vᵀ V`` — the full
  matrix, off-diagonal blocks between parameters included. With ``reduction="sum"`` BackPACK's
  loss-Hessian square roots are unscaled (they are divided by ``√N`` only for ``"mean"``; see
  ``backpack/core/derivatives/{crossentropyloss,bcewithlogitsloss,mseloss}.py``), so its GGN
  is the **sum** over samples: we divide by ``N`` (our matrices average over samples), and
  for gaussian also by 2 (``MSELoss`` has Hessian ``2 I``; BackPACK's factor is ``√2 I``).
  The diagonal of the oracle is also compared with ``DiagGGNExact`` (``param.diag_ggn_exact``),
  with the same conversions.

BackPACK 1.7.1 supports ``BCEWithLogitsLoss`` in its second-order extensions only for
outputs of shape ``(N, 1)`` (``BCELossWithLogitsDerivatives._check_input_dims`` raises
``NotImplementedError`` otherwise), so the bernoulli Fisher is checked on single-output
models; a test below pins that limitation. The per-sample-gradient
check uses several outputs for every likelihood.

``extend`` registers forward/backward hooks on the module it is given (and the forward hook
stores inputs and outputs as attributes), so BackPACK always gets a ``deepcopy`` of the model
and the oracle sees the unextended original. Models are built in float64 under
``torch.random.fork_rng()`` with ``torch.manual_seed``; data come from a seeded
``torch.Generator``, so the global RNG state is untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad, DiagGGNExact, SqrtGGNExact
from torch import Tensor, nn

from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close

DTYPE = torch.float64
N = 5  # samples per batch
SEEDS = [0, 1]
LIKELIHOODS = ["categorical", "bernoulli", "gaussian"]

# BackPACK's full backward hook on the first layer fires although the inputs do not require
# gradients; torch warns about that, and it is harmless here (BackPACK needs only the gradient
# with respect to the layer's output).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing when gradients are computed:UserWarning"
)


# ---------------------------------------------------------------------------------- models
# Each builder takes the number of outputs K and returns (module, input shape of one sample).


def _mlp_tanh(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, k)), (4,)


def _mlp_relu_sigmoid_nobias(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, 5, bias=False),
        nn.Sigmoid(),
        nn.Linear(5, k, bias=False),
    )
    return model, (4,)


def _mlp_sigmoid_mixed_bias(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, k)
    )
    return model, (3,)


def _cnn1d(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6, k),
    )
    return model, (2, 6)


def _cnn1d_nobias(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, stride=2, bias=False),  # length 7 -> 3
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(3 * 3, k, bias=False),
    )
    return model, (2, 7)


def _cnn2d(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, k),
    )
    return model, (2, 4, 4)


def _cnn2d_nobias(k: int) -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=(2, 3), stride=(1, 2), bias=False),  # 4x5 -> 3x2
        nn.ReLU(),
        nn.Conv2d(2, 3, kernel_size=2),  # 3x2 -> 2x1
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 1, k, bias=False),
    )
    return model, (2, 4, 5)


MODELS: dict[str, Callable[[int], tuple[nn.Module, tuple[int, ...]]]] = {
    "mlp_tanh": _mlp_tanh,
    "mlp_relu_sigmoid_nobias": _mlp_relu_sigmoid_nobias,
    "mlp_sigmoid_mixed_bias": _mlp_sigmoid_mixed_bias,
    "cnn1d": _cnn1d,
    "cnn1d_nobias": _cnn1d_nobias,
    "cnn2d": _cnn2d,
    "cnn2d_nobias": _cnn2d_nobias,
}


def _build(kind: str, k: int, seed: int) -> tuple[nn.Module, Tensor]:
    """A float64 model with seeded parameters and a batch of ``N`` inputs for it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, in_shape = MODELS[kind](k)
        model = model.to(DTYPE)
    gen = torch.Generator().manual_seed(10_000 + seed)
    inputs = torch.randn(N, *in_shape, generator=gen, dtype=DTYPE)
    return model, inputs


# ------------------------------------------------------------------------- likelihoods


def _targets(likelihood: str, k: int, seed: int, *, binary: bool = False) -> Tensor:
    """Targets for outputs ``(N, k)``: class indices, (soft or binary) labels, or reals."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    if likelihood == "categorical":
        return torch.randint(0, k, (N,), generator=gen)
    if likelihood == "bernoulli":
        probs = torch.rand(N, k, generator=gen, dtype=DTYPE)
        return torch.bernoulli(probs, generator=gen) if binary else probs
    return torch.randn(N, k, generator=gen, dtype=DTYPE)


def _torch_loss(likelihood: str) -> tuple[nn.Module, float]:
    """The summed torch loss and the factor that turns BackPACK's results into curvlib's."""
    if likelihood == "categorical":
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if likelihood == "bernoulli":
        return nn.BCEWithLogitsLoss(reduction="sum"), 1.0
    # curvlib's ℓ_n = ½‖f − y‖²; MSELoss(sum) = Σ_n ‖f − y‖²: gradients and GGN are twice ours.
    return nn.MSELoss(reduction="sum"), 0.5


def _fisher_outputs(likelihood: str) -> int:
    # BackPACK 1.7.1: BCEWithLogitsLoss second-order support needs outputs of shape (N, 1).
    return 1 if likelihood == "bernoulli" else 3


def _backpack_run(
    model: nn.Module, likelihood: str, inputs: Tensor, targets: Tensor, *extensions
) -> tuple[list[nn.Parameter], float]:
    """Run one extended forward/backward on a deep copy of ``model``; return its parameters."""
    bp_model = extend(copy.deepcopy(model))
    loss_fn, factor = _torch_loss(likelihood)
    loss_fn = extend(loss_fn)
    loss = loss_fn(bp_model(inputs), targets)
    with backpack(*extensions):
        loss.backward()
    return [p for p in bp_model.parameters() if p.requires_grad], factor


CASES = [
    pytest.param(kind, lik, seed, id=f"{kind}-{lik}-seed{seed}")
    for kind in MODELS
    for lik in LIKELIHOODS
    for seed in SEEDS
]


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("kind", "likelihood", "seed"), CASES)
def test_per_sample_grads_match_backpack_batch_grad(kind: str, likelihood: str, seed: int):
    k = 3
    model, x = _build(kind, k, seed)
    y = _targets(likelihood, k, seed)

    expected = oracles.per_sample_grads(model, likelihood, x, y)

    params, factor = _backpack_run(model, likelihood, x, y, BatchGrad())
    actual = factor * torch.cat([p.grad_batch.reshape(N, -1) for p in params], dim=1)

    assert expected.shape == (N, sum(p.numel() for p in model.parameters()))
    assert_close(actual, expected, what=f"per-sample gradients ({kind}, {likelihood})")
    # BackPACK's own consistency: the summed loss's gradient is the sum of the per-sample ones.
    grad = factor * torch.cat([p.grad.flatten() for p in params])
    assert_close(grad, expected.sum(0), what=f"summed gradient ({kind}, {likelihood})")


@pytest.mark.parametrize(("kind", "likelihood", "seed"), CASES)
def test_exact_fisher_matches_backpack_sqrt_ggn(kind: str, likelihood: str, seed: int):
    k = _fisher_outputs(likelihood)
    model, x = _build(kind, k, seed)
    # The exact GGN does not depend on the targets; BackPACK needs some for its forward pass.
    y = _targets(likelihood, k, seed, binary=True)

    expected = oracles.exact_fisher(model, likelihood, x)

    params, factor = _backpack_run(model, likelihood, x, y, SqrtGGNExact(), DiagGGNExact())
    # sqrt_ggn_exact: [C, N, *shape] -> (C·N, numel); V stacks all parameters along P.
    c = params[0].sqrt_ggn_exact.shape[0]
    v = torch.cat([p.sqrt_ggn_exact.reshape(c * N, -1) for p in params], dim=1)
    dense = factor * (v.T @ v) / N  # BackPACK's GGN sums over samples; ours averages
    diag = factor * torch.cat([p.diag_ggn_exact.flatten() for p in params]) / N

    assert v.shape == (c * N, expected.shape[0])
    assert_close(dense, expected, what=f"exact Fisher vs SqrtGGNExact ({kind}, {likelihood})")
    assert_close(
        diag, expected.diagonal(), what=f"Fisher diagonal vs DiagGGNExact ({kind}, {likelihood})"
    )


def test_backpack_cannot_yet_give_the_bernoulli_fisher_for_several_outputs():
    """BackPACK 1.7.1 rejects BCEWithLogitsLoss with several outputs in SqrtGGNExact.

    The several-output Bernoulli Fisher is checked against the autograd GGN in
    tests/test_oracles.py instead. When BackPACK adds support this test fails: then replace
    it with the dense comparison ``assert_close(VᵀV / N, oracles.exact_fisher(...))``.
    """
    model, x = _build("mlp_tanh", 3, 0)
    y = _targets("bernoulli", 3, 0, binary=True)
    with pytest.raises(NotImplementedError, match="scalar-valued"):
        _backpack_run(model, "bernoulli", x, y, SqrtGGNExact())


def test_backpack_extension_leaves_the_oracle_model_alone():
    """BackPACK works on a deep copy: the model the oracle sees keeps no hooks or I/O."""
    model, x = _build("cnn2d", 3, 0)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    _backpack_run(model, "categorical", x, _targets("categorical", 3, 0), BatchGrad())
    for module in model.modules():
        assert not getattr(module, "_backpack_extend", False)
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "input0") and not hasattr(module, "output")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
