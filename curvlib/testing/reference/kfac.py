r"""Reference of ``kfac``: the Kronecker factors from their definitions, inverted densely.

For every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` whose weight or bias is optimized, from the
recorded inputs ``X`` and per-draw output gradients ``Z = ∂(Σ_n ℓ_n)/∂output``
(:meth:`ReferenceStatistics.layer_records`): a convolution's input is unfolded into patches by
an explicit loop over the kernel offsets (zero or ``padding_mode`` padding, stride, dilation,
groups), a ``Linear``'s extra input dimensions are positions. With ``x̄ = [x, 1]`` (bias
folded, only if the bias is optimized; only ``[1]`` if the weight is frozen), ``R = S·N`` rows
(draw-major; the inputs repeat per draw) and ``T`` positions (all calls of the module
concatenated):

* expand: ``A = (1/(R·T)) Σ_{r,t} x̄ x̄ᵀ``, ``B = (1/R) Σ_{r,t} z zᵀ``;
* reduce: ``A = (1/R) Σ_r x̂_r x̂_rᵀ`` with ``x̂_r = mean_t x̄``, ``B = (1/R) Σ_r ẑ_r ẑ_rᵀ`` with
  ``ẑ_r = Σ_t z``;

per group of a grouped convolution. EMA as every structure (first sets), damping
``A + π√λ_A I``, ``B + (√λ_B/π) I`` (``λ_A``, ``λ_B`` the damping rule's values for the
undamped ``A`` and ``B``: the hyperparameter, or ``α‖A‖_F`` and ``α‖B‖_F``) with
``π = √((tr A/dim A)/(tr B/dim B))`` under ``pi_damping`` (1 otherwise, or if a trace is 0),
inverses by :func:`torch.linalg.inv`, and the direction ``(⊕_g B_g⁻¹ ⊗ A_g⁻¹) [vec W, b]``
built densely with :func:`torch.kron` in parameter order.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from curvlib.testing.reference import (
    ReferenceStatistics,
    ReferenceStructure,
    ema_update,
    register_reference,
)

F64 = torch.float64
# Layers whose factors this reference restates. Plugin layers with their own kfac_factors
# (e.g. the Bilinear example plugin) need their own reference entry.
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``(N, T, G, (C/G)·∏kernel)``: every output position's input patch, per group, by a
    loop over the kernel offsets (the order of the weight's ``(C/G, *kernel)`` entries)."""
    k = len(module.kernel_size)
    if x.dim() == k + 1:  # an unbatched call
        x = x.unsqueeze(0)
    if isinstance(module.padding, str):
        pads = []
        for size, dil in zip(module.kernel_size, module.dilation, strict=True):
            total = 0 if module.padding == "valid" else dil * (size - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad: last dimension first
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = nn.functional.pad(x, flat, mode=mode)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    out = [(spatial[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
           // module.stride[i] + 1 for i in range(k)]
    slices = []
    for offset in itertools.product(*(range(s) for s in module.kernel_size)):
        index = (slice(None), slice(None), *(
            slice(offset[i] * module.dilation[i],
                  offset[i] * module.dilation[i] + module.stride[i] * (out[i] - 1) + 1,
                  module.stride[i]) for i in range(k)))
        slices.append(x[index])  # (N, C, *out)
    patches = torch.stack(slices, dim=2)  # (N, C, K, *out)
    t = math.prod(out)
    g = module.groups
    patches = patches.reshape(n, g, (c // g) * len(slices), t)  # channel-major, then kernel
    return patches.permute(0, 3, 1, 2)


def conv_output_grads(module: nn.modules.conv._ConvNd, z: Tensor) -> Tensor:
    """``(N, T, G, O/G)`` from output gradients ``(N, O, *out)``."""
    if z.dim() == len(module.kernel_size) + 1:
        z = z.unsqueeze(0)
    n, o = z.shape[:2]
    return z.reshape(n, module.groups, o // module.groups, -1).permute(0, 3, 1, 2)


def layer_inputs(module: nn.Module, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``X (N, T, G, D)`` and ``Z (N, T, G, O/G)`` of one call, from the definitions."""
    if isinstance(module, nn.Linear):
        n = x.shape[0]
        return (x.reshape(n, -1, 1, x.shape[-1]).to(F64),
                z.reshape(n, -1, 1, z.shape[-1]).to(F64))
    return conv_patches(module, x.to(F64)), conv_output_grads(module, z.to(F64))


def factors(module: nn.Module, records: list[tuple[Tensor, list[Tensor]]], *,
            has_weight: bool, fold_bias: bool, mode: str) -> tuple[Tensor, Tensor]:
    """``(A (G, D', D'), B (G, O/G, O/G))`` from the calls of ``module``, by the definitions
    (see the module docstring)."""
    xs, zs = [], []
    for x, per_draw in records:
        pairs = [layer_inputs(module, x, z) for z in per_draw]
        xs.append(torch.cat([p[0] for p in pairs]))  # rows: draw-major
        zs.append(torch.cat([p[1] for p in pairs]))
    x, z = torch.cat(xs, dim=1), torch.cat(zs, dim=1)  # positions of every call
    parts = ([x] if has_weight else []) + ([torch.ones_like(x[..., :1])] if fold_bias else [])
    xb = torch.cat(parts, dim=-1)
    rows, positions, groups = xb.shape[:3]
    a_list, b_list = [], []
    for g in range(groups):
        if mode == "expand":
            a = sum(torch.outer(xb[r, t, g], xb[r, t, g])
                    for r in range(rows) for t in range(positions)) / (rows * positions)
            b = sum(torch.outer(z[r, t, g], z[r, t, g])
                    for r in range(rows) for t in range(positions)) / rows
        elif mode == "reduce":
            a = sum(torch.outer(xb[r, :, g].mean(0), xb[r, :, g].mean(0))
                    for r in range(rows)) / rows
            b = sum(torch.outer(z[r, :, g].sum(0), z[r, :, g].sum(0)) for r in range(rows)) / rows
        else:
            raise ValueError(f"unknown KFAC mode {mode!r}")
        a_list.append(a)
        b_list.append(b)
    return torch.stack(a_list), torch.stack(b_list)


def parameter_order_index(out: int, per_row: int, groups: int, has_weight: bool,
                          fold_bias: bool) -> list[list[int]]:
    """Per group, the positions in ``[vec W, b]`` (parameter order) of ``vec([W_g | b_g])``
    (row-major)."""
    n_weight = out * per_row if has_weight else 0
    per_group = out // groups
    index = []
    for g in range(groups):
        rows = []
        for o in range(g * per_group, (g + 1) * per_group):
            if has_weight:
                rows += list(range(o * per_row, (o + 1) * per_row))
            if fold_bias:
                rows.append(n_weight + o)
        index.append(rows)
    return index


@register_reference("kfac")
class ReferenceKFAC(ReferenceStructure):
    """Dense KFAC per layer (see the module docstring)."""

    def __init__(self, structure, model, names):
        super().__init__(structure, model, names)
        self.mode = getattr(structure, "mode", "expand")
        self.pi_damping = bool(getattr(structure, "pi_damping", False))
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        self.inverse: dict[str, Tensor] = {}  # module name → dense (P_layer, P_layer)

    def covers(self, name, param, owner):
        local = name.rpartition(".")[2]
        return isinstance(owner, _LAYERS) and local in ("weight", "bias")

    def layers(self) -> dict[str, list[str]]:
        """Module name → its covered parameter names (weight first)."""
        params = dict(self.model.named_parameters())
        out: dict[str, list[str]] = {}
        for name in self.names:
            owner = self.owners[name]
            if self.covers(name, params[name], self.modules[owner]):
                out.setdefault(owner, []).append(name)
        return out

    @staticmethod
    def _parts(names: list[str]) -> tuple[bool, bool]:
        """Whether the layer's weight, and its bias, are covered."""
        locals_ = {n.rpartition(".")[2] for n in names}
        return "weight" in locals_, "bias" in locals_

    def update(self, stats: ReferenceStatistics, ema: float) -> None:
        for module, names in self.layers().items():
            records = stats.layer_records(module)
            if not records:
                continue
            has_weight, fold_bias = self._parts(names)
            a, b = factors(self.modules[module], records, has_weight=has_weight,
                           fold_bias=fold_bias, mode=self.mode)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                continue
            self.a[module] = ema_update(self.a.get(module), a, ema)
            self.b[module] = ema_update(self.b.get(module), b, ema)

    def together(self) -> list[tuple[str, ...]]:
        """A layer's weight and bias: one block."""
        return [tuple(names) for names in self.layers().values() if len(names) > 1]

    def _damping(self, matrix: Tensor, value: float) -> float:
        return float(self.damp(value, matrix))

    def refresh(self, damping: float) -> None:
        for module, names in self.layers().items():
            if module not in self.a:
                continue
            has_weight, fold_bias = self._parts(names)
            a, b = self.a[module], self.b[module]
            weight = self.modules[module].weight
            out = weight.shape[0]
            per_row = weight[0].numel() if has_weight else 0
            total = sum(self.shapes[n].numel() for n in names)
            dense = torch.zeros(total, total, dtype=F64)
            for g, rows in enumerate(parameter_order_index(out, per_row, a.shape[0],
                                                           has_weight, fold_bias)):
                pi = 1.0
                ta, tb = torch.trace(a[g]) / a.shape[-1], torch.trace(b[g]) / b.shape[-1]
                if self.pi_damping and ta > 0 and tb > 0:
                    pi = math.sqrt(ta / tb)
                sa = math.sqrt(self._damping(a[g], damping)) * pi
                sb = math.sqrt(self._damping(b[g], damping)) / pi
                a_inv = torch.linalg.inv(a[g] + sa * torch.eye(a.shape[-1], dtype=F64))
                b_inv = torch.linalg.inv(b[g] + sb * torch.eye(b.shape[-1], dtype=F64))
                idx = torch.tensor(rows)
                dense[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(b_inv, a_inv)
            self.inverse[module] = dense

    def curvature(self) -> dict[tuple[str, ...], Tensor]:
        """Per layer (key: its covered parameter names), the dense undamped ``⊕_g B_g ⊗ A_g``
        in parameter order."""
        out = {}
        for module, names in self.layers().items():
            has_weight, fold_bias = self._parts(names)
            total = sum(self.shapes[n].numel() for n in names)
            dense = torch.zeros(total, total, dtype=F64)
            if module in self.a:
                a, b = self.a[module], self.b[module]
                weight = self.modules[module].weight
                per_row = weight[0].numel() if has_weight else 0
                for g, rows in enumerate(parameter_order_index(weight.shape[0], per_row,
                                                               a.shape[0], has_weight,
                                                               fold_bias)):
                    idx = torch.tensor(rows)
                    dense[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(b[g], a[g])
            out[tuple(names)] = dense
        return out

    def direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for module, names in self.layers().items():
            if not any(n in vectors for n in names):
                continue
            if module not in self.inverse:
                out.update({n: vectors[n].clone() for n in names if n in vectors})
                continue
            # a covered parameter without a vector counts as zero
            flat = torch.cat([vectors[n].to(F64).reshape(-1) if n in vectors
                              else torch.zeros(self.shapes[n].numel(), dtype=F64)
                              for n in names])
            d = self.inverse[module] @ flat
            start = 0
            for n in names:
                size = self.shapes[n].numel()
                if n in vectors:
                    out[n] = d[start:start + size].reshape(self.shapes[n])
                start += size
        return out
