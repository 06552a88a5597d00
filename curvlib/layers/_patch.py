r"""Shared engine of the Linear and convolution plugins: layers that are sums over positions.

Both layer families compute, per sample ``n``, group ``g`` and position ``t``,
``y[n, t, g] = W_g x[n, t, g] (+ b_g)``: for ``Linear`` the positions are the extra input
dimensions (a sequence) and there is one group; for a convolution the positions are the
output pixels and ``x[n, t, g]`` is the input patch of group ``g`` at pixel ``t`` (FNGD,
eq. 13). With ``X`` of shape ``(N, T, G, D)`` and ``Z`` of shape ``(N, T, G, O)``:

* per-sample gradient: ``g_n[g] = Σ_t z[n,t,g] x[n,t,g]ᵀ``;
* Gram by contraction: ``(UᵀU)_{mn} = Σ_g Σ_{t,s} (z[m,t,g]·z[n,s,g]) (x[m,t,g]·x[n,s,g])``,
  which for ``T = 1`` is FNGD eq. (12), ``(ZZᵀ) ∗ (XXᵀ)``;
* Gram by materialisation: the per-sample gradients, then their inner products.

:func:`gram_costs` counts the multiply-adds of both; the plugins take the cheaper one unless
told otherwise (``gram_method``), and avoid a contraction whose ``(NT)²G`` intermediate would
exceed :data:`MAX_INTERMEDIATE` elements when materialisation fits.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import opt_einsum as oe
import torch
from torch import Tensor

__all__ = [
    "MAX_INTERMEDIATE",
    "GramMethod",
    "choose_gram_method",
    "contract",
    "gram_costs",
    "pick_gram_method",
]

GramMethod = Literal["auto", "contract", "materialise"]

#: Largest intermediate (elements) the contraction may build before materialisation wins.
MAX_INTERMEDIATE = 2**27


@lru_cache(maxsize=512)
def expression(equation: str, *shapes: tuple[int, ...]):
    """An opt_einsum contraction planned once per equation and operand shapes."""
    return oe.contract_expression(equation, *shapes, optimize="optimal")


def contract(equation: str, *operands: Tensor) -> Tensor:
    """Evaluate ``equation`` with a cached opt_einsum plan (torch backend)."""
    return expression(equation, *(tuple(o.shape) for o in operands))(*operands, backend="torch")


def gram_costs(n: int, t: int, g: int, d: int, o: int) -> dict[str, int]:
    """Multiply-adds of the two ways to the weight Gram (``N, T, G, D, O`` as above)."""
    contract_cost = (n * t) ** 2 * g * (d + o + 1)
    materialise_cost = n * t * g * d * o + n * n * g * d * o
    return {"contract": contract_cost, "materialise": materialise_cost}


def pick_gram_method(method: str, costs: dict[str, int], memory: dict[str, int]) -> str:
    """The Gram method to use: ``method`` if forced, else the cheaper of ``costs``.

    ``costs`` and ``memory`` give, for ``"contract"`` and ``"materialise"``, the multiply-adds
    and the largest intermediate (elements); ``auto`` avoids a method whose intermediate
    exceeds :data:`MAX_INTERMEDIATE` when the other one fits. Layer plugins with their own
    cost model (see the Bilinear plugin) share this rule.
    """
    if method in ("contract", "materialise"):
        return method
    if method != "auto":
        raise ValueError(
            f"gram_method must be 'auto', 'contract' or 'materialise', got {method!r}"
        )
    best = min(costs, key=costs.__getitem__)
    other = "materialise" if best == "contract" else "contract"
    if memory[best] > MAX_INTERMEDIATE >= memory[other]:
        return other
    return best


@lru_cache(maxsize=256)
def choose_gram_method(method: GramMethod, n: int, t: int, g: int, d: int, o: int) -> str:
    """``contract`` or ``materialise`` for a weight ``(G, O, D)`` at ``N`` samples, ``T``
    positions: the forced one, or the cheaper one for ``auto``."""
    memory = {"contract": (n * t) ** 2 * g, "materialise": n * g * d * o}
    return pick_gram_method(method, gram_costs(n, t, g, d, o), memory)


def per_sample_weight(x: Tensor, z: Tensor) -> Tensor:
    """``(N, G, O, D)``: ``Σ_t z[n,t,g] x[n,t,g]ᵀ``."""
    return contract("ntgo,ntgd->ngod", z, x)


def weight_gram(x: Tensor, z: Tensor, method: GramMethod) -> Tensor:
    """``(N, N)`` Gram of the weight's per-sample gradients from ``X`` and ``Z``."""
    n, t, g, d = x.shape
    o = z.shape[-1]
    chosen = choose_gram_method(method, n, t, g, d, o)
    if chosen == "materialise":
        u = per_sample_weight(x, z).reshape(n, -1)
        return u @ u.T
    if t == 1:
        zz, xx = one_position_grams(x, z)
        return zz * xx if g == 1 else (zz * xx).sum(-1)
    zz = contract("mtgo,nsgo->mtnsg", z, z)
    xx = contract("mtgd,nsgd->mtnsg", x, x)
    return contract("mtnsg,mtnsg->mn", zz, xx)


def one_position_grams(x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(ZZᵀ, XXᵀ)`` for one position (``T = 1``): ``(N, N)`` each with one group (two
    plain matrix products, no einsum dispatch and no group axis: this runs on every FNGD
    refresh step, where small-op overhead counts), ``(N, N, G)`` per group otherwise."""
    if x.shape[2] == 1:
        z2, x2 = z[:, 0, 0], x[:, 0, 0]
        return z2 @ z2.T, x2 @ x2.T
    x1, z1 = x[:, 0], z[:, 0]
    return contract("mgo,ngo->mng", z1, z1), contract("mgd,ngd->mng", x1, x1)


def kfac(x: Tensor, z: Tensor, *, fold_bias: bool, has_weight: bool, mode: str
         ) -> tuple[Tensor, Tensor]:
    """``(input_cov (G, D', D'), grad_cov (G, O, O))`` from ``X (N,T,G,D)``, ``Z (N,T,G,O)``.

    ``expand``: ``A = (1/(NT)) Σ_{n,t} x̄ x̄ᵀ``, ``B = (1/N) Σ_{n,t} z zᵀ``;
    ``reduce``: ``A = (1/N) Σ_n x̄_n x̄_nᵀ`` with ``x̄_n = mean_t x̄``,
    ``B = (1/N) Σ_n z̄_n z̄_nᵀ`` with ``z̄_n = Σ_t z``. ``x̄ = [x, 1]`` with a folded bias.
    """
    n, t = x.shape[:2]
    parts = []
    if has_weight:
        parts.append(x)
    if fold_bias:
        parts.append(x.new_ones(*x.shape[:-1], 1))
    xb = torch.cat(parts, dim=-1)
    if mode == "expand":
        a = contract("ntgd,ntge->gde", xb, xb) / (n * t)
        b = contract("ntgo,ntgp->gop", z, z) / n
    elif mode == "reduce":
        xm = xb.mean(1)
        zs = z.sum(1)
        a = contract("ngd,nge->gde", xm, xm) / n
        b = contract("ngo,ngp->gop", zs, zs) / n
    else:
        raise ValueError(f"KFAC mode must be 'expand' or 'reduce', got {mode!r}")
    return a, b
