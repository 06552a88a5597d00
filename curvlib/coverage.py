r"""Which parameter gets which treatment, and a check that layer records see every use of it.

Two things live here, both about *coverage* — what an optimizer preconditions and whether it
can do so exactly:

* :class:`Coverage`, one row per optimized parameter (its structure, solver and damping rule,
  or the fallback — SGD with momentum — and why), as :meth:`CurvatureOptimizer.coverage
  <curvlib.optim.CurvatureOptimizer.coverage>` returns them, and :func:`format_coverage`;
* :func:`unseen_uses`, the structural half of the optimizer's audit: per-sample statistics
  come from the inputs ``X`` and output gradients ``Z`` that :class:`~curvlib.capture.Capture`
  records for the modules that *own* a parameter, so a use of the parameter anywhere else —
  a registered layer whose ``forward`` is never called (``nn.MultiheadAttention`` reads
  ``out_proj.weight`` through ``F.multi_head_attention_forward``), ``F.linear(x, lin.weight)``,
  ``h @ emb.weight.T`` — contributes to the gradient but to no record. :func:`unseen_uses`
  finds such uses exactly, from the autograd graph, not from numbers: every autograd node
  that consumes the parameter must lie inside the part of the graph that one of its owners'
  recorded calls built (from the call's output back to the nodes that produced its inputs).

The optimizer runs the audit on its first statistics step and again whenever the set of
recorded calls changes (:mod:`curvlib.optim`); together with a numeric check (the records'
``Σ_n g_n`` against autograd's gradient, for parameters without tensor hooks) a parameter
whose records are incomplete is refused with :class:`~curvlib.errors.CoverageError` before
any state changes.

Imports: torch and :mod:`curvlib.errors` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["Coverage", "format_coverage", "owners_of", "unseen_uses"]


@dataclass(frozen=True)
class Coverage:
    """How one optimized parameter is treated.

    Attributes:
        name: the parameter's name in the model (the first, for tied parameters).
        shape: its shape.
        group: the index of its param group.
        preconditioned: ``True`` if the structure preconditions it; ``False`` if it gets the
            fallback (SGD with momentum, the group's learning rate and decoupled weight decay)
            or is frozen.
        structure: the structure's ``repr`` (empty for the fallback).
        solver: the solver's ``repr`` (empty where no solver is used).
        damping: the damping rule's ``repr`` and the group's ``damping`` value.
        reason: why it is not preconditioned (``None`` when it is).
        aliases: other names of the same tensor (tied weights), in model order.
    """

    name: str
    shape: tuple[int, ...]
    group: int
    preconditioned: bool
    structure: str
    solver: str
    damping: str
    reason: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def treatment(self) -> str:
        """One line: the structure, or ``fallback (SGD with momentum): <reason>``."""
        if self.preconditioned:
            return f"{self.structure}, solver {self.solver or '-'}, damping {self.damping}"
        return f"fallback (SGD with momentum): {self.reason}"


def format_coverage(rows: Sequence[Coverage], *, only_fallbacks: bool = False) -> str:
    """A plain-text table of ``rows`` (parameter, shape, group, treatment).

    ``only_fallbacks`` keeps the rows that are not preconditioned (what ``curvlib compare``
    prints when anything falls back).
    """
    chosen = [r for r in rows if not (only_fallbacks and r.preconditioned)]
    if not chosen:
        return ""
    cells = [("parameter", "shape", "group", "treatment")]
    for r in chosen:
        name = r.name if not r.aliases else f"{r.name} (= {', '.join(r.aliases)})"
        cells.append((name, "×".join(map(str, r.shape)) or "scalar", str(r.group),
                      r.treatment))
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = []
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
                     + "  " + row[3])
    return "\n".join(lines)


def owners_of(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter)`` → every ``(module name, module)`` that holds it in its own
    ``_parameters``, in ``named_modules`` order (a tied weight has several; a module
    registered under two names counts once)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, module))
    return owners


def _consumers(roots: Iterable[Any], watched: set[int]) -> dict[int, list[Any]]:
    """Every node of the graph below ``roots`` that takes a watched leaf as an input, by the
    leaf's ``id``."""
    found: dict[int, list[Any]] = {i: [] for i in watched}
    seen: set[int] = set()
    keep: list[Any] = []  # nodes stay alive (and their ids unique) during the walk
    stack = [r for r in roots if r is not None]
    for r in stack:
        seen.add(id(r))
        keep.append(r)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf
            if var is not None:
                if id(var) in found:
                    found[id(var)].append(node)
                continue
            if id(nxt) not in seen:
                seen.add(id(nxt))
                keep.append(nxt)
                stack.append(nxt)
    return found


def _inside(call: Any) -> set[int]:
    """The nodes one recorded call built: from its output's node back to (not into) the
    nodes that produced its tensor inputs."""
    edge = getattr(call, "_node", None)
    if edge is None:
        return set()
    stops = {id(n) for n in getattr(call, "_input_nodes", ())}
    start = edge.node
    inside = {id(start)}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None or id(nxt) in stops or id(nxt) in inside:
                continue
            if getattr(nxt, "variable", None) is not None:
                continue
            inside.add(id(nxt))
            stack.append(nxt)
    return inside


def unseen_uses(roots: Iterable[Any], params: dict[str, Tensor],
                calls: dict[str, list[Any]]) -> dict[str, list[str]]:
    """The parameters that the graph below ``roots`` uses outside their recorded calls.

    Args:
        roots: autograd nodes (``tensor.grad_fn``) of the graph to search, e.g. the model
            outputs'.
        params: name → parameter to check.
        calls: name → the recorded :class:`~curvlib.capture.Call` objects of every module
            that owns that parameter (their output's gradient edge and their inputs' nodes
            mark where each call's part of the graph begins and ends).

    Returns:
        name → the types of the autograd nodes (e.g. ``"MmBackward0"``) that use the
        parameter outside every recorded call of its owners, for the parameters that have
        such uses; empty when the records see every use. Exact: it reads the graph, so it
        does not depend on the values of any gradient.
    """
    by_id = {id(p): name for name, p in params.items()}
    consumers = _consumers(roots, set(by_id))
    out: dict[str, list[str]] = {}
    cache: dict[int, set[int]] = {}
    for pid, nodes in consumers.items():
        if not nodes:
            continue
        name = by_id[pid]
        inside: set[int] = set()
        for call in calls.get(name, ()):
            if id(call) not in cache:
                cache[id(call)] = _inside(call)
            inside |= cache[id(call)]
        outside = [type(n).__name__ for n in nodes if id(n) not in inside]
        if outside:
            out[name] = outside
    return out
