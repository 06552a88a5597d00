r"""``coefficient_sharing``: compute a coefficient-producing structure's coefficients once,
reuse them across epochs (FNGD, Section IV-B).

``smw`` writes each block's direction as ``Σ_m c_m g_m`` with coefficients ``c`` from the
block's per-sample Gram. FNGD's observation is that these coefficients change little from
one epoch to the next, so they are computed during a refresh period (by default the first
epoch), stored per block and per **key**, and reused. A shared step then costs one forward,
one backward pass to the layer outputs and, after it, the layers' weighted weight gradients
``(c⊙Z)ᵀX`` from the recorded ``X`` and ``Z`` — the cost of an SGD step.

Keys (``key=``):

* ``"position"`` (default, as the paper): the batch's position in the epoch,
  ``t mod steps_per_epoch`` (``steps_per_epoch`` given at construction), or an explicit
  ``opt.backward(outputs, targets, key=k)``. With reshuffling, position ``k`` holds
  different samples every epoch; the paper reports that this still works. With gradient
  accumulation, micro-batch ``j > 0`` of the step at position ``k`` has the key
  ``"k/j"`` (its own coefficients); an explicit key may not repeat within a step.
* ``"sample"``: one coefficient per sample id, ``opt.backward(outputs, targets,
  sample_ids=ids)``: ``ids`` is a 1-D integer tensor (any integer dtype but ``uint64``; any
  ``int64`` value, negative ones included, e.g. dataset indices or hashes), one distinct id
  per sample — a batch that repeats an id, or float ids, are refused with
  :class:`~curvlib.errors.InputError`. A coefficient computed in a batch of ``M_m`` samples
  is used as ``c_m · M_m/N`` in a batch of ``N``, so the total weight of a batch stays that
  of the batches the coefficients came from. The table grows with the number of distinct
  ids seen, not with their values (layout in :meth:`CoefficientSharing.commit`).

Refresh (``refresh_every=``): ``None`` (default) computes each key's coefficients on its first
use only; ``K`` recomputes them on every ``K``-th use of the key (every ``K`` epochs with
position keys; with sample keys, a batch is recomputed when any of its samples is due).

A batch whose size differs from the stored coefficients' (the last, smaller batch of an
epoch under an explicit key, or a changed batch size) follows ``size_mismatch=``:
``"recompute"`` (default: compute and store fresh coefficients, a refresh step),
``"uniform"`` (every sample gets the stored total ``Σ c`` divided by ``N``, keeping the
block's step length; the direction is then the block's plain mean gradient times
``M·mean(c)``), or ``"error"``. It applies to position keys; sample keys rescale as above.

One vector for the whole model: wrap ``SMW(blocks="model")``; a shared step then needs no
layer records at all: the covered parameters' gradient is that of ``Σ_m c_m ℓ_m``, one
ordinary backward pass.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.errors import InputError
from curvlib.registry import register
from curvlib.structures.base import BatchContext, Plan, Structure, as_structure

__all__ = ["CoefficientSharing"]


@register("structure", "coefficient_sharing")
class CoefficientSharing(Structure):
    """Store a structure's per-block coefficients per key and reuse them (module docstring).

    Args:
        inner: a coefficient-producing batch structure (name, class or object; default
            ``"smw"``); it must have ``partition``, ``coefficients`` and ``apply`` as
            :class:`~curvlib.structures.smw.SMW` does.
        steps_per_epoch: batches per epoch, for position keys without an explicit ``key=``.
        key: ``"position"`` or ``"sample"``.
        refresh_every: ``None`` (compute once per key) or ``K`` (recompute every ``K``-th use).
        size_mismatch: ``"recompute"``, ``"uniform"`` or ``"error"`` (position keys).
        inner_options: options for ``inner`` when it is given by name or class (e.g.
            ``blocks="model"``, ``scale="natural"``).
    """

    name = "coefficient_sharing"
    preconditions = "batch"

    def __init__(self, inner: Any = "smw", *, steps_per_epoch: int | None = None,
                 key: Literal["position", "sample"] = "position",
                 refresh_every: int | None = None,
                 size_mismatch: Literal["recompute", "uniform", "error"] = "recompute",
                 **inner_options: Any):
        self.inner = as_structure(inner, **inner_options)
        for method in ("partition", "coefficients", "apply"):
            if not callable(getattr(self.inner, method, None)):
                raise TypeError(
                    f"coefficient_sharing wraps a structure that produces coefficients "
                    f"(with partition, coefficients and apply, like 'smw'); "
                    f"{self.inner!r} has no {method}()"
                )
        if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer, got "
                             f"{steps_per_epoch!r}")
        if key not in ("position", "sample"):
            raise ValueError(f"key must be 'position' or 'sample', got {key!r}")
        if refresh_every is not None and (int(refresh_every) != refresh_every
                                          or refresh_every < 1):
            raise ValueError(f"refresh_every must be None or a positive integer, got "
                             f"{refresh_every!r}")
        if size_mismatch not in ("recompute", "uniform", "error"):
            raise ValueError(f"size_mismatch must be 'recompute', 'uniform' or 'error', got "
                             f"{size_mismatch!r}")
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.key = key
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        self.size_mismatch = size_mismatch
        #: position key → (stored coefficients, params, their versions, cast copies); see
        #: _per_parameter
        self._cast: dict[Any, tuple[Any, Any, tuple[int, ...], dict[str, Tensor]]] = {}

    @classmethod
    def examples(cls) -> list[Structure]:
        """Per-layer coefficients keyed by position over two-batch epochs, and one vector
        for the whole model."""
        return [cls(steps_per_epoch=2), cls(steps_per_epoch=2, blocks="model")]

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """What the inner structure needs."""
        return self.inner.needs

    @property
    def default_damping(self) -> str:  # type: ignore[override]
        """The inner structure's default damping rule."""
        return self.inner.default_damping

    def covers(self, param: nn.Parameter, owner: nn.Module | None = None) -> bool:
        """As the inner structure."""
        return self.inner.covers(param, owner)

    def check_source(self, source: Any) -> None:
        """Shared coefficients weight the data's per-sample gradients: data targets only."""
        from curvlib.optim import CompatibilityError

        self.inner.check_source(source)
        if getattr(source, "targets", None) != "data":
            raise CompatibilityError(
                f"coefficient_sharing reuses coefficients over the data's per-sample "
                f"gradients, so its source must use the data's targets; {source!r} does not. "
                f"Use source='gram' (targets='data') or 'empirical', or structure='smw' "
                f"without sharing for sampled targets"
            )

    # -- keys ------------------------------------------------------------------------------------

    def _position(self, context: BatchContext) -> Any:
        if context.key is not None:
            key = context.key
            if isinstance(key, Tensor):
                key = key.item()
            return key
        if self.steps_per_epoch is None:
            raise ValueError(
                "coefficient_sharing keys each batch by its position in the epoch, but it "
                "does not know the epoch's length: pass steps_per_epoch=len(loader) (e.g. "
                "curvlib.FNGD(..., steps_per_epoch=len(loader))), or key=... to "
                "opt.backward, or use key='sample' with sample_ids"
            )
        position = context.step % self.steps_per_epoch
        # micro-batch k > 0 of an accumulated step has its own coefficients
        return position if context.micro == 0 else f"{position}/{context.micro}"

    def _ids(self, context: BatchContext, device: torch.device) -> Tensor:
        """The batch's sample ids as ``(N,)`` int64 on ``device`` (checked: no host sync)."""
        ids = context.sample_ids
        if ids is None:
            raise InputError(
                "coefficient_sharing(key='sample') needs the batch's sample ids: "
                "opt.backward(outputs, targets, sample_ids=ids) with ids a (N,) integer "
                "tensor, one distinct id per sample (e.g. the samples' dataset indices)"
            )
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise InputError(
                f"sample_ids must be a (N,) integer tensor of int64 values (dataset "
                f"indices), got {type(ids).__name__} that torch cannot convert: {error}"
            ) from error
        if ids.dtype not in _ID_DTYPES:
            raise InputError(
                f"sample_ids must be integers (int64, int32, int16, int8, uint8, ...; ids "
                f"are keys, compared exactly), got {ids.dtype}; pass the samples' dataset "
                f"indices, e.g. as torch.long"
            )
        if ids.dim() != 1 or ids.shape[0] != context.batch_size:
            raise InputError(
                f"sample_ids must have shape ({context.batch_size},), one id per sample of "
                f"the batch, got shape {tuple(ids.shape)}"
            )
        return ids.to(device=device, dtype=torch.long)

    def _due(self, uses: int) -> bool:
        return self.refresh_every is not None and uses % self.refresh_every == 0

    # -- plan, gradient, commit ----------------------------------------------------------------

    def plan(self, context: BatchContext) -> Plan:
        """A refresh (curvature needed) or a shared step with stored coefficients."""
        n = context.batch_size
        notes = context.notes
        if self.key == "position":
            key = self._position(context)
            entries = context.store.setdefault("positions", {})
            entry = entries.get(key)
            notes["key"] = key
            refresh = entry is None
            if entry is not None:
                refresh = self._due(int(entry["uses"]))
                if not refresh and int(entry["size"]) != n:
                    if self.size_mismatch == "error":
                        raise ValueError(
                            f"batch of {n} samples at key {key!r}, whose coefficients were "
                            f"computed for {int(entry['size'])}; pass size_mismatch="
                            f"'recompute' or 'uniform' to coefficient_sharing"
                        )
                    refresh = self.size_mismatch == "recompute"
            if not refresh:
                stored = entry["coefficients"]
                if int(entry["size"]) != n:  # uniform
                    stored = {b: c.sum().expand(n) / n for b, c in stored.items()}
                notes["coefficients"] = stored
        else:
            refresh = self._plan_samples(context, n)
        notes["refresh"] = refresh
        if refresh:
            return Plan(curvature=True)
        stored = notes["coefficients"]
        context.report["shared"] = 1
        if set(stored) == {"model"} and getattr(self.inner, "blocks", None) == "model":
            return Plan(curvature=False, loss_weights=stored["model"])
        blocks = self.inner.partition(context)
        if set(blocks) == set(stored):  # each layer's Σ c g from its X and Z after the pass
            return Plan(curvature=False, coefficients=self._per_parameter(
                context, notes.get("key"), stored, blocks))
        return Plan(curvature=False)

    def _plan_samples(self, context: BatchContext, n: int) -> bool:
        """Sample keys: look the batch's ids up; whether this is a refresh step.

        One host synchronisation: the counts below are read together. A refused batch leaves
        the stored coefficients as they were.
        """
        notes = context.notes
        table = context.store.get("samples")
        if table and "ids" not in table:  # saved in the earlier layout, indexed by the id
            table = _from_dense(table)
            context.store["samples"] = table
        known = table.get("ids") if table else None
        device = (known.device if known is not None
                  else next(iter(context.params.values())).device)
        ids = self._ids(context, device)
        ordered = ids.sort().values
        flags = [(ordered[1:] == ordered[:-1]).sum()]  # repeated ids
        found, slots = _lookup(table, ids)
        if found is None:
            flags.append(torch.tensor(n, device=device))
        else:
            flags.append((~found).sum())  # ids without coefficients
            if self.refresh_every is not None:
                flags.append((table["uses"][slots] % self.refresh_every == 0).sum())  # due
        counts = torch.stack(flags).tolist()
        if counts[0]:
            values, repeats = ordered.unique_consecutive(return_counts=True)
            twice = values[repeats > 1][:5].tolist()
            raise InputError(
                f"sample_ids must be distinct within a batch (one stored coefficient per "
                f"sample), but {counts[0]} id(s) repeat, e.g. {twice}; pass each sample "
                f"once per batch, with ids that identify samples (e.g. dataset indices)"
            )
        unknown = int(counts[1])
        refresh = unknown > 0 or (len(counts) > 2 and counts[2] > 0)
        if not refresh:
            scale = table["size"][slots].double() / n
            notes["coefficients"] = {
                b: c[slots.to(c.device)] * scale.to(c.device)
                for b, c in table["coefficients"].items()}
        notes["ids"] = ids
        notes["lookup"] = (known, found, slots, unknown)
        context.store.setdefault("samples", {} if table is None else table)
        return refresh

    def _per_parameter(self, context: BatchContext, key: Any, stored: dict[str, Tensor],
                       blocks: dict[str, list[str]]) -> dict[str, Tensor]:
        """Parameter name → its block's stored ``c`` in the parameter's working dtype
        (float32 or wider) and device.

        For position keys the cast copies are kept per key beside the store (never saved;
        a new store entry, e.g. after a refresh or ``load_state_dict``, replaces them), so a
        shared step converts nothing.
        """
        cached = self._cast.get(key) if key is not None else None
        versions = tuple(c._version for c in stored.values())  # in-place edits invalidate
        if (cached is not None and cached[0] is stored and cached[1] is context.params
                and cached[2] == versions):
            return cached[3]
        out: dict[str, Tensor] = {}
        for b, names in blocks.items():
            c = stored[b]
            for name in names:
                p = context.params[name]
                dtype = torch.promote_types(p.dtype, torch.float32)
                out[name] = c if c.dtype == dtype and c.device == p.device else c.to(
                    device=p.device, dtype=dtype)
            # parameters of one block share one vector (plugins then form them together)
            first = out[names[0]]
            for name in names[1:]:
                if out[name].dtype == first.dtype and out[name].device == first.device:
                    out[name] = first
        if key is not None and self.key == "position" and not isinstance(key, Tensor):
            self._cast[key] = (stored, context.params, versions, out)
        return out

    def gradient(self, context: BatchContext, data: Any, curvature: Any) -> dict[str, Tensor]:
        """Refresh: the inner structure's coefficients (kept for :meth:`commit`) and
        direction; shared: the direction for the stored coefficients."""
        notes = context.notes
        if notes["refresh"]:
            coefficients = self.inner.coefficients(context, curvature)
            notes["new"] = coefficients
            context.report["refreshed"] = 1
        else:
            coefficients = notes["coefficients"]
            context.report["shared"] = 1
        return self.inner.apply(context, data, coefficients)

    def commit(self, context: BatchContext) -> None:
        """Store fresh coefficients (not when a block was skipped) and count the use.

        Sample keys keep ``structure_state["samples"]``, with ``K`` distinct ids stored:

        * ``"ids"``: ``(K,)`` int64, the ids, sorted (looked up by ``torch.searchsorted``);
        * ``"slots"``: ``(K,)`` int64, the slot of each id in the arrays below;
        * ``"size"``, ``"uses"``: ``(capacity,)`` int64, per slot the size of the batch the
          coefficient came from and how often it has been used;
        * ``"coefficients"``: ``{block: (capacity,)}``, per slot the coefficient.

        New ids take the next free slots (``K, K+1, …``, in id order), so the arrays grow with
        the number of distinct ids, by doubling (amortised ``O(1)`` per id), whatever the ids'
        values; inserting ``u`` new ids merges them into ``"ids"`` and ``"slots"`` in
        ``O(K + u log K)``, and a lookup costs ``O(N log K)``. Everything stays on the device
        of ``"ids"`` (the parameters'). No host synchronisation here (the number of new ids
        was read with the plan's), unless an earlier micro-batch of the step stored ids
        since: then one. Micro-batches of one step may share ids; they commit in order, so
        the last one's coefficient is kept.
        """
        notes = context.notes
        n = context.batch_size
        new = notes.get("new")
        store_new = new is not None and not notes.get("skipped")
        if self.key == "position":
            entries = context.store["positions"]
            key = notes["key"]
            if store_new:
                entries[key] = {"coefficients": dict(new), "size": n, "uses": 1}
            elif key in entries:
                entries[key]["uses"] = int(entries[key]["uses"]) + 1
            return
        self._commit_samples(context.store["samples"], notes, n, new if store_new else None)

    @staticmethod
    def _commit_samples(table: dict[str, Any], notes: dict[str, Any], n: int,
                        new: dict[str, Tensor] | None) -> None:
        """Sample keys: store ``new`` coefficients for the batch's ids, or count a use of
        each (layout in :meth:`commit`)."""
        ids = notes["ids"]
        looked_in, found, slots, unknown = notes["lookup"]
        if table.get("ids") is not looked_in:
            # an earlier micro-batch of this step stored ids since this one's plan (slots
            # never move, but its ids may now be known): look up again, one host sync
            found, slots = _lookup(table, ids)
            unknown = ids.numel() if found is None else int((~found).sum())
        if new is None:
            if slots is not None:  # count a use of every id that has a coefficient
                table["uses"].index_add_(0, slots, found.long() if unknown else
                                         torch.ones_like(slots))
            return
        if unknown:
            fresh = ids if found is None else ids[
                torch.argsort(found.to(torch.int8), stable=True)[:unknown]]
            fresh = fresh.sort().values
            known = table.get("ids")
            if known is None:
                known = ids.new_empty(0)
                table["slots"] = ids.new_empty(0)
            k = known.numel()
            total = k + unknown
            merged = ids.new_empty(total)
            merged_slots = ids.new_empty(total)
            # merge: new id j lands after the ins[j] old ids below it and the j new ones;
            # old id i after the new ids whose ins ≤ i (ids are distinct: no ties)
            ins = torch.searchsorted(known, fresh)
            at_new = ins + torch.arange(unknown, device=ids.device)
            at_old = torch.arange(k, device=ids.device) + torch.bincount(
                ins, minlength=k + 1)[:k].cumsum(0)
            merged[at_old] = known
            merged[at_new] = fresh
            merged_slots[at_old] = table["slots"]
            merged_slots[at_new] = torch.arange(k, total, device=ids.device)
            table["ids"], table["slots"] = merged, merged_slots
            capacity = 0 if "size" not in table else table["size"].shape[0]
            if capacity < total:
                grow = max(total, 2 * capacity)
                table["size"] = _grown(table.get("size"), grow, torch.long, ids.device)
                table["uses"] = _grown(table.get("uses"), grow, torch.long, ids.device)
                coeffs = table.setdefault("coefficients", {})
                for b, c in new.items():
                    coeffs[b] = _grown(coeffs.get(b), grow, c.dtype, c.device)
            slots = merged_slots[torch.searchsorted(merged, ids)]
        for b, c in new.items():
            table["coefficients"][b][slots.to(c.device)] = c
        table["size"][slots] = n
        table["uses"][slots] = 1

    def __repr__(self) -> str:
        return (f"CoefficientSharing(inner={self.inner!r}, steps_per_epoch="
                f"{self.steps_per_epoch}, key={self.key!r}, refresh_every={self.refresh_every}, "
                f"size_mismatch={self.size_mismatch!r})")


#: The dtypes sample ids may have: integers that int64 holds exactly.
_ID_DTYPES = frozenset(
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
    + [getattr(torch, name) for name in ("uint16", "uint32") if hasattr(torch, name)])


def _lookup(table: dict[str, Any] | None, ids: Tensor
            ) -> tuple[Tensor | None, Tensor | None]:
    """Whether each id has a coefficient in ``table``, and its slot (meaningful where it
    has); ``(None, None)`` for a table without ids."""
    known = table.get("ids") if table else None
    if known is None or known.numel() == 0:
        return None, None
    pos = torch.searchsorted(known, ids).clamp_max_(known.numel() - 1)
    return known[pos] == ids, table["slots"][pos]


def _from_dense(table: dict[str, Any]) -> dict[str, Any]:
    """A sample table of the earlier layout (arrays indexed by the id itself, a ``size`` of
    0 meaning no coefficient) in the current one, on the coefficients' device."""
    size, coefficients = table.get("size"), table.get("coefficients", {})
    if size is None:
        return {}
    device = next(iter(coefficients.values())).device if coefficients else size.device
    ids = (size > 0).nonzero().squeeze(1).to(device)
    return {"ids": ids, "slots": torch.arange(ids.numel(), device=device),
            "size": size.to(device)[ids], "uses": table["uses"].to(device)[ids],
            "coefficients": {b: c[ids.to(c.device)] for b, c in coefficients.items()}}


def _grown(old: Tensor | None, length: int, dtype: torch.dtype,
           device: torch.device | None = None) -> Tensor:
    """``old`` zero-padded to ``length`` entries (a new zero tensor if ``old`` is None)."""
    out = torch.zeros(length, dtype=dtype, device=device if old is None else old.device)
    if old is not None:
        out[:old.shape[0]] = old
    return out
