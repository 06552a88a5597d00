r"""Solvers (kind ``solver``): damped inverses and inverse roots of batches of PSD matrices.

A solver maps a batch of symmetric PSD matrices ``A`` (``(B, d, d)``) and dampings ``ε``
(``(B,)``) to ``(A + εI)^{-1/p}`` for a power ``p`` (``p = 1`` is the inverse), and reports per
matrix whether it succeeded. Built in:

* ``cholesky`` — the inverse through a Cholesky factorisation (``p = 1`` only; the default,
  as in TNT);
* ``eigh`` — an eigendecomposition, any power (negative eigenvalues from round-off are
  clipped to zero before the damping is added);
* ``newton`` — the coupled Newton iteration for inverse ``p``-th roots (integer ``p``), matrix
  products only.

:func:`robust_inverse` wraps any solver with the recovery policy every structure uses, so
a bad factor never corrupts an optimizer's state:

1. matrices that are not finite are not factorised at all;
2. a factor that fails (the factorisation reports an error, or the result is not finite) is
   retried in float64;
3. then with the damping multiplied by 10, up to ``retries`` times;
4. if it still fails, the previous inverse is kept (when there is one; else the damped
   identity ``ε^{-1/p} I``), and the failure is counted and reported in the result.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.registry import register, resolve

__all__ = [
    "Cholesky",
    "Eigh",
    "InverseResult",
    "Newton",
    "SolveResult",
    "Solver",
    "as_solver",
    "robust_inverse",
    "robust_solve",
]


class Solver(abc.ABC):
    """Base class of solvers: ``(A + εI)^{-1/p}`` for a batch of PSD matrices."""

    name: ClassVar[str] = ""
    #: The powers ``p`` it supports (``None``: any positive power).
    powers: ClassVar[tuple[float, ...] | None] = None

    def supports(self, power: float) -> bool:
        """Whether ``power`` is one this solver computes."""
        return self.powers is None or power in self.powers

    @abc.abstractmethod
    def inverse_root(self, matrices: Tensor, damping: Tensor, power: float = 1.0
                     ) -> tuple[Tensor, Tensor]:
        """``((A + εI)^{-1/p}, ok)`` for ``matrices (B, d, d)`` and ``damping (B,)``.

        ``ok`` (``(B,)`` bool) is false where the factorisation failed; those entries of the
        result are unspecified.
        """

    def solve(self, matrices: Tensor, damping: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """``((A + εI)^{-1} b, ok)`` for ``matrices (B, d, d)``, ``damping (B,)`` and
        ``rhs (B, d)``.

        The default multiplies by :meth:`inverse_root` with power 1; solvers with a cheaper
        solve (Cholesky) override it.
        """
        inverse, ok = self.inverse_root(matrices, damping, 1.0)
        solution = (inverse @ rhs.unsqueeze(-1)).squeeze(-1)
        return solution, ok & _finite(solution)

    @classmethod
    def examples(cls) -> list[Solver]:
        """Configured instances the composition-matrix test assembles (default: one)."""
        return [cls()]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _damped(matrices: Tensor, damping: Tensor) -> Tensor:
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    sym = (matrices + matrices.transpose(-1, -2)) / 2
    return sym + damping.to(matrices.dtype).reshape(-1, 1, 1) * eye


def _finite(t: Tensor) -> Tensor:
    """Per matrix: finite entries, tested through the sum (one pass, no boolean copy; a sum
    that overflows counts as not finite, which only errs on the safe side)."""
    return torch.isfinite(t.sum(dim=tuple(range(1, t.dim()))))


@register("solver", "cholesky")
class Cholesky(Solver):
    """``(A + εI)^{-1}`` by ``cholesky_ex`` and ``cholesky_inverse`` (power 1 only)."""

    name = "cholesky"
    powers = (1.0,)

    def inverse_root(self, matrices, damping, power=1.0):
        """The damped inverse; ``ok`` is false where the matrix is not positive definite."""
        if power != 1.0:
            raise ValueError(
                f"the cholesky solver computes inverses only (power 1), got power {power}; "
                f"use solver='eigh' or 'newton' for inverse roots"
            )
        factor, info = torch.linalg.cholesky_ex(_damped(matrices, damping))
        failed = info != 0
        if failed.any():  # a zero pivot would make cholesky_inverse raise: invert I there
            eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
            factor = torch.where(failed.reshape(-1, 1, 1), eye, factor)
        inverse = torch.cholesky_inverse(factor)
        return inverse, ~failed & _finite(inverse)

    def solve(self, matrices, damping, rhs):
        """One Cholesky factorisation and two triangular solves (no inverse is formed).

        The damping goes onto a copy's diagonal; no symmetrised copy is made (the
        factorisation reads only the lower triangle).
        """
        damped = matrices.clone()
        if damping.dtype != matrices.dtype:
            damping = damping.to(matrices.dtype)
        damped.diagonal(dim1=-2, dim2=-1).add_(damping.unsqueeze(-1))
        factor, info = torch.linalg.cholesky_ex(damped)
        failed = None
        if bool(info.any()):
            failed = info != 0
            eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
            factor = torch.where(failed.reshape(-1, 1, 1), eye, factor)
        solution = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        good = _finite(solution)
        return solution, good if failed is None else good & ~failed


@register("solver", "eigh")
class Eigh(Solver):
    """``Q diag((max(λ, 0) + ε)^{-1/p}) Qᵀ`` by ``torch.linalg.eigh``; any power."""

    name = "eigh"

    def inverse_root(self, matrices, damping, power=1.0):
        """Any positive ``power``; ``ok`` is false where ``eigh`` fails to converge."""
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        sym = (matrices + matrices.transpose(-1, -2)) / 2
        values, vectors, info = _eigh_ex(sym)
        damped = values.clamp_min(0) + damping.to(values.dtype).reshape(-1, 1)
        scaled = vectors * damped.pow(-1.0 / power).unsqueeze(-2)
        result = scaled @ vectors.transpose(-1, -2)
        return result, (info == 0) & _finite(result) & (damped > 0).all(1)


def _eigh_ex(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``eigh`` that reports failures per matrix instead of raising."""
    try:
        values, vectors = torch.linalg.eigh(matrices)
        info = torch.zeros(matrices.shape[0], dtype=torch.int32, device=matrices.device)
        return values, vectors, info
    except RuntimeError:  # one bad matrix fails the whole batch: go one by one
        values, vectors, infos = [], [], []
        for m in matrices:
            try:
                v, q = torch.linalg.eigh(m)
                infos.append(0)
            except RuntimeError:
                v = torch.full(m.shape[:1], float("nan"), dtype=m.dtype, device=m.device)
                q = torch.full_like(m, float("nan"))
                infos.append(1)
            values.append(v)
            vectors.append(q)
        info = torch.tensor(infos, dtype=torch.int32, device=matrices.device)
        return torch.stack(values), torch.stack(vectors), info


@register("solver", "newton")
class Newton(Solver):
    """Coupled Newton iteration for ``(A + εI)^{-1/p}``, integer ``p ≥ 1``.

    With ``A`` scaled so that its spectrum lies in ``(0, 1 + p]``, the iteration
    ``M_j = ((p + 1) I − A_j)/p``, ``X_{j+1} = X_j M_j``, ``A_{j+1} = M_j^p A_j`` drives
    ``A_j → I`` and ``X_j → (A + εI)^{-1/p}`` (Higham, *Functions of Matrices*, §7.3). It stops
    when ``‖A_j − I‖_max < tol`` or after ``max_iter`` steps; ``ok`` is false for matrices that
    did not converge.

    Args:
        max_iter: the most iterations.
        tol: convergence tolerance on the max-norm of ``A_j − I``; ``None`` picks
            ``1e-6`` in float32 and ``1e-12`` in float64.
    """

    name = "newton"

    def __init__(self, max_iter: int = 100, tol: float | None = None):
        self.max_iter = int(max_iter)
        self.tol = tol

    def supports(self, power: float) -> bool:
        """Integer powers ``p ≥ 1``."""
        return float(power).is_integer() and power >= 1

    def inverse_root(self, matrices, damping, power=1.0):
        """Matrix products only; ``ok`` is false where the iteration did not converge."""
        if not self.supports(power):
            raise ValueError(f"the newton solver needs an integer power p ≥ 1, got {power}")
        p = int(power)
        a = _damped(matrices, damping)
        d = a.shape[-1]
        eye = torch.eye(d, dtype=a.dtype, device=a.device).expand_as(a)
        norm = torch.linalg.matrix_norm(a, ord="fro").clamp_min(torch.finfo(a.dtype).tiny)
        z = (p + 1) / (2 * norm)  # spectrum of z·A in (0, (p+1)/2] ⊂ (0, p + 1)
        x = eye * z.pow(1.0 / p).reshape(-1, 1, 1)
        m = a * z.reshape(-1, 1, 1)
        tol = self.tol or (1e-12 if a.dtype == torch.float64 else 1e-6)
        for _ in range(self.max_iter):
            step = ((p + 1) * eye - m) / p
            x = x @ step
            m = torch.linalg.matrix_power(step, p) @ m
            if (m - eye).abs().amax() < tol:
                break
        error = (m - eye).abs().reshape(m.shape[0], -1).amax(1)
        return x, (error < max(tol * 10, 1e-5 if a.dtype == torch.float32 else 1e-10)) & \
            _finite(x)

    def __repr__(self) -> str:
        return f"Newton(max_iter={self.max_iter}, tol={self.tol})"


def as_solver(solver: str | Solver | type[Solver], **options) -> Solver:
    """A solver object from a registered name, a class or an object."""
    return resolve("solver", solver, Solver, **options)


@dataclass
class InverseResult:
    """What :func:`robust_inverse` did.

    Attributes:
        inverse: ``(B, d, d)`` in the input dtype.
        ok: ``(B,)`` the first attempt succeeded.
        recovered: ``(B,)`` a retry (float64 or raised damping) succeeded.
        kept: ``(B,)`` every attempt failed: the previous inverse (or the damped identity)
            was kept.
        damping: ``(B,)`` the damping finally used.
    """

    inverse: Tensor
    ok: Tensor
    recovered: Tensor
    kept: Tensor
    damping: Tensor


def _escalate(attempt: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], finite: Tensor,
              ok: Tensor, damping: Tensor, result: Tensor, retries: int) -> None:
    """Steps 2–3 of the recovery policy, in place on ``ok``, ``damping`` and ``result``: the
    finite entries not yet ``ok`` are retried in float64 (``attempt(idx, damping)`` computes
    them), then with the damping multiplied by 10, up to ``retries`` times."""
    factor = 1.0
    for _ in range(retries + 1):
        pending = finite & ~ok
        if not pending.any():
            return
        idx = pending.nonzero().flatten()
        value, good = attempt(idx, damping[idx] * factor)
        done = idx[good]
        result[done] = value[good].to(result.dtype)
        damping[done] = damping[done] * factor
        ok[done] = True
        factor *= 10.0


def robust_inverse(solver: Solver, matrices: Tensor, damping: Tensor | float,
                   power: float = 1.0, previous: Tensor | Callable[[], Tensor] | None = None,
                   retries: int = 3) -> InverseResult:
    """``(A + εI)^{-1/p}`` with the recovery policy of the module docstring.

    ``previous`` (the inverses to keep on failure) may be a function that builds them; it is
    called only if some matrix fails every attempt.
    """
    b, d = matrices.shape[0], matrices.shape[-1]
    damping = torch.as_tensor(damping, dtype=torch.float64, device=matrices.device)
    damping = damping.expand(b).clone() if damping.dim() == 0 else damping.clone()
    dtype = matrices.dtype
    finite = _finite(matrices)
    if bool(finite.all()):  # the common case: no gather, no scatter
        inv, ok = solver.inverse_root(matrices, damping, power)
        result = inv.to(dtype)
        if bool(ok.all()):
            none = torch.zeros_like(ok)
            return InverseResult(result, ok, none, none, damping)
        ok = ok.clone()
    else:
        result = torch.empty_like(matrices)
        ok = torch.zeros(b, dtype=torch.bool, device=matrices.device)
        if finite.any():
            inv, good = solver.inverse_root(matrices[finite], damping[finite], power)
            idx = finite.nonzero().flatten()
            result[idx] = inv.to(dtype)
            ok[idx] = good
    first_ok = ok.clone()
    _escalate(lambda idx, eps: solver.inverse_root(matrices[idx].double(), eps, power),
              finite, ok, damping, result, retries)
    kept = ~ok
    if kept.any():
        idx = kept.nonzero().flatten()
        if callable(previous):
            previous = previous()
        if previous is not None:
            result[idx] = previous[idx].to(dtype)
        else:
            eye = torch.eye(d, dtype=dtype, device=matrices.device)
            scale = damping[idx].clamp_min(torch.finfo(torch.float64).tiny).pow(-1.0 / power)
            result[idx] = eye * scale.to(dtype).reshape(-1, 1, 1)
    return InverseResult(result, first_ok, ok & ~first_ok, kept, damping)


@dataclass
class SolveResult:
    """What :func:`robust_solve` did.

    Attributes:
        solution: ``(B, d)``; zero where ``failed``.
        ok: ``(B,)`` the first attempt succeeded.
        recovered: ``(B,)`` a retry (float64 or raised damping) succeeded.
        failed: ``(B,)`` the system was not finite, or every attempt failed.
        damping: ``(B,)`` the damping finally used.
    """

    solution: Tensor
    ok: Tensor
    recovered: Tensor
    failed: Tensor
    damping: Tensor
    #: Every system was solved at the first attempt (``ok`` is all true), known without
    #: reading the masks.
    all_ok: bool = False


def robust_solve(solver: Solver, matrices: Tensor, damping: Tensor | float, rhs: Tensor,
                 retries: int = 3) -> SolveResult:
    """``(A + εI)^{-1} b`` per matrix with the recovery policy of the module docstring.

    Systems with non-finite entries are not solved; a failed solve is retried in float64,
    then with the damping multiplied by 10 up to ``retries`` times. What still fails is
    reported in ``failed`` with a zero solution: the caller decides what a failed block does
    (``smw`` skips its step).
    """
    b = matrices.shape[0]
    damping = torch.as_tensor(damping, dtype=torch.float64, device=matrices.device)
    damping = damping.expand(b) if damping.dim() == 0 else damping
    dtype = matrices.dtype if matrices.dtype == rhs.dtype else torch.promote_types(
        matrices.dtype, rhs.dtype)
    # per system: every entry of the matrix and the right-hand side finite (one sum each; a
    # sum that overflows counts as not finite, which errs on the safe side)
    finite = torch.isfinite(matrices.sum(dim=tuple(range(1, matrices.dim())))
                            + rhs.sum(dim=tuple(range(1, rhs.dim()))))
    all_finite = bool(finite.all())
    if all_finite:
        x, good = solver.solve(matrices if matrices.dtype == dtype else matrices.to(dtype),
                               damping, rhs if rhs.dtype == dtype else rhs.to(dtype))
        if bool(good.all()):
            none = torch.zeros_like(good)
            return SolveResult(x, good, none, none, damping.clone(), all_ok=True)
    damping = damping.clone()  # the retries raise it in place
    result = torch.zeros(rhs.shape, dtype=dtype, device=rhs.device)
    ok = torch.zeros(b, dtype=torch.bool, device=matrices.device)
    if all_finite:
        result = torch.where(good.reshape(-1, 1), x, result)
        ok = good.clone()
    elif finite.any():
        idx = finite.nonzero().flatten()
        x, good = solver.solve(matrices[idx].to(dtype), damping[idx], rhs[idx].to(dtype))
        result[idx[good]] = x[good]
        ok[idx[good]] = True
    first_ok = ok.clone()
    _escalate(lambda idx, eps: solver.solve(matrices[idx].double(), eps, rhs[idx].double()),
              finite, ok, damping, result, retries)
    return SolveResult(result, first_ok, ok & ~first_ok, ~ok, damping)
