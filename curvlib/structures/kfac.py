r"""Kronecker-factored approximate curvature, layer by layer (kind ``structure``, name ``kfac``).

KFAC (Martens & Grosse, 2015; convolutions: Grosse & Martens, 2016) approximates the curvature
block of one layer — its weight and bias together — by a Kronecker product of two small
matrices, computed by the layer's plugin (:meth:`curvlib.layers.LayerPlugin.kfac_factors`)
from the recorded inputs ``x`` and output gradients ``z``. For a layer
``y_t = W x_t + b`` at positions ``t`` (a sequence, or a convolution's output pixels with
``x_t`` the input patch), with ``x̄ = [x, 1]`` (the bias folded in as the last input
coordinate) and ``z_t = ∂ℓ_n/∂y_t`` the output gradient of one per-sample loss (one row ``r``
of the ``R = S·N`` rows of ``S`` target draws):

* ``mode="expand"`` (every position is a sample of the factors; KFC for convolutions,
  KFAC-expand for sequences): ``A = (1/(R·T)) Σ_{r,t} x̄ x̄ᵀ``, ``B = (1/R) Σ_{r,t} z zᵀ``;
* ``mode="reduce"`` (positions are pooled first): ``A = (1/R) Σ_r x̂_r x̂_rᵀ`` with
  ``x̂_r = (1/T) Σ_t x̄_{r,t}``, and ``B = (1/R) Σ_r ẑ_r ẑ_rᵀ`` with ``ẑ_r = Σ_t z_{r,t}``

(:func:`curvlib.layers._patch.kfac`). With one position (``T = 1``, every ``Linear`` layer on
``(N, D)`` inputs) the two coincide. The layer's curvature is ``⊕_g B_g ⊗ A_g`` over the
groups ``g`` of a grouped convolution (one group otherwise) with the row-major convention
``vec(z x̄ᵀ) = z ⊗ x̄``: rows of ``[W_g | b_g]`` index ``B_g``, columns ``A_g``.

Both factors are kept as exponential moving averages, ``A ← ema·A + (1 − ema)·A_batch`` (the
first update sets ``A = A_batch``; a warm start keeps the arithmetic mean). With the damping
rule's value ``λ`` (the param group's ``damping`` for the constant rule) the damped factors are

    A + π√λ I,    B + (√λ/π) I,

with ``π = 1`` (default), or, with ``pi_damping=True``, Martens & Grosse's factored Tikhonov
damping ``π = √((tr A / dim A) / (tr B / dim B))`` per group (``π = 1`` if either trace is
zero). The direction for the momentum ``M = [M_W | m_b]`` of one group (a convolution's
weight seen as ``(O/G, (I/G)·∏kernel)``) is

    P = (B + (√λ/π) I)⁻¹ M (A + π√λ I)⁻¹,   i.e.   vec(P) = (B_d ⊗ A_d)⁻¹ vec(M),

two small matrix products per group, never the Kronecker product. The first columns of ``P``
are the weight's direction, the last (with a trainable bias) the bias's.

Which parameters it covers: the ``weight`` and ``bias`` of modules whose layer plugin
implements ``kfac_factors`` (``Linear``, ``Conv1d/2d/3d``, registered plugins that provide
them). Everything else — normalisation layers, embeddings, modules served by the generic
plugin — falls back to SGD with momentum (the optimizer's documented fallback). A layer's
weight and bias must be in the same param group; a frozen one (``requires_grad=False``) is
simply left out of the factors.

State: per layer, in the optimizer state of its first covered parameter (the weight; the
bias when only the bias is trainable) — ``kfac_A (G, D', D')``, ``kfac_B (G, O/G, O/G)``, their
damped inverses ``kfac_Ainv``, ``kfac_Binv``, and the count ``kfac_updates``; which parameter
holds it follows from the parameter names, so the state is tensors only and survives
``state_dict`` round trips. Factors are kept in float32 or wider whatever the parameter dtype;
factors of equal size across a param group are inverted in one batched solver call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.layers.base import LayerPlugin, plugin_for, trainable_parameters
from curvlib.registry import register
from curvlib.solvers import Solver, robust_inverse
from curvlib.structures.base import Structure, fold

__all__ = ["KFAC", "kfac_index"]

Mode = Literal["expand", "reduce"]
_KEYS = ("kfac_A", "kfac_B", "kfac_Ainv", "kfac_Binv")

Item = tuple[str, nn.Parameter, dict[str, Any]]


def kfac_index(out: int, per_row: int, groups: int, has_weight: bool, bias_folded: bool
               ) -> list[list[int]]:
    """For each group, the positions (in parameter order: the weight flattened row-major,
    then the bias) of the entries of ``vec([W_g | b_g])`` (row-major).

    ``out`` is the number of output rows ``O``, ``per_row`` the weight's entries per row
    ``D``. Row ``o`` of group ``g`` holds ``W[o, :]`` (if the weight is trainable) and
    ``b[o]`` (if the bias is folded).
    """
    n_weight = out * per_row if has_weight else 0
    per_group = out // groups
    index = []
    for g in range(groups):
        rows = []
        for o in range(g * per_group, (g + 1) * per_group):
            if has_weight:
                rows.extend(range(o * per_row, (o + 1) * per_row))
            if bias_folded:
                rows.append(n_weight + o)
        index.append(rows)
    return index


def _module_and_local(name: str) -> tuple[str, str]:
    module, _, local = name.rpartition(".")
    return module, local


def _layer_factors(stats: Any, modules: set[str], mode: str) -> dict[str, Any]:
    """``stats.kfac_factors(mode)`` for the named modules only (statistics of a model with
    modules whose plugin has no factors — LayerNorm, embeddings… — would raise for those)."""
    return stats.kfac_factors(mode, modules=modules)


@register("structure", "kfac")
class KFAC(Structure):
    """KFAC's per-layer Kronecker factors ``B ⊗ A`` (see the module docstring).

    Args:
        mode: ``"expand"`` (default) or ``"reduce"``: how positions that share a weight
            (a sequence through a ``Linear``, the pixels of a convolution) enter the factors.
            ``expand`` treats them as independent samples (KFC, KFAC-expand: right when
            positions behave like extra data); ``reduce`` averages inputs and sums output
            gradients over positions first (KFAC-reduce: cheaper factors, exact for one sample
            when the inputs do not vary over positions). Identical for one position.
        pi_damping: split the damping between the factors by
            ``π = √((tr A / dim A) / (tr B / dim B))`` (factored Tikhonov damping) instead
            of ``√λ`` each.
    """

    name = "kfac"
    needs = frozenset({"kfac_factors"})

    def __init__(self, mode: Mode = "expand", pi_damping: bool = False):
        if mode not in ("expand", "reduce"):
            raise ValueError(f"mode must be 'expand' or 'reduce', got {mode!r}")
        self.mode = mode
        self.pi_damping = bool(pi_damping)
        self._has_factors: dict[type, bool] = {}

    @classmethod
    def examples(cls) -> list[Structure]:
        """The default, π-damping, and the ``reduce`` mode."""
        return [cls(), cls(pi_damping=True), cls(mode="reduce")]

    # -- which parameters ------------------------------------------------------------------------

    def layer_has_factors(self, module: nn.Module) -> bool:
        """Whether ``module``'s layer plugin implements ``kfac_factors`` (the generic plugin
        and plugins that inherit :meth:`LayerPlugin.kfac_factors` do not). Resolved once per
        module class."""
        cls = type(module)
        if cls not in self._has_factors:
            plugin = plugin_for(module)
            self._has_factors[cls] = (type(plugin).kfac_factors
                                      is not LayerPlugin.kfac_factors)
        return self._has_factors[cls]

    #: one block per module: a weight tied across modules has no KFAC formula
    shares_across_modules = False

    def fallback_reason(self, param: nn.Parameter, owner: nn.Module | None = None) -> str:
        """Which rule of :meth:`covers` leaves ``param`` out."""
        if owner is None:
            return "no module owns it"
        local = next((k for k, q in trainable_parameters(owner).items() if q is param), None)
        if local not in ("weight", "bias"):
            return (f"KFAC has factors for a layer's weight and bias; this is "
                    f"{type(owner).__name__}.{local}")
        return (f"the layer plugin of {type(owner).__name__} has no Kronecker factors "
                f"(kfac_factors)")

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """The trainable ``weight`` and ``bias`` of a module whose plugin has Kronecker
        factors; everything else falls back to SGD with momentum."""
        if owner is None:
            return False
        local = next((k for k, q in trainable_parameters(owner).items() if q is param), None)
        return local in ("weight", "bias") and self.layer_has_factors(owner)

    def _layers(self, items: list[Item]) -> dict[str, dict[str, int]]:
        """Module name → {local name (``weight``/``bias``): index in ``items``}."""
        layers: dict[str, dict[str, int]] = {}
        for i, (name, _, _) in enumerate(items):
            module, local = _module_and_local(name)
            layers.setdefault(module, {})[local] = i
        return layers

    @staticmethod
    def _holder(members: dict[str, int]) -> int:
        """The index of the parameter whose state holds the layer's factors."""
        return members["weight"] if "weight" in members else members["bias"]

    # -- vector-structure protocol ----------------------------------------------------------------

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """Nothing yet: a layer's factors are created in its holder's state at the first
        update (their sizes come from the layer plugin)."""
        return {}

    def update(self, items: list[Item], stats: Any, *, ema: float, average: bool = False
               ) -> None:
        """Fold one batch's factors into the running ones (see the module docstring).

        ``average=True`` keeps the arithmetic mean (the warm start); otherwise an EMA with
        weight ``ema`` on the past, except that the first update sets the factors. A layer
        whose factors are not finite is left unchanged.

        Raises:
            ValueError: a param group holds only part of a layer's trainable parameters
                (checked before any state changes).
        """
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        layers = self._layers(items)
        factors = _layer_factors(stats, set(layers), self.mode)
        work = []
        for module, members in layers.items():
            f = factors.get(module)
            if f is None:
                continue  # the module was not called in this forward pass
            expected = ({"weight"} if f.has_weight else set()) | \
                       ({"bias"} if f.bias_folded else set())
            if set(members) != expected:
                raise ValueError(
                    f"kfac preconditions a layer's weight and bias together, but this param "
                    f"group holds only {sorted(members)} of layer {module!r}, whose trainable "
                    f"parameters are {sorted(expected)}: put them in one param group, or "
                    f"freeze the one you do not optimize (requires_grad_(False))")
            work.append((members, f))
        if not work:
            return
        traces = torch.stack([torch.stack([f.input_cov.diagonal(dim1=1, dim2=2).sum(),
                                           f.grad_cov.diagonal(dim1=1, dim2=2).sum()])
                              .to(torch.float64) for _, f in work])
        finite = torch.isfinite(traces).all(1).tolist()  # one sync for every layer
        for (members, f), ok in zip(work, finite, strict=True):
            _, param, state = items[self._holder(members)]
            if not ok:
                state["kfac_skipped"] = state.get("kfac_skipped", torch.zeros(())) + 1
                continue
            dtype = torch.promote_types(f.input_cov.dtype,
                                        torch.promote_types(param.dtype, torch.float32))
            a_new = f.input_cov.to(device=param.device, dtype=dtype)
            b_new = f.grad_cov.to(device=param.device, dtype=dtype)
            a = state.get("kfac_A")
            b = state.get("kfac_B")
            if (a is None or b is None or a.shape != a_new.shape or b.shape != b_new.shape
                    or a.dtype != dtype):
                # first sight, or the layer's trainable parameters changed: start afresh
                state["kfac_A"] = a_new.clone()
                state["kfac_B"] = b_new.clone()
                state["kfac_Ainv"] = _eye_like(a_new)
                state["kfac_Binv"] = _eye_like(b_new)
                state["kfac_updates"] = torch.ones((), dtype=torch.float64)
                continue
            count = state["kfac_updates"]
            for h, s in ((a, a_new), (b, b_new)):
                fold(h, s, count, ema=ema, average=average)
            state["kfac_updates"] = count + 1

    def _pis(self, a: Tensor, b: Tensor) -> Tensor:
        """``π`` per group (float64), 1 without ``pi_damping``."""
        g = a.shape[0]
        if not self.pi_damping:
            return torch.ones(g, dtype=torch.float64, device=a.device)
        ta = a.diagonal(dim1=1, dim2=2).sum(-1).to(torch.float64) / a.shape[-1]
        tb = b.diagonal(dim1=1, dim2=2).sum(-1).to(torch.float64) / b.shape[-1]
        good = (ta > 0) & (tb > 0)
        return torch.where(good, (ta / torch.where(good, tb, 1.0)).sqrt(), 1.0)

    def refresh(self, items: list[Item], *, solver: Solver,
                damping: Callable[[Tensor], Tensor]) -> dict[str, int]:
        """Damp every factor (``A + π√λ I``, ``B + (√λ/π) I``) and invert equal sizes in one
        batched call; ``λ`` is the damping rule's value for each factor."""
        groups: dict[tuple[int, torch.dtype, torch.device],
                     list[tuple[dict, str, int, Tensor, Tensor]]] = {}
        for members in self._layers(items).values():
            state = items[self._holder(members)][2]
            if "kfac_A" not in state:
                continue  # no statistics yet: keep the identity
            a, b = state["kfac_A"], state["kfac_B"]
            pi = self._pis(a, b)
            for key, mats, scale in (("A", a, pi), ("B", b, 1.0 / pi)):
                for g in range(mats.shape[0]):
                    groups.setdefault((mats.shape[-1], mats.dtype, mats.device), []).append(
                        (state, key, g, mats[g], scale[g]))
        report = {"factors": 0, "recovered": 0, "kept": 0}
        for entries in groups.values():
            mats = torch.stack([m for _, _, _, m, _ in entries])
            lam = damping(mats).to(device=mats.device, dtype=torch.float64)
            shift = lam.clamp_min(0).sqrt() * torch.stack([s for *_, s in entries])

            def previous(entries=entries) -> Tensor:
                return torch.stack([st[f"kfac_{k}inv"][g] for st, k, g, _, _ in entries])

            result = robust_inverse(solver, mats, shift, 1.0, previous)
            for j, (st, key, g, _, _) in enumerate(entries):
                st[f"kfac_{key}inv"][g].copy_(result.inverse[j])
            report["factors"] += len(entries)
            report["recovered"] += int(result.recovered.sum())
            report["kept"] += int(result.kept.sum())
        return report

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """One parameter on its own: use :meth:`directions` (a layer's block spans its
        weight and bias)."""
        raise TypeError("kfac maps a layer's weight and bias together: call directions()")

    def directions(self, items: list[Item], vectors: list[Tensor]) -> list[Tensor]:
        """``B⁻¹ [M_W | m_b] A⁻¹`` per layer and group (see the module docstring).

        Before a layer has statistics its direction is the momentum itself. A covered
        parameter missing from ``items`` (no gradient this step) counts as a zero vector;
        if the one missing holds the layer's factors, the others move along their momentum.
        """
        out = list(vectors)
        for members in self._layers(items).values():
            holder = self._holder(members)
            _, param, state = items[holder]
            ainv, binv = state.get("kfac_Ainv"), state.get("kfac_Binv")
            if ainv is None or binv is None:
                continue
            has_weight = "weight" in members
            out_rows = param.shape[0]
            per_row = param.numel() // out_rows if has_weight else 0
            width = ainv.shape[-1]
            bias_folded = width == per_row + 1
            if width not in ((per_row, per_row + 1) if has_weight else (1,)):
                raise RuntimeError(
                    f"kfac state of {items[holder][0]!r} does not match its shape "
                    f"{tuple(param.shape)}; was the state loaded from another model?")
            groups, dtype = ainv.shape[0], ainv.dtype
            per_group = out_rows // groups
            parts = []
            if has_weight:
                v = vectors[members["weight"]]
                parts.append(v.to(dtype).reshape(groups, per_group, per_row))
            if bias_folded:
                if "bias" in members:
                    v = vectors[members["bias"]]
                    parts.append(v.to(dtype).reshape(groups, per_group, 1))
                else:
                    parts.append(ainv.new_zeros(groups, per_group, 1))
            m = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            p = binv @ m @ ainv.mT
            if has_weight:
                i = members["weight"]
                out[i] = p[..., :per_row].reshape(vectors[i].shape).to(vectors[i].dtype)
            if "bias" in members:
                i = members["bias"]
                out[i] = p[..., -1].reshape(vectors[i].shape).to(vectors[i].dtype)
        return out

    def curvature_blocks(self, items: list[Item]) -> dict[tuple[str, ...], Tensor]:
        """Per layer, key ``(weight name, bias name)`` (the covered ones, in parameter
        order): the dense ``⊕_g B_g ⊗ A_g`` of the running (undamped) factors in float64,
        zero before any statistics."""
        blocks = {}
        for members in self._layers(items).values():
            order = [members[k] for k in ("weight", "bias") if k in members]
            key = tuple(items[i][0] for i in order)
            total = sum(items[i][1].numel() for i in order)
            _, param, state = items[self._holder(members)]
            a, b = state.get("kfac_A"), state.get("kfac_B")
            dense = torch.zeros(total, total, dtype=torch.float64, device=param.device)
            if a is not None and b is not None:
                has_weight = "weight" in members
                per_row = param.numel() // param.shape[0] if has_weight else 0
                index = kfac_index(param.shape[0], per_row, a.shape[0], has_weight,
                                   a.shape[-1] == per_row + 1)
                for g, rows in enumerate(index):
                    idx = torch.tensor(rows, device=dense.device)
                    dense[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(
                        b[g].to(torch.float64), a[g].to(torch.float64))
            blocks[key] = dense
        return blocks

    def __repr__(self) -> str:
        return f"KFAC(mode={self.mode!r}, pi_damping={self.pi_damping})"


def _eye_like(mats: Tensor) -> Tensor:
    """Identity matrices of the shape, dtype and device of ``mats (G, d, d)``."""
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    return eye.expand_as(mats).clone()

