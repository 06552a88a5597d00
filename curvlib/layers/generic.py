r"""The generic layer plugin: any module whose samples are independent, through ``torch.func``.

For a module ``f(θ, x)`` with recorded inputs ``X`` and output gradients ``Z``:

* per-sample gradients: ``g_n = J_θ f(θ, x_n)ᵀ z_n``, a VJP of a functional call on one
  sample, vectorised over the batch with :func:`torch.func.vmap`;
* the Gram: inner products of those gradients (nothing cheaper is known in general);
* the weighted gradient ``Σ_n c_n g_n``: **one** VJP of the batched functional call with the
  per-sample-scaled output gradient ``c⊙Z``, valid because the samples are independent (with
  ``params=``, a VJP with respect to those parameters only);
* the per-sample inner products ``⟨g_n, v⟩ = z_nᵀ J_n v``: one JVP of the batched call in
  the direction ``v`` (per asked parameter), then ``Σ z ⊙ (Jv)`` over each sample's output
  entries — again valid because the samples are independent, and no per-sample gradient is
  formed. Modules whose operations have no forward-mode derivative fall back to
  materialising.

Only the module's *own* parameters are differentiated; children with parameters of their
own are handled by their own plugins. Modules whose samples interact are rejected: any
BatchNorm in training mode (its batch statistics mix the samples), and any module whose
per-sample recomputation does not reproduce the recorded output (randomness such as
dropout in training mode, or hidden batch coupling) — :class:`SampleInteractionError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from curvlib.capture import Call
from curvlib.layers.base import LayerPlugin, LayerPluginError, trainable_parameters, work_dtype
from curvlib.registry import register

__all__ = ["GenericPlugin", "SampleInteractionError"]


class SampleInteractionError(LayerPluginError):
    """A module mixes the samples of a batch, so per-sample gradients are not defined."""


def _registered_hint() -> str:
    from curvlib.layers.base import registered_layer_types

    names = [
        f"{name} ({', '.join(c.__name__ for c in types)})"
        for name, types in registered_layer_types().items()
        if types
    ]
    return (
        f"registered layer plugins: {', '.join(names)}; register one for your module with "
        f"@curvlib.register('layer', 'name') on a curvlib.layers.LayerPlugin subclass"
    )


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class GenericPlugin(LayerPlugin):
    """Per-sample quantities of any module through ``torch.func`` (the fallback plugin).

    Args:
        verify_outputs: compare the per-sample recomputed outputs with the recorded ones
            and raise :class:`SampleInteractionError` on a mismatch (costs nothing extra:
            the VJP returns the outputs).
    """

    module_types = ()

    def __init__(self, verify_outputs: bool = True):
        self.verify_outputs = verify_outputs

    @property
    def needs_output(self) -> bool:  # type: ignore[override]
        """The recorded output is compared with the recomputed one (``verify_outputs``)."""
        return self.verify_outputs

    def check(self, module: nn.Module, calls: Sequence[Call]) -> None:
        """Reject modules whose samples interact, then the base checks."""
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
                where = f" (submodule {name!r})" if name else ""
                raise SampleInteractionError(
                    f"{type(sub).__name__}{where} is in training mode: its batch statistics "
                    f"mix the samples, so per-sample gradients are not defined. Put it in "
                    f"eval() mode, use GroupNorm/LayerNorm instead, or leave its parameters "
                    f"out of the curvature. {_registered_hint()}"
                )
        super().check(module, calls)

    def _in_dims(self, values: Sequence[Any], n: int) -> tuple[int | None, ...]:
        return tuple(0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else None
                     for v in values)

    def _verify(self, module: nn.Module, call: Call, recomputed: Tensor) -> None:
        if not self.verify_outputs or call.output is None:
            return
        if call.output._version != call.output_version:
            return  # overwritten in place after the call; nothing to compare with
        recorded = call.output.detach().to(recomputed.dtype)
        if recorded.shape != recomputed.shape:
            raise SampleInteractionError(
                f"{type(module).__name__}: the output recomputed one sample at a time has "
                f"shape {tuple(recomputed.shape)}, the recorded one {tuple(recorded.shape)}"
            )
        scale = recorded.norm().clamp_min(torch.finfo(recorded.dtype).tiny)
        error = (recorded - recomputed).norm() / scale
        tol = torch.finfo(call.output.dtype).eps ** 0.5
        if error > tol:
            raise SampleInteractionError(
                f"{type(module).__name__}: recomputing the output sample by sample changed it "
                f"(relative difference {error.item():.2e} > {tol:.1e}). The module mixes the "
                f"samples of the batch or is random (dropout in training mode); per-sample "
                f"gradients are not defined for it. Put it in eval() mode or leave its "
                f"parameters out of the curvature. {_registered_hint()}"
            )

    def per_sample_grads(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """``g_n = J_θ f(θ, x_n)ᵀ z_n`` by a VJP per sample, vmapped over the batch."""
        self.check(module, calls)
        params = trainable_parameters(module)
        if not params:
            return {}
        n = calls[0].batch_size
        total: dict[str, Tensor] = {}
        for call in calls:
            dtype = work_dtype(call.grad_output, *params.values())
            p = {k: v.detach().to(dtype) for k, v in params.items()}
            args = tuple(_cast(a, dtype) for a in call.inputs)
            kw_names = list(call.kwargs)
            kw_values = tuple(_cast(call.kwargs[k], dtype) for k in kw_names)
            z = call.grad_output.to(dtype)

            values = (*args, *kw_values)
            n_args = len(args)
            dims = self._in_dims(values, n)

            def one(*vals, p=p, kw_names=kw_names, n_args=n_args, dims=dims):
                *vals_n, z_n = vals

                def f(q: dict[str, Tensor]) -> Tensor:
                    v = [x.unsqueeze(0) if isinstance(x, Tensor) and d == 0 else x
                         for x, d in zip(vals_n, dims, strict=True)]
                    kw = dict(zip(kw_names, v[n_args:], strict=True))
                    return functional_call(module, q, tuple(v[:n_args]), kw)

                out, pull = vjp(f, p)
                return pull(z_n.unsqueeze(0))[0], out.squeeze(0)

            grads, outputs = vmap(one, in_dims=(*dims, 0), randomness="different")(*values, z)
            self._verify(module, call, outputs)
            for k, g in grads.items():
                total[k] = g if k not in total else total[k] + g
        return total

    def _batched(self, module: nn.Module, call: Call, params: dict[str, nn.Parameter],
                 wanted: Collection[str]
                 ) -> tuple[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor], Tensor]:
        """The batched call as a function of the ``wanted`` parameters (the other trainable
        ones fixed), those parameters' values and ``Z``, all in the working dtype."""
        dtype = work_dtype(call.grad_output, *params.values())  # c and v never promote
        fixed = {k: v.detach().to(dtype) for k, v in params.items() if k not in wanted}
        p = {k: v.detach().to(dtype) for k, v in params.items() if k in wanted}
        args = tuple(_cast(a, dtype) for a in call.inputs)
        kwargs = {k: _cast(v, dtype) for k, v in call.kwargs.items()}

        def f(q: dict[str, Tensor]) -> Tensor:
            return functional_call(module, {**fixed, **q}, args, kwargs)

        return f, p, call.grad_output.to(dtype)

    def weighted_grads(
        self, module: nn.Module, calls: Sequence[Call], coefficients: Tensor, *,
        params: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``Σ_n c_n g_n`` as one VJP of the batched call with output gradient ``c⊙Z``
        (with respect to the parameters in ``params`` only, when given)."""
        self.check_coefficients(module, calls, coefficients)
        wanted = self.selected_parameters(module, params)
        if not wanted:
            return {}
        all_params = trainable_parameters(module)
        n = calls[0].batch_size
        total: dict[str, Tensor] = {}
        for call in calls:
            f, p, z = self._batched(module, call, all_params, wanted)
            c = coefficients.to(device=z.device, dtype=z.dtype)
            cz = z * c.reshape(n, *([1] * (z.dim() - 1)))
            out, pull = vjp(f, p)
            self._verify(module, call, out)
            for k, g in pull(cz)[0].items():
                total[k] = g if k not in total else total[k] + g
        return total

    def row_dots(self, module: nn.Module, calls: Sequence[Call],
                 vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``⟨g_n, v⟩ = z_nᵀ J_n v``: one JVP of the batched call in the direction ``v`` per
        call and asked parameter (a JVP in several parameters at once would sum their
        contributions), then ``Σ z ⊙ (Jv)`` over each sample's output entries.

        The recomputed outputs are verified as in :meth:`weighted_grads`. A module with an
        operation that has no forward-mode derivative (``NotImplementedError``) falls back to
        the materialising default of :class:`LayerPlugin`.
        """
        wanted = self.check_vectors(module, calls, vectors)
        if not wanted:
            return {}
        all_params = trainable_parameters(module)
        n = calls[0].batch_size
        total: dict[str, Tensor] = {}
        try:
            for call in calls:
                for i, name in enumerate(wanted):
                    f, p, z = self._batched(module, call, all_params, (name,))
                    v = {name: vectors[name].to(device=z.device, dtype=z.dtype)}
                    out, jv = jvp(f, (p,), (v,))
                    if i == 0:
                        self._verify(module, call, out)
                    dots = (z.reshape(n, -1) * jv.reshape(n, -1)).sum(1)
                    total[name] = dots if name not in total else total[name] + dots
        except NotImplementedError:
            return super().row_dots(module, calls, vectors)
        return total


register("layer", "generic")(GenericPlugin)
