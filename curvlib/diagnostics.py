r"""How close an optimizer's curvature and directions are to the exact block Fisher.

Two measures, for any optimizer :func:`curvlib.assemble` builds, on models small enough for
the dense oracles of :mod:`curvlib.testing.oracles` (all float64):

**Direction cosines — the TNT paper's Figure 1.** Partition the parameters into blocks ``b``
(by default one per layer: the tensors a module owns, a Linear layer's weight *and* bias with
their cross terms). The *block-Fisher direction* for vectors ``v`` is, per block,

    d_b = (F_b + λI)^{-1} v_b,

with ``F_b`` the diagonal block of the exact Fisher ``F = (1/N) Σ_n J_nᵀ Λ(f_n) J_n`` on a
batch (or of the empirical Fisher ``(1/N) Σ_n g_n g_nᵀ`` when the data's targets are given)
and ``v_b`` the block's entries of ``v`` (flattened row-major, concatenated). The optimizer's
own direction for the same ``v`` is what its structure maps ``v`` to
(:func:`preview`: ``opt.structure.directions`` with the current state, nothing changed), and
the diagnostic is the cosine ``⟨d, d_opt⟩ / (‖d‖ ‖d_opt‖)`` per layer, per tensor or over
the model (:func:`direction_cosines`). The paper runs the block-Fisher method itself with
moving averages (decay 0.9) of the gradient and of the blocks, and measures every other
method on the points it visits, with ``v`` each method's own averaged gradient; with curvlib,
``structure="dense"`` and ``ema=0.9`` is that block-Fisher method, and the momentum buffers
``m ← μm + g`` are (up to one scale shared by all layers, which cosines ignore) the moving
average of the gradient: pass them as ``vectors``.

**Block errors.** For the undamped curvature a structure holds,
:meth:`~curvlib.structures.Structure.curvature_blocks` (``C``, dense per block), the
relative Frobenius error to the exact block is

    e_b = ‖C_b − F_b‖_F / ‖F_b‖_F

(:func:`block_errors`). The structure's blocks need not be the reference's: TNT has one block
per tensor, the block Fisher one per layer. Blocks are therefore compared on unions: the
structure's blocks and the reference blocks (restricted to parameters the structure has
blocks for) are merged wherever they share a parameter, and on each union ``U`` the
structure's matrix ``C_U`` (its blocks on the diagonal, zero between them) is compared with
the reference ``F_U`` (the exact blocks on the diagonal, zero between them). So TNT's weight
and bias blocks are measured together against the layer's block, cross terms included; a
structure whose blocks coincide with the reference's is measured block by block.

Scale. Structures built on batch-gradient outer products (``tensor_normal``, ``shampoo``,
``dense`` with ``statistics="batch"``) hold ``≈ F/N`` (``E[ḡḡᵀ] = F/N`` for sampled targets,
``N`` the batch size of their statistics); :func:`block_errors` takes ``scale`` (multiply
``C`` by ``N`` for those) or ``scale="fit"`` (the least-squares ``α`` per union, ``α =
⟨C, F⟩ / ‖C‖²``, so only the shape is measured).

Statistics are folded into a structure by ``opt.step()``, which then moves the parameters;
the exact block is taken at the current parameters. To measure the approximation alone, take
a step with ``lr=0`` (or compare on slowly moving training), and remember that sampled sources
(``true_fisher``) carry Monte-Carlo error.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.likelihoods import as_likelihood
from curvlib.testing import oracles

__all__ = [
    "block_errors",
    "block_fisher",
    "cosine_similarities",
    "damped_direction",
    "direction_cosines",
    "preview",
]

F64 = torch.float64
Blocks = Literal["layer", "tensor", "model"]
Item = tuple[str, nn.Parameter, dict[str, Any]]


# -- blocks -----------------------------------------------------------------------------------


def _layer_of(name: str) -> str:
    """The module owning a parameter of qualified name ``name`` (a root-module parameter is
    its own layer)."""
    module, dot, _ = name.rpartition(".")
    return module if dot else name


def _block_key(name: str, by: str) -> str:
    if by == "layer":
        return _layer_of(name)
    if by == "tensor":
        return name
    if by == "model":
        return "model"
    raise ValueError(f"by/blocks must be 'layer', 'tensor' or 'model', got {by!r}")


def _partition(names: list[str], by: str) -> list[tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(_block_key(name, by), []).append(name)
    return [tuple(members) for members in out.values()]


def _exact(model: nn.Module, likelihood: Any, inputs: Tensor, targets: Tensor | None,
           max_params: int) -> tuple[Tensor, dict[str, slice], dict[str, torch.Size]]:
    """The dense exact (or empirical) Fisher of all trainable entries, with each parameter's
    row range and shape."""
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    total = sum(s.numel() for s in shapes.values())
    if total > max_params:
        raise ValueError(
            f"the model has {total} trainable entries, more than max_params={max_params}: the "
            f"dense Fisher holds {total}² float64 numbers and its oracle forms every "
            f"per-sample Jacobian. Use a smaller model (these diagnostics are for small ones) "
            f"or pass a larger max_params if it fits in memory")
    lik = as_likelihood(likelihood)
    with torch.enable_grad():
        if targets is None:
            f = oracles.exact_fisher(model, lik, inputs)
        else:
            f = oracles.empirical_fisher(model, lik, inputs, targets)
    rows, start = {}, 0
    for name, shape in shapes.items():
        rows[name] = slice(start, start + shape.numel())
        start += shape.numel()
    return f, rows, shapes


def _sub(f: Tensor, rows: dict[str, slice], names: tuple[str, ...]) -> Tensor:
    index = torch.cat([torch.arange(rows[n].start, rows[n].stop, device=f.device)
                       for n in names])
    return f[index][:, index]


def block_fisher(model: nn.Module, likelihood: Any, inputs: Tensor, *,
                 targets: Tensor | None = None, blocks: Blocks = "layer",
                 max_params: int = 4096) -> dict[tuple[str, ...], Tensor]:
    """Dense float64 diagonal blocks of the exact Fisher (or of the empirical Fisher).

    Args:
        model: a model that treats samples independently (see :mod:`curvlib.testing.oracles`).
        likelihood: a registered likelihood name or object.
        inputs: the batch ``(N, …)``.
        targets: ``None`` for the exact Fisher ``(1/N) Σ_n J_nᵀ Λ(f_n) J_n``; the data's
            targets for the empirical Fisher ``(1/N) Σ_n g_n g_nᵀ``.
        blocks: ``"layer"`` (the parameters each module owns; root-module parameters alone),
            ``"tensor"`` or ``"model"`` (one block).
        max_params: the largest number of trainable entries accepted (the whole ``P × P``
            matrix is formed).

    Returns:
        block (parameter names in model order) → its ``n_b × n_b`` matrix, rows and columns
        each parameter flattened row-major, concatenated.
    """
    f, rows, shapes = _exact(model, likelihood, inputs, targets, max_params)
    return {key: _sub(f, rows, key) for key in _partition(list(shapes), blocks)}


def damped_direction(blocks: dict[tuple[str, ...], Tensor], vectors: dict[str, Tensor],
                     damping: float) -> dict[str, Tensor]:
    """``(F_b + λI)^{-1} v_b`` per block, by a dense solve (float64).

    ``vectors`` must hold every parameter of every block (parameter-shaped tensors); the
    result has the same names and shapes.
    """
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    out: dict[str, Tensor] = {}
    for key, f in blocks.items():
        missing = [n for n in key if n not in vectors]
        if missing:
            raise ValueError(f"no vector for {missing} of block {key}; pass one per parameter "
                             f"of every block (zeros where there is none)")
        v = torch.cat([vectors[n].detach().reshape(-1).to(dtype=F64, device=f.device)
                       for n in key])
        if v.numel() != f.shape[0]:
            raise ValueError(f"block {key} is {tuple(f.shape)} but its vectors have "
                             f"{v.numel()} entries")
        d, start = oracles.natural_gradient(f.to(F64), v, damping), 0
        for n in key:
            size = vectors[n].numel()
            out[n] = d[start:start + size].reshape(vectors[n].shape)
            start += size
    return out


# -- cosines ----------------------------------------------------------------------------------


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def cosine_similarities(a: dict[str, Tensor], b: dict[str, Tensor], *,
                        model: nn.Module | None = None, by: Blocks = "layer"
                        ) -> dict[str, float]:
    """Cosines ``⟨a_g, b_g⟩ / (‖a_g‖ ‖b_g‖)`` of two directions per group of parameters.

    ``a`` and ``b`` map parameter names to tensors; the parameters both hold are grouped
    ``by`` layer (the tensors of one module concatenated, keyed by the module's name; a
    root-module parameter by its own name), by tensor (keyed by name) or over the whole
    ``"model"``. In float64; two zero vectors have cosine 1, one zero vector 0. ``model``
    (optional) orders the groups as its parameters and checks the names.
    """
    names = [n for n in a if n in b]
    if model is not None:
        order = [n for n, _ in model.named_parameters()]
        unknown = [n for n in names if n not in order]
        if unknown:
            raise ValueError(f"{unknown} are not parameters of the model")
        names = [n for n in order if n in a and n in b]
    if not names:
        raise ValueError("the two directions have no parameter in common")
    out: dict[str, float] = {}
    for key in _partition(names, by):
        for n in key:
            if a[n].shape != b[n].shape:
                raise ValueError(f"{n}: shapes {tuple(a[n].shape)} and {tuple(b[n].shape)} "
                                 f"differ")
        x = torch.cat([a[n].detach().reshape(-1).to(F64) for n in key])
        y = torch.cat([b[n].detach().reshape(-1).to(dtype=F64, device=x.device) for n in key])
        out[_block_key(key[0], by)] = _cosine(x, y)
    return out


# -- the optimizer's side ---------------------------------------------------------------------


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """The first module (``named_modules`` order) owning each parameter, as the optimizer
    decides it."""
    out: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            out.setdefault(id(p), module)
    return out


def _items(opt: Any) -> list[list[Item]]:
    """Per param group, the ``(name, param, state)`` items of the covered parameters — with
    copies of their state (a fresh ``init_state`` where the optimizer has none yet), so
    nothing the structure does here reaches the optimizer."""
    names = {id(p): n for n, p in opt.model.named_parameters()}
    owners = _owners(opt.model)
    out = []
    for group in opt.param_groups:
        items = []
        for p in group["params"]:
            if not opt.structure.covers(p, owners.get(id(p))):
                continue
            state = opt.state.get(p)
            if state is None or "structure" not in state:
                state = opt.structure.init_state(p)
            else:
                state = _copy_state(state)
            items.append((names[id(p)], p, state))
        out.append(items)
    return out


def _vector_structure(opt: Any, what: str) -> None:
    if getattr(opt.structure, "preconditions", "vector") == "batch":
        raise TypeError(
            f"{what} needs a structure that maps vectors to directions; {opt.structure!r} "
            f"preconditions each batch's gradient inside opt.backward (the direction it "
            f"gives is in .grad after opt.backward(outputs, targets))")


def preview(opt: Any, vectors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The directions ``opt`` would give ``vectors`` now, changing nothing.

    Args:
        opt: an assembled optimizer (:func:`curvlib.assemble`) with a vector structure.
        vectors: parameter name → parameter-shaped vector (default: every optimized
            parameter's current ``.grad``, where there is one).

    Returns:
        name → direction for every name in ``vectors``: the structure's direction for a
        covered parameter (with the inverses it holds now; the vector itself before any),
        the vector itself for the others (the optimizer's fallback). Momentum, weight decay
        and the learning rate are not applied.

    Raises:
        TypeError: for batch structures (``smw``, ``coefficient_sharing``).
    """
    _vector_structure(opt, "preview")
    params = {n: p for n, p in opt.model.named_parameters()}
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    if vectors is None:
        vectors = {n: p.grad for n, p in params.items()
                   if id(p) in optimized and p.grad is not None}
    for name, v in vectors.items():
        if name not in params or id(params[name]) not in optimized:
            raise ValueError(f"{name!r} is not a parameter this optimizer optimizes")
        if v.shape != params[name].shape:
            raise ValueError(f"{name!r}: vector of shape {tuple(v.shape)} for a parameter of "
                             f"shape {tuple(params[name].shape)}")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for items in _items(opt):
            chosen = [item for item in items if item[0] in vectors]
            if not chosen:
                continue
            given = [vectors[name].detach() for name, _, _ in chosen]
            found = opt.structure.directions(chosen, given)
            for (name, _, _), v, d in zip(chosen, given, found, strict=True):
                out[name] = d.clone() if d is v else d.detach()
        for name, v in vectors.items():
            if name not in out:
                out[name] = v.detach().clone()
    order = list(params)
    return {n: out[n] for n in sorted(out, key=order.index)}


def direction_cosines(opt: Any, inputs: Tensor, *, damping: float,
                      targets: Tensor | None = None, vectors: dict[str, Tensor] | None = None,
                      by: Blocks = "layer", max_params: int = 4096) -> dict[str, float]:
    """Cosines of ``opt``'s directions to the layer-block Fisher directions (TNT, Figure 1).

    For the same ``vectors`` ``v`` (default each parameter's ``.grad``), the optimizer's
    direction :func:`preview` and the block-Fisher direction ``(F_b + λI)^{-1} v_b`` with
    ``F_b`` the layer blocks of the exact Fisher on ``inputs`` (of the empirical Fisher if
    ``targets`` are given) and ``λ = damping``; compared ``by`` layer, tensor or model
    (:func:`cosine_similarities`). Parameters without a vector count as zero in the
    block-Fisher direction and are left out of the cosines.
    """
    d = preview(opt, vectors)
    blocks = block_fisher(opt.model, opt.likelihood, inputs, targets=targets, blocks="layer",
                          max_params=max_params)
    params = dict(opt.model.named_parameters())
    v = vectors if vectors is not None else {n: p.grad for n, p in params.items()
                                             if p.grad is not None}
    full = {n: v[n] if n in v else torch.zeros_like(params[n])
            for key in blocks for n in key}
    reference = damped_direction(blocks, full, damping)
    return cosine_similarities(d, {n: reference[n] for n in d if n in reference},
                               model=opt.model, by=by)


def block_errors(opt: Any, inputs: Tensor, *, targets: Tensor | None = None,
                 blocks: Blocks = "layer", scale: float | Literal["fit"] = 1.0,
                 max_params: int = 4096) -> dict[tuple[str, ...], float]:
    """Relative Frobenius errors ``‖α C_U − F_U‖_F / ‖F_U‖_F`` of ``opt``'s curvature.

    ``C`` is ``opt.structure.curvature_blocks`` (undamped, float64, for the blocks that have
    statistics); ``F`` the exact Fisher on ``inputs`` (the empirical Fisher if ``targets``
    are given) cut into ``blocks`` (``"layer"``, ``"tensor"`` or ``"model"``). Structure
    blocks and reference blocks are compared on their unions ``U`` (see the module
    docstring); ``α`` is ``scale`` (``N`` for structures built on batch-gradient outer
    products), or with ``"fit"`` the least-squares ``⟨C_U, F_U⟩ / ‖C_U‖²`` per union.
    Parameters the structure has no block for are left out. An all-zero ``F_U`` gives the
    absolute error ``‖α C_U‖_F``.

    Returns:
        union (parameter names in model order) → error.
    """
    _vector_structure(opt, "block_errors")
    if isinstance(scale, str) and scale != "fit":
        raise ValueError(f"scale must be a number or 'fit', got {scale!r}")
    structure_blocks: dict[tuple[str, ...], Tensor] = {}
    for items in _items(opt):
        if items:
            structure_blocks.update(opt.structure.curvature_blocks(items))
    f, rows, shapes = _exact(opt.model, opt.likelihood, inputs, targets, max_params)
    order = list(shapes)
    owner: dict[str, tuple[str, ...]] = {}
    for key in structure_blocks:
        for n in key:
            if n not in rows:
                raise ValueError(f"block {key}: {n!r} is not a trainable model parameter")
            if n in owner:
                raise ValueError(f"{n!r} is in two structure blocks, {owner[n]} and {key}")
            owner[n] = key
    # union–find over the parameters the structure has blocks for
    parent = {n: n for n in owner}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def join(group: tuple[str, ...]) -> None:
        for n in group[1:]:
            parent[find(n)] = find(group[0])

    for key in structure_blocks:
        join(key)
    reference = [tuple(n for n in key if n in owner) for key in _partition(order, blocks)]
    reference = [key for key in reference if key]
    for key in reference:
        join(key)
    unions: dict[str, list[str]] = {}
    for n in order:
        if n in owner:
            unions.setdefault(find(n), []).append(n)
    out: dict[tuple[str, ...], float] = {}
    for members in unions.values():
        u = tuple(members)
        pos, start = {}, 0
        for n in u:
            pos[n] = torch.arange(start, start + shapes[n].numel())
            start += shapes[n].numel()
        c_u = torch.zeros(start, start, dtype=F64, device=f.device)
        f_u = torch.zeros(start, start, dtype=F64, device=f.device)
        for key, c in structure_blocks.items():
            if key[0] in pos:
                index = torch.cat([pos[n] for n in key]).to(f.device)
                c_u[index.unsqueeze(1), index] = c.to(dtype=F64, device=f.device)
        for key in reference:
            if key[0] in pos:
                index = torch.cat([pos[n] for n in key]).to(f.device)
                f_u[index.unsqueeze(1), index] = _sub(f, rows, key)
        if scale == "fit":
            norm = torch.linalg.matrix_norm(c_u) ** 2
            alpha = (c_u * f_u).sum() / norm if norm > 0 else torch.ones((), dtype=F64)
        else:
            alpha = torch.as_tensor(float(scale), dtype=F64)
        diff = torch.linalg.matrix_norm(alpha * c_u - f_u)
        ref = torch.linalg.matrix_norm(f_u)
        out[u] = float(diff / ref) if ref > 0 else float(diff)
    return out
