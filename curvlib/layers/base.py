r"""The layer-plugin interface (kind ``layer``) and its lookup by module class.

A layer plugin knows one family of modules and computes, from the inputs ``X`` and output
gradients ``Z`` recorded by :class:`curvlib.capture.Capture`, the per-layer quantities that
curvature sources and structures need:

* :meth:`LayerPlugin.per_sample_grads` — ``g_n = ∂ℓ_n/∂θ`` for each trainable parameter of
  the module, shape ``(N, *param.shape)``;
* :meth:`LayerPlugin.gram` — the per-sample Gram ``UᵀU`` (``N × N``) of each parameter;
* :meth:`LayerPlugin.weighted_grads` — ``Σ_n c_n g_n`` for a coefficient vector ``c``
  (optionally for a subset of the parameters, ``params=``);
* :meth:`LayerPlugin.row_dots` — ``⟨g_n, v⟩`` for each sample and a parameter-shaped ``v``;
* :meth:`LayerPlugin.kfac_factors` — Kronecker factors of the layer's curvature.

Conventions: every method receives the *list* of calls a module made in one forward pass
(weight sharing records several); the quantities are those of the sum of the calls'
contributions, exactly as autograd would accumulate them. ``Z`` is the gradient of the
**sum** of the per-sample losses, so that ``g_n`` is not divided by ``N``. Results are in the
*working dtype*: the promotion of the recorded dtype with float32 (curvature is never kept in
half precision).

Lookup (:func:`plugin_for`) walks the module class's MRO and takes the first class some
registered plugin declares in :attr:`LayerPlugin.module_types`; a module no plugin claims
gets the ``generic`` plugin, which works for any module whose samples are independent.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from curvlib.capture import Call
from curvlib.errors import CurvlibError
from curvlib.registry import _entries, load_plugins

__all__ = [
    "KFACFactors",
    "LayerPlugin",
    "LayerPluginError",
    "per_sample_mode_statistics",
    "plugin_for",
    "registered_layer_types",
    "trainable_parameters",
    "work_dtype",
]


class LayerPluginError(CurvlibError, RuntimeError):
    """A layer plugin cannot compute a quantity for a module (the message says why)."""


#: Dtypes that float32 absorbs (the common case of :func:`work_dtype`, decided without a
#: dispatcher call).
_WITHIN_FLOAT32 = frozenset({torch.float32, torch.float16, torch.bfloat16})


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype curvature is computed in: the promoted dtype of ``tensors`` and float32."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype not in _WITHIN_FLOAT32:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own (non-recursive) parameters that require gradients, by local name."""
    return {
        n: p for n, p in module._parameters.items() if p is not None and p.requires_grad
    }


@dataclass
class KFACFactors:
    r"""Kronecker factors of one layer: ``F ≈ ⊕_g (grad_cov[g] ⊗ input_cov[g])``.

    For a weight ``W`` of shape ``(O, D)`` (a convolution's ``(O, I/G, *kernel)`` flattened
    per group to ``(O/G, D)`` with ``D = (I/G)·∏kernel``) the per-sample gradient is
    ``Σ_t z_t x_tᵀ`` and, row-major, ``vec(z xᵀ) = z ⊗ x``; so the output-gradient factor
    comes first. With ``bias_folded`` the input vectors are ``[x, 1]`` and the last row and
    column of ``input_cov`` belong to the bias.

    Attributes:
        input_cov: ``(G, D', D')``: ``D' = D + 1`` with a folded bias, ``D`` without, ``1``
            when only the bias is trainable.
        grad_cov: ``(G, O/G, O/G)``.
        has_weight: the weight is trainable (its coordinates come first in ``input_cov``).
        bias_folded: the bias is trainable and folded in as the last input coordinate.
        weight_shape: the weight's shape (to map back to parameter order).
        mode: ``"expand"`` or ``"reduce"`` (see :meth:`LayerPlugin.kfac_factors`).
    """

    input_cov: Tensor
    grad_cov: Tensor
    has_weight: bool
    bias_folded: bool
    weight_shape: tuple[int, ...]
    mode: str = "expand"

    @property
    def groups(self) -> int:
        """Number of independent groups ``G`` (1 except for grouped convolutions)."""
        return int(self.input_cov.shape[0])

    def dense(self) -> Tensor:
        """The approximation as a dense matrix over the layer's trainable entries.

        Rows and columns are in parameter order: the weight flattened row-major (if
        trainable), then the bias (if trainable) — the order of ``model.parameters()`` and
        of :mod:`curvlib.testing.oracles`. Meant for tests and small layers.
        """
        g = self.groups
        out = self.weight_shape[0]
        per_out = out // g
        d = (int(torch.Size(self.weight_shape[1:]).numel()) if self.has_weight else 0)
        n_weight = out * d if self.has_weight else 0
        total = n_weight + (out if self.bias_folded else 0)
        dense = self.input_cov.new_zeros(total, total)
        for k in range(g):
            index = []
            for o in range(k * per_out, (k + 1) * per_out):
                if self.has_weight:
                    index.extend(range(o * d, (o + 1) * d))
                if self.bias_folded:
                    index.append(n_weight + o)
            idx = torch.tensor(index, device=dense.device)
            block = torch.kron(self.grad_cov[k], self.input_cov[k])
            dense[idx.unsqueeze(1), idx.unsqueeze(0)] = block
        return dense


class LayerPlugin(abc.ABC):
    """Base class of layer plugins; subclass it and register it with kind ``"layer"``.

    A subclass sets :attr:`module_types` and implements :meth:`per_sample_grads` and
    :meth:`weighted_grads`; :meth:`gram` and :meth:`row_dots` default to materialising the
    per-sample gradients, and :meth:`kfac_factors` to "not available". Plugins hold no
    per-module state: one instance serves every module of its types.

    Example::

        @curvlib.register("layer", "scale")
        class ScalePlugin(curvlib.layers.LayerPlugin):
            module_types = (Scale,)           # y = x * weight, weight of shape (D,)

            def per_sample_grads(self, module, calls):
                return {"weight": sum((c.input * c.grad_output).reshape(
                    c.batch_size, -1, module.weight.numel()).sum(1) for c in calls)}

            def weighted_grads(self, module, calls, coefficients, *, params=None):
                if not self.selected_parameters(module, params):
                    return {}
                return {"weight": sum(torch.einsum("n,n...d->d", coefficients,
                                                   c.input * c.grad_output) for c in calls)}

    :func:`curvlib.testing.contract.check_layer_plugin` checks a plugin against an
    independent ``torch.func`` computation.
    """

    #: Module classes this plugin handles (subclasses included, through the MRO).
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Whether the plugin reads :attr:`Call.output` (``Y``). curvlib's optimizers keep only
    #: the graph edge of an output whose plugin does not, so its memory is freed as early as
    #: autograd allows; ``Call.output`` is then ``None``.
    needs_output: ClassVar[bool] = False

    def check(self, module: nn.Module, calls: Sequence[Call]) -> None:
        """Raise :class:`LayerPluginError` if the calls cannot be handled (default: needs ``Z``)."""
        if not calls:
            raise LayerPluginError(
                f"{type(module).__name__} was not called in the captured forward pass"
            )
        if len(calls) == 1 and calls[0].grad_output is not None:
            return  # one call: nothing to compare (this runs for every layer, every step)
        sizes = {c.batch_size for c in calls}
        if len(sizes) != 1:
            raise LayerPluginError(
                f"{type(module).__name__} was called with different batch sizes {sorted(sizes)}"
                f" in one forward pass; per-sample quantities need dimension 0 to be the "
                f"sample in every call"
            )
        for c in calls:
            if c.grad_output is None:
                raise LayerPluginError(
                    f"no output gradient was recorded for {type(module).__name__}: run a "
                    f"backward pass (Capture.backward_to_outputs) before asking for "
                    f"per-sample quantities"
                )

    def check_coefficients(self, module: nn.Module, calls: Sequence[Call],
                           coefficients: Tensor) -> None:
        """:meth:`check`, then that ``coefficients`` has one entry per sample, ``(N,)``."""
        self.check(module, calls)
        n = calls[0].batch_size
        if coefficients.shape != (n,):
            raise ValueError(
                f"coefficients must have shape ({n},) for a batch of {n}, got "
                f"{tuple(coefficients.shape)}"
            )

    def selected_parameters(self, module: nn.Module, params: Collection[str] | None = None
                            ) -> dict[str, nn.Parameter]:
        """The module's trainable parameters by local name, or only those named in ``params``.

        ``params=None`` means all of them; a single string is taken as one name. The result
        keeps the module's parameter order.

        Raises:
            ValueError: a name in ``params`` is not a trainable parameter of the module (the
                message names it and the trainable ones).
        """
        trainable = trainable_parameters(module)
        if params is None:
            return trainable
        names = {params} if isinstance(params, str) else set(params)
        unknown = sorted(names - set(trainable))
        if unknown:
            raise ValueError(
                f"{type(module).__name__} has no trainable parameter(s) {unknown}; its "
                f"trainable parameters are {sorted(trainable)}"
            )
        return {k: p for k, p in trainable.items() if k in names}

    def check_vectors(self, module: nn.Module, calls: Sequence[Call],
                      vectors: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
        """:meth:`check`, then that every name in ``vectors`` is a trainable parameter and its
        tensor has the parameter's shape; returns those parameters (module order)."""
        self.check(module, calls)
        params = self.selected_parameters(module, list(vectors))
        for name, p in params.items():
            if tuple(vectors[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"the vector for {type(module).__name__}.{name} has shape "
                    f"{tuple(vectors[name].shape)}, the parameter {tuple(p.shape)}"
                )
        return params

    @abc.abstractmethod
    def per_sample_grads(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """Per-sample gradients ``(N, *shape)`` of each trainable parameter, by local name."""

    def gram(self, module: nn.Module, calls: Sequence[Call]) -> dict[str, Tensor]:
        """Per-sample Gram ``UᵀU`` ``(N, N)`` of each trainable parameter, by local name.

        The default materialises the per-sample gradients; plugins override it where an
        identity avoids that.
        """
        grads = self.per_sample_grads(module, calls)
        out = {}
        for name, g in grads.items():
            flat = g.reshape(g.shape[0], -1)
            out[name] = flat @ flat.T
        return out

    @abc.abstractmethod
    def weighted_grads(
        self, module: nn.Module, calls: Sequence[Call], coefficients: Tensor, *,
        params: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``Σ_n c_n g_n`` of each trainable parameter (parameter-shaped), by local name.

        With ``params`` only those local names are computed and returned (a subset of the
        trainable ones; :meth:`selected_parameters` checks them and raises ``ValueError``
        for others). ``coefficients`` ``(N,)`` never promote the working dtype.
        """

    def row_dots(self, module: nn.Module, calls: Sequence[Call],
                 vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``⟨g_n, v⟩`` for every sample ``n``, shape ``(N,)``, for each local name in
        ``vectors`` (a parameter-shaped ``v`` per trainable parameter asked for).

        ``g_n`` is the per-sample gradient of :meth:`per_sample_grads` (not divided by
        ``N``, all calls summed). The result is in the working dtype; ``v`` never promotes
        it. Names that are not trainable parameters of the module raise ``ValueError``.

        The default **materialises** the per-sample gradients and takes the inner products;
        plugins override it where the layer's structure avoids that (Linear, convolutions,
        the generic plugin's JVP).
        """
        self.check_vectors(module, calls, vectors)
        if not vectors:
            return {}
        grads = self.per_sample_grads(module, calls)
        out = {}
        for name, v in vectors.items():
            g = grads[name]
            flat = g.reshape(g.shape[0], -1)
            out[name] = flat @ v.to(device=g.device, dtype=g.dtype).reshape(-1)
        return out

    def mode_statistics(self, module: nn.Module, calls: Sequence[Call],
                        dims: dict[str, tuple[int, ...]],
                        modes: dict[str, list[int]] | None = None
                        ) -> dict[str, list[Tensor | None]]:
        """``(1/N) Σ_n mat_i(g_n) mat_i(g_n)ᵀ`` per mode ``i`` of each parameter, seen with
        shape ``dims[name]`` (a reshape of the parameter), by local name; only the modes
        ``modes[name]`` (default: all), ``None`` in the list for the others.

        The default materialises the per-sample gradients; plugins override it where the
        per-sample gradient has a structure that avoids that (Linear: rank one).
        """
        grads = self.per_sample_grads(module, calls)
        out = {}
        for name, g in grads.items():
            if name in dims:
                wanted = None if modes is None else modes.get(name)
                out[name] = per_sample_mode_statistics(g.reshape(g.shape[0], *dims[name]),
                                                       wanted)
        return out

    def kfac_factors(
        self, module: nn.Module, calls: Sequence[Call], *, mode: str = "expand"
    ) -> KFACFactors:
        """Kronecker factors of the module's curvature; not every plugin provides them."""
        raise LayerPluginError(
            f"the {type(self).__name__} layer plugin has no Kronecker factors for "
            f"{type(module).__name__}; use a structure that does not need them (e.g. "
            f"tensor_normal, dense) or register a plugin that implements kfac_factors"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def per_sample_mode_statistics(g: Tensor, modes: list[int] | None = None
                               ) -> list[Tensor | None]:
    """``[(1/N) Σ_n mat_i(g_n) mat_i(g_n)ᵀ for every mode i]`` for ``g`` of shape
    ``(N, d_1, …, d_k)``; with ``modes``, ``None`` for the modes not listed."""
    n, k = g.shape[0], g.dim() - 1
    out: list[Tensor | None] = []
    for i in range(k):
        if modes is not None and i not in modes:
            out.append(None)
            continue
        mat = g.movedim(i + 1, 1).reshape(n, g.shape[i + 1], -1)
        out.append(torch.einsum("nab,ncb->ac", mat, mat) / n)
    return out


_instances: dict[type, LayerPlugin] = {}


def _instance(obj: type[LayerPlugin] | LayerPlugin) -> LayerPlugin:
    if isinstance(obj, LayerPlugin):
        return obj
    if obj not in _instances:
        _instances[obj] = obj()
    return _instances[obj]


def plugin_for(module: nn.Module) -> LayerPlugin:
    """The layer plugin for ``module``: the first class in its MRO a plugin claims.

    A module no registered plugin claims gets the ``generic`` plugin.

    Raises:
        LayerPluginError: two registered plugins claim the same class (the message names
            them and how to resolve it).
    """
    load_plugins()
    claims: dict[type, list[tuple[str, object]]] = {}
    for name, reg in _entries["layer"].items():
        for cls in getattr(reg.obj, "module_types", ()):
            claims.setdefault(cls, []).append((name, reg.obj))
    for cls in type(module).__mro__:
        found = claims.get(cls)
        if not found:
            continue
        if len(found) > 1:
            names = ", ".join(repr(n) for n, _ in sorted(found, key=lambda t: t[0]))
            raise LayerPluginError(
                f"several layer plugins claim {cls.__module__}.{cls.__qualname__}: {names}. "
                f"Register yours under the same name with overwrite=True to replace a "
                f"built-in, or curvlib.registry.unregister('layer', name) the one you do "
                f"not want"
            )
        return _instance(found[0][1])
    return _instance(_entries["layer"]["generic"].obj)


def registered_layer_types() -> dict[str, tuple[type[nn.Module], ...]]:
    """Registered layer-plugin names and the module classes each claims."""
    load_plugins()
    return {
        name: tuple(getattr(reg.obj, "module_types", ()))
        for name, reg in sorted(_entries["layer"].items())
    }
