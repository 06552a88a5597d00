r"""The layer-plugin contract: a plugin must agree with plain autograd, sample by sample.

:func:`check_layer_case` runs one module on one batch (possibly several calls, as with weight
sharing), records ``X`` with :class:`curvlib.capture.Capture`, sets random output gradients
``Z`` through a backward pass, and compares the plugin's

* per-sample gradients with a reference computed one sample at a time with
  :func:`torch.autograd.grad` (a Python loop: no ``vmap``, no curvlib plugin code);
* Gram ``UᵀU`` with the inner products of those reference gradients;
* weighted gradient ``Σ_n c_n g_n`` (random ``c``) with the same sum of the references, for
  all parameters and, with ``params=``, for a single one (exactly that name comes back);
* per-sample inner products ``row_dots`` ``⟨g_n, v⟩`` (a random parameter-shaped ``v`` per
  parameter) with the inner products of the references;
* sum over samples with the module's ordinary batch gradient (autograd on the whole batch).

All in float64 with a relative tolerance of ``1e-10`` by default (norm-wise, see
:func:`curvlib.testing.assertions.assert_close`). :func:`check_layer_plugin` draws the cases
and seeds with hypothesis, for use in a test::

    from curvlib.testing.contract import check_layer_plugin
    from curvlib.testing.strategies import layer_cases

    def test_my_plugin():
        check_layer_plugin(MyPlugin(), my_cases())

The reference assumes the module treats samples independently (dimension 0 of every
batched input is the sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.capture import Call
from curvlib.testing.assertions import assert_close

__all__ = ["LayerCase", "check_layer_case", "check_layer_plugin", "reference_per_sample_grads"]


@dataclass(frozen=True)
class LayerCase:
    """A module and the calls of one forward pass; prints as its ``description``.

    Attributes:
        description: a short readable configuration (shown when a property fails).
        module: the module, in float64.
        calls: the calls of one forward pass, each ``(args, kwargs)``; tensors whose
            dimension 0 has the batch size are batched.
    """

    description: str
    module: nn.Module = field(repr=False, compare=False)
    calls: tuple[tuple[tuple[Any, ...], dict[str, Any]], ...] = field(repr=False,
                                                                      compare=False)

    @property
    def batch_size(self) -> int:
        """``N``: dimension 0 of the first call's first tensor argument."""
        args, kwargs = self.calls[0]
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                return int(value.shape[0])
        raise ValueError(f"{self.description}: no tensor input with a batch dimension")


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _slice(value: Any, n: int, i: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[i:i + 1]
    return value


def reference_per_sample_grads(
    module: nn.Module,
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    grad_outputs: Sequence[Tensor],
) -> dict[str, Tensor]:
    """``g_n = Σ_calls J_θ f(x_n)ᵀ z_n`` by one autograd call per sample (a plain loop)."""
    params = _params(module)
    args0, kwargs0 = calls[0]
    n = next(int(v.shape[0]) for v in (*args0, *kwargs0.values())
             if isinstance(v, Tensor) and v.dim() > 0)
    rows: list[list[Tensor]] = []
    for i in range(n):
        total = None
        for (args, kwargs), z in zip(calls, grad_outputs, strict=True):
            out = module(*(_slice(a, n, i) for a in args),
                         **{k: _slice(v, n, i) for k, v in kwargs.items()})
            term = (out * z[i:i + 1]).sum()
            total = term if total is None else total + term
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g
                     for g, p in zip(grads, params.values(), strict=True)])
    return {name: torch.stack([r[j] for r in rows]) for j, name in enumerate(params)}


def check_layer_case(plugin: Any, case: LayerCase, seed: int = 0, *, rtol: float = 1e-10
                     ) -> None:
    """Assert that ``plugin`` agrees with the autograd reference on ``case``.

    Raises ``AssertionError`` naming the quantity and parameter that differ.
    """
    module = case.module
    params = _params(module)
    gen = torch.Generator().manual_seed(seed)
    calls = []
    zs = []
    for args, kwargs in case.calls:
        with torch.no_grad():
            out = module(*args, **kwargs)
        z = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        zs.append(z)
        calls.append(Call(_detach(args), _detach(kwargs), out, z, out._version))

    ref = reference_per_sample_grads(module, case.calls, zs)
    n = case.batch_size

    got = plugin.per_sample_grads(module, calls)
    assert set(got) == set(params), f"per-sample gradients for {sorted(got)}, expected " \
                                    f"{sorted(params)}"
    for name in params:
        assert_close(got[name], ref[name], rtol=rtol, what=f"per-sample gradient of {name}")

    batch = torch.autograd.grad(
        sum((module(*a, **k) * z).sum() for (a, k), z in zip(case.calls, zs, strict=True)),
        list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), batch, strict=True):
        g = torch.zeros_like(p) if g is None else g
        assert_close(got[name].sum(0), g, rtol=rtol, what=f"Σ_n g_n of {name} vs batch gradient")

    gram = plugin.gram(module, calls)
    assert set(gram) == set(params), f"Gram for {sorted(gram)}, expected {sorted(params)}"
    for name in params:
        flat = ref[name].reshape(n, -1)
        assert gram[name].shape == (n, n), f"Gram of {name} has shape {tuple(gram[name].shape)}"
        assert_close(gram[name], flat @ flat.T, rtol=rtol, what=f"Gram of {name}")

    coefficients = torch.randn(n, generator=gen, dtype=torch.float64)
    weighted = plugin.weighted_grads(module, calls, coefficients)
    assert set(weighted) == set(params), f"weighted gradients for {sorted(weighted)}"
    for name in params:
        expected = torch.einsum("n,n...->...", coefficients, ref[name])
        assert weighted[name].shape == params[name].shape, (
            f"weighted gradient of {name} has shape {tuple(weighted[name].shape)}, the "
            f"parameter {tuple(params[name].shape)}")
        assert_close(weighted[name], expected, rtol=rtol, what=f"Σ c_n g_n of {name}")

    names = list(params)
    if names:
        one = names[int(torch.randint(len(names), (1,), generator=gen))]
        single = plugin.weighted_grads(module, calls, coefficients, params=[one])
        assert set(single) == {one}, (
            f"weighted gradients with params=[{one!r}] returned {sorted(single)}")
        assert_close(single[one], weighted[one], rtol=rtol,
                     what=f"Σ c_n g_n of {one} with params=[{one!r}]")

    vectors = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64)
               for name, p in params.items()}
    dots = plugin.row_dots(module, calls, vectors)
    assert set(dots) == set(params), f"row_dots for {sorted(dots)}, expected {sorted(params)}"
    for name, v in vectors.items():
        assert dots[name].shape == (n,), (
            f"row_dots of {name} has shape {tuple(dots[name].shape)}, expected ({n},)")
        expected = ref[name].reshape(n, -1) @ v.reshape(-1)
        assert_close(dots[name], expected, rtol=rtol, what=f"⟨g_n, v⟩ (row_dots) of {name}")


def check_layer_plugin(plugin: Any, cases: Any, *, max_examples: int | None = None,
                       rtol: float = 1e-10) -> None:
    """Property-test ``plugin`` on cases drawn from the hypothesis strategy ``cases``.

    ``max_examples`` overrides the active hypothesis profile's count; pass
    :func:`curvlib.testing.strategies.examples` of a fraction (``max_examples=examples(0.25)``)
    to keep the count scaling with the profile.
    """
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @given(case=cases, seed=st.integers(0, 2**31 - 1))
    def run(case: LayerCase, seed: int) -> None:
        check_layer_case(plugin, case, seed, rtol=rtol)

    # Deadlines off: the first example pays for torch's lazy initialisation.
    options: dict[str, Any] = {"deadline": None}
    if max_examples is not None:
        options["max_examples"] = max_examples
    settings(**options)(run)()
