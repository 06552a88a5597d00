r"""The exact dense block (kind ``structure``, name ``dense``): for small models.

Each *block* is a set of parameter tensors ``θ_b`` (rows and columns: each tensor flattened
row-major, concatenated in the block's order). The structure keeps the whole ``n_b × n_b``
matrix of the block, with no structural approximation:

* ``statistics="per_sample"`` (default): ``S_b = (1/R) Σ_r g_{r,b} g_{r,b}ᵀ`` over the
  ``R = S·N`` per-sample gradient rows of the source (``g_r = ∂ℓ_n/∂θ_b`` at one draw's
  targets, not divided by ``N``). With sampled targets (``TrueFisher(per_sample=True)``) this
  is the Monte-Carlo Fisher block, with the data's targets (``empirical``, ``gram``) the
  empirical Fisher block — the matrices of :func:`curvlib.testing.oracles.mc_fisher` and
  :func:`~curvlib.testing.oracles.empirical_fisher` restricted to the block.
* ``statistics="batch"``: ``S_b = (1/S) Σ_s ḡ_{s,b} ḡ_{s,b}ᵀ`` from each draw's gradient of
  the mean loss ``ḡ_s = (1/N) Σ_n g_{n,s}`` — the batch-gradient outer product TNT's
  statistics are built on. Its scale is about ``F_b / N``: for sampled targets
  ``E[ḡ ḡᵀ] = (1/N²) Σ_n E[g_n g_nᵀ] = F_b / N`` because each ``g_n`` has mean zero under
  the model's own distribution. The damping means something ``N`` times larger here.

The running statistic is an exponential moving average ``F_b ← ema·F_b + (1 − ema)·S_b``
(the first update sets ``F_b = S_b``; a warm start keeps the arithmetic mean). A refresh
computes ``(F_b + λI)^{-1}`` with the solver (``λ`` from the damping rule, added to the whole
block; blocks of equal size are inverted in one batched call), and the direction for the
momenta ``m_b`` of a block is ``(F_b + λI)^{-1} vec(m_b)``. With the optimizer's EMA of the
gradient (its momentum) this is the "block Fisher" method the TNT paper compares every method
with in its Figure 1 (per layer, decay 0.9).

Blocks (``blocks``):

* ``"layer"`` (default): the trainable parameters a module owns directly — a Linear or conv
  layer's weight *and* bias with their cross terms, the block of TNT's Figure 1 (and of
  KFAC). A module is recognised from the parameter's qualified name (``"0.weight"`` belongs
  to module ``"0"``); parameters of the root module (names without a dot) are blocks of their
  own. A block never spans param groups: a layer whose tensors sit in different groups gets
  one block per group.
* ``"tensor"``: every tensor its own block.

Every trainable tensor is covered, scalars included (a ``1 × 1`` block). A block holds
``n_b²`` numbers and its refresh costs ``O(n_b³)``, so blocks larger than ``max_size``
(default 4096) are refused with an error naming the block: at construction for a single
tensor over the limit, at the first statistics step for a layer block.

State. Block ``b`` with members ``θ_1, …, θ_m`` (sizes ``n_j``, offsets ``o_j``) stores its
matrices split by rows across its members: ``state[θ_j]`` holds rows ``o_j … o_j + n_j − 1``
of ``F_b`` (``dense_F``, ``n_j × n_b``) and of the inverse (``dense_inv``), with its offset
(``dense_offset``) and the update count (``dense_updates``). Nothing is stored twice, every
entry is a tensor (so ``state_dict`` round-trips bit for bit), and any subset of a block's
members can be preconditioned — a member without a gradient contributes a zero vector.
Matrices are float32 or wider (float64 for float64 parameters), on the parameters' device.
Before the first statistics the direction is the vector itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.registry import register
from curvlib.solvers import Solver, robust_inverse
from curvlib.structures.base import Structure, fold

__all__ = ["Dense"]

Item = tuple[str, nn.Parameter, dict[str, Any]]


@register("structure", "dense")
class Dense(Structure):
    """The exact (damped) Fisher block per layer or per tensor (see the module docstring).

    Args:
        blocks: ``"layer"`` (a module's parameters together) or ``"tensor"``.
        statistics: ``"per_sample"`` (the MC or empirical Fisher from per-sample gradients;
            needs a source that provides ``per_sample_grads``) or ``"batch"`` (the
            batch-gradient outer product, scale ``≈ F/N``; needs ``batch_grads``).
        max_size: the largest block (entries) accepted.
    """

    name = "dense"
    needs = frozenset({"per_sample_grads"})

    def __init__(self, blocks: Literal["layer", "tensor"] = "layer",
                 statistics: Literal["per_sample", "batch"] = "per_sample",
                 max_size: int = 4096):
        if blocks not in ("layer", "tensor"):
            raise ValueError(f"blocks must be 'layer' or 'tensor', got {blocks!r}")
        if statistics not in ("per_sample", "batch"):
            raise ValueError(f"statistics must be 'per_sample' or 'batch', got {statistics!r}")
        if isinstance(max_size, bool) or int(max_size) != max_size or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        self.blocks = blocks
        self.statistics = statistics
        self.max_size = int(max_size)
        self.needs = frozenset({"per_sample_grads" if statistics == "per_sample"
                                else "batch_grads"})

    @classmethod
    def examples(cls) -> list[Structure]:
        """Layer blocks from per-sample rows, tensor blocks, and the batch outer product."""
        return [cls(), cls(blocks="tensor"), cls(statistics="batch")]

    # -- blocks -----------------------------------------------------------------------------

    def block_key(self, name: str) -> tuple[str, str]:
        """The block a parameter of qualified name ``name`` belongs to (within a group)."""
        module, dot, _ = name.rpartition(".")
        if self.blocks == "layer" and dot:
            return ("layer", module)
        return ("tensor", name)

    def _group(self, items: list[Item]) -> dict[tuple[str, str], list[int]]:
        """Block key → indices into ``items``, in order of first appearance."""
        out: dict[tuple[str, str], list[int]] = {}
        for i, (name, _, _) in enumerate(items):
            out.setdefault(self.block_key(name), []).append(i)
        return out

    def _too_large(self, what: str, size: int, tensors: int) -> ValueError:
        return ValueError(
            f"dense block {what} has {size} entries, more than max_size={self.max_size}: its "
            f"matrix would hold {size}² numbers and each refresh would invert a {size} × "
            f"{size} matrix. Use a structure that factorises large blocks (tensor_normal, "
            f"kfac, shampoo, diagonal)"
            + (", Dense(blocks='tensor') (one block per tensor)" if tensors > 1 else "")
            + f", or Dense(max_size={size}) if that fits in memory")

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """Every tensor that requires gradients (scalars too); a tensor alone larger than
        ``max_size`` raises the size error (the optimizer asks this when it is built).
        Frozen tensors are left out, so they never join (and stall) a layer's block."""
        if not param.requires_grad:
            return False
        if param.numel() > self.max_size:
            where = f" (in {type(owner).__name__})" if owner is not None else ""
            raise self._too_large(f"of a parameter of shape {tuple(param.shape)}{where}",
                                  param.numel(), 1)
        return True

    # -- statistics -------------------------------------------------------------------------

    def init_state(self, param: nn.Parameter) -> dict[str, Any]:
        """The update count; the block matrices are allocated at the first statistics step
        (only then are a block's members known)."""
        return {"dense_updates": torch.zeros((), dtype=torch.float64)}

    @staticmethod
    def _dtype(members: list[Item]) -> torch.dtype:
        dtype = torch.float32
        for _, p, _ in members:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _layout(self, items: list[Item]) -> list[tuple[list[Item], list[int], int]]:
        """Per block: its members, their offsets and its size — checked against ``max_size``
        and against the layout stored by earlier updates."""
        out = []
        for indices in self._group(items).values():
            members = [items[i] for i in indices]
            sizes = [p.numel() for _, p, _ in members]
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            size = sum(sizes)
            names = tuple(name for name, _, _ in members)
            if size > self.max_size:
                raise self._too_large(str(names), size, len(names))
            for (name, _, state), n, o in zip(members, sizes, offsets, strict=True):
                stored = state.get("dense_F")
                if stored is not None and (tuple(stored.shape) != (n, size)
                                           or int(state["dense_offset"]) != o):
                    raise ValueError(
                        f"the dense state of {name!r} was built for another block layout "
                        f"(rows of shape {tuple(stored.shape)} at offset "
                        f"{int(state['dense_offset'])}, now {(n, size)} at {o} in block "
                        f"{names}); load state only into an optimizer with the same "
                        f"parameters, param groups and Dense(blocks=...) option")
            out.append((members, offsets, size))
        return out

    def update(self, items, stats, *, ema: float, average: bool = False) -> None:
        """Fold one batch's block statistics into ``F_b`` (see the module docstring).

        ``average=True`` keeps a running arithmetic mean (the warm start); otherwise the
        first update sets ``F_b = S_b`` and later ones form ``ema·F_b + (1 − ema)·S_b``. A
        block whose statistic is not finite is left unchanged (``dense_skipped`` counts it);
        a block with a member the statistics do not include is left alone.
        """
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        layout = self._layout(items)
        grads = (stats.per_sample_grads() if self.statistics == "per_sample"
                 else stats.batch_grads())
        blocks, news = [], []
        for members, offsets, size in layout:
            if any(name not in grads for name, _, _ in members):
                continue
            dtype = self._dtype(members)
            g = torch.cat([grads[name].reshape(grads[name].shape[0], -1).to(dtype)
                           for name, _, _ in members], dim=1)
            blocks.append((members, offsets, size))
            news.append(g.T @ g / g.shape[0])
        if not news:
            return
        # |S_ab| ≤ √(S_aa S_bb): a finite trace means a finite statistic (one sync in all)
        finite = torch.stack([s.diagonal().sum().to(torch.float64) for s in news]
                             ).isfinite().tolist()
        for (members, offsets, _), s, ok in zip(blocks, news, finite, strict=True):
            if not ok:
                for _, _, state in members:
                    state["dense_skipped"] = state.get(
                        "dense_skipped", torch.zeros((), dtype=torch.float64)) + 1
                continue
            for (_, p, state), o in zip(members, offsets, strict=True):
                rows = s[o:o + p.numel()].to(device=p.device)
                count = state["dense_updates"]
                f = state.get("dense_F")
                if f is None or count == 0:
                    state["dense_F"] = rows.clone()
                    state["dense_offset"] = torch.tensor(o, dtype=torch.int64)
                else:
                    fold(f, rows, count, ema=ema, average=average)
                state["dense_updates"] = count + 1

    # -- inverses ---------------------------------------------------------------------------

    def _full_blocks(self, items: list[Item]) -> list[tuple[list[Item], list[int], int]]:
        """Blocks with statistics, members sorted by their stored offsets."""
        out = []
        for indices in self._group(items).values():
            members = [items[i] for i in indices]
            if any(state.get("dense_F") is None or state["dense_updates"] == 0
                   for _, _, state in members):
                continue
            members.sort(key=lambda m: int(m[2]["dense_offset"]))
            offsets = [int(state["dense_offset"]) for _, _, state in members]
            size = int(members[0][2]["dense_F"].shape[1])
            if sum(p.numel() for _, p, _ in members) != size:
                names = tuple(name for name, _, _ in members)
                raise ValueError(f"dense block {names} is incomplete: its state spans {size} "
                                 f"entries; pass every member of the block")
            out.append((members, offsets, size))
        return out

    def refresh(self, items, *, solver: Solver, damping: Callable[[Tensor], Tensor]
                ) -> dict[str, int]:
        """``(F_b + λI)^{-1}`` for every block with statistics; equal sizes in one call."""
        groups: dict[tuple[int, torch.dtype, torch.device], list[list[Item]]] = {}
        for members, _, size in self._full_blocks(items):
            f = members[0][2]["dense_F"]
            groups.setdefault((size, f.dtype, f.device), []).append(members)
        report = {"factors": 0, "recovered": 0, "kept": 0}
        for (size, dtype, device), blocks in groups.items():
            mats = torch.stack([torch.cat([st["dense_F"] for _, _, st in members])
                                for members in blocks])

            def previous(blocks=blocks, size=size, dtype=dtype, device=device) -> Tensor:
                eye = torch.eye(size, dtype=dtype, device=device)
                return torch.stack([
                    torch.cat([st["dense_inv"] for _, _, st in members])
                    if all("dense_inv" in st for _, _, st in members) else eye
                    for members in blocks])

            result = robust_inverse(solver, mats, damping(mats), 1.0, previous)
            for j, members in enumerate(blocks):
                for _, p, st in members:
                    o = int(st["dense_offset"])
                    rows = result.inverse[j][o:o + p.numel()]
                    if "dense_inv" in st:
                        st["dense_inv"].copy_(rows)
                    else:
                        st["dense_inv"] = rows.clone()
            report["factors"] += len(blocks)
            report["recovered"] += int(result.recovered.sum())
            report["kept"] += int(result.kept.sum())
        return report

    # -- directions -------------------------------------------------------------------------

    def directions(self, items, vectors) -> list[Tensor]:
        """Per block, ``(F_b + λI)^{-1}`` applied to the concatenated flattened vectors
        (members absent from ``items`` count as zero); the vector itself before the first
        refresh."""
        out: list[Tensor] = list(vectors)
        for indices in self._group(items).values():
            states = [items[i][2] for i in indices]
            if any("dense_inv" not in st for st in states):
                continue  # no inverse yet: the identity
            inv0 = states[0]["dense_inv"]
            size, dtype = inv0.shape[1], inv0.dtype
            placed = sorted(indices, key=lambda i: int(items[i][2]["dense_offset"]))
            sizes = [items[i][1].numel() for i in placed]
            flat = [vectors[i].reshape(-1).to(dtype) for i in placed]
            if sum(sizes) == size:  # the whole block: no zeros to place
                full = torch.cat(flat)
            else:
                full = torch.zeros(size, dtype=dtype, device=inv0.device)
                for i, v in zip(placed, flat, strict=True):
                    o = int(items[i][2]["dense_offset"])
                    full[o:o + v.numel()] = v
            for i in indices:
                d = items[i][2]["dense_inv"] @ full
                out[i] = d.reshape(vectors[i].shape).to(vectors[i].dtype)
        return out

    def direction(self, param: nn.Parameter, state: dict[str, Any], vector: Tensor) -> Tensor:
        """The direction of one block member alone (the other members' vectors taken as
        zero); the optimizer uses :meth:`directions`, which sees whole blocks."""
        return self.directions([("", param, state)], [vector])[0]

    # -- diagnostics ------------------------------------------------------------------------

    def curvature_blocks(self, items) -> dict[tuple[str, ...], Tensor]:
        """The running (undamped) ``F_b`` of every block with statistics, float64; key: the
        members' names in row order."""
        out: dict[tuple[str, ...], Tensor] = {}
        for members, _, _ in self._full_blocks(items):
            key = tuple(name for name, _, _ in members)
            out[key] = torch.cat([st["dense_F"] for _, _, st in members]).to(torch.float64)
        return out

    def __repr__(self) -> str:
        return (f"Dense(blocks={self.blocks!r}, statistics={self.statistics!r}, "
                f"max_size={self.max_size})")
