r"""Assertions for comparing approximations with dense references.

Comparisons are norm-wise: ``‖actual − expected‖_F ≤ atol + rtol ‖expected‖_F``. Entry-wise
relative tolerances fail on entries that are zero in exact arithmetic and round-off in
practice; the Frobenius form is what "agrees to 1e-10 relative" means for a matrix or a
direction. Failure messages give the relative error, the largest entry-wise difference and
where it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlib.likelihoods import as_likelihood

__all__ = [
    "assert_close",
    "assert_psd",
    "assert_symmetric",
    "check_likelihood",
    "cosine_similarity",
    "relative_error",
]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``‖actual − expected‖_F / ‖expected‖_F`` (the absolute error if ``expected`` is 0)."""
    _check_shapes(actual, expected)
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    diff = torch.linalg.vector_norm(a - e).item()
    scale = torch.linalg.vector_norm(e).item()
    return diff / scale if scale > 0 else diff


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two tensors seen as flat vectors (1 for two zeros)."""
    _check_shapes(a, b)
    x, y = a.detach().double().flatten(), b.detach().double().flatten().to(a.device)
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return (x @ y / (nx * ny)).item()


def _check_shapes(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    rtol: float = 1e-10,
    atol: float = 0.0,
    what: str = "values",
) -> None:
    """Assert ``‖actual − expected‖_F ≤ atol + rtol ‖expected‖_F``.

    The default ``rtol=1e-10`` is the float64 standard of the project; loosen it only with a
    reason (statistics, float32) stated where you call it.
    """
    _check_shapes(actual, expected)
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    diff = a - e
    err = torch.linalg.vector_norm(diff).item()
    scale = torch.linalg.vector_norm(e).item()
    if not (err <= atol + rtol * scale):  # also catches NaN
        flat = diff.abs().flatten()
        idx = int(flat.argmax()) if flat.numel() else 0
        where = tuple(torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.dim() else ()
        where = tuple(int(i) for i in where)
        raise AssertionError(
            f"{what} differ: ‖Δ‖={err:.3e}, ‖expected‖={scale:.3e}, relative "
            f"{err / scale if scale else float('inf'):.3e} > rtol={rtol:.1e} (atol={atol:.1e}); "
            f"largest entry difference {flat[idx].item() if flat.numel() else 0:.3e} at "
            f"{where}: actual {a[where].item() if a.numel() else 0:.6e}, "
            f"expected {e[where].item() if e.numel() else 0:.6e}"
        )


def assert_symmetric(matrix: Tensor, *, rtol: float = 1e-12, what: str = "matrix") -> None:
    """Assert a (batch of) square matrix equals its transpose to ``rtol`` (norm-wise)."""
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise AssertionError(f"{what} is not square: shape {tuple(matrix.shape)}")
    assert_close(matrix, matrix.mT, rtol=rtol, what=f"{what} and its transpose")


def assert_psd(matrix: Tensor, *, rtol: float = 1e-10, what: str = "matrix") -> None:
    """Assert a symmetric (batch of) matrix is positive semi-definite.

    Passes when the smallest eigenvalue is at least ``−rtol · max|eigenvalue|``: round-off
    puts the zero eigenvalues of a singular PSD matrix at ±ε‖M‖.
    """
    assert_symmetric(matrix, rtol=max(rtol, 1e-12), what=what)
    sym = (matrix.detach().double() + matrix.detach().double().mT) / 2
    eig = torch.linalg.eigvalsh(sym)
    lowest, top = eig.min().item(), eig.abs().max().item()
    if lowest < -rtol * top:
        raise AssertionError(
            f"{what} is not PSD: smallest eigenvalue {lowest:.3e} < −{rtol:.1e} × {top:.3e}"
        )


def check_likelihood(
    likelihood: Any,
    outputs: Tensor,
    *,
    num_samples: int = 50_000,
    generator: torch.Generator | None = None,
    canonical: bool = False,
    rtol: float = 1e-10,
    z: float = 4.0,
    chunk_size: int = 5_000,
) -> None:
    r"""Check that a likelihood is self-consistent at ``outputs`` (shape ``(N, *)``).

    Exact checks (to ``rtol``): ``loss`` returns shape ``(N,)`` on sampled targets;
    ``fisher`` has shape ``(N, K, K)`` and is symmetric PSD; ``fisher_sqrt`` ``S`` gives
    ``S Sᵀ = Λ``; with ``canonical=True`` (canonical link: ``Λ`` is the loss Hessian, true
    for the three built-ins and Poisson with log link) also ``Λ = ∂²ℓ/∂f²`` per sample.

    Statistical check: the sampled score ``s = ∇_f ℓ(y, f)``, ``y ~ p(·|f)``, must have mean
    0 and second moment ``Λ``. With ``S = num_samples`` draws, the estimate ``Λ̂`` has
    ``E‖Λ̂ − Λ‖²_F = σ²/S`` with ``σ² = E‖s sᵀ − Λ‖²_F``, estimated from the same draws; the
    check requires ``‖Λ̂ − Λ‖_F ≤ z σ/√S`` (and likewise ``‖mean score‖_F ≤ z σ_s/√S``).
    A correct likelihood fails with probability at most ``1/z²`` by Markov's inequality
    (6 % at ``z = 4``), and in practice far less: the squared error is a sum of many terms
    concentrated near its mean (a single χ²₁ term, the worst case, exceeds 16 times its mean
    with probability 6e-5). An error in ``Λ`` is detected once ``‖ΔΛ‖_F`` exceeds about
    ``(z + 1) σ/√S``; raise ``num_samples`` to detect smaller ones. Pass a seeded
    ``generator`` to make the check deterministic. Draws are processed ``chunk_size`` at a
    time, so memory stays at ``chunk_size · N · K²`` numbers.
    """
    lik = as_likelihood(likelihood)
    f = outputs.detach().double()
    n = f.shape[0]
    k = f[0].numel()
    lam = lik.fisher(f)
    if lam.shape != (n, k, k):
        raise AssertionError(f"fisher(outputs) has shape {tuple(lam.shape)}, expected {(n, k, k)}")
    assert_psd(lam, rtol=rtol, what="Λ")
    root = lik.fisher_sqrt(f)
    if root.dim() != 3 or root.shape[:2] != (n, k):
        raise AssertionError(f"fisher_sqrt has shape {tuple(root.shape)}, expected (N, K, R)")
    assert_close(root @ root.mT, lam, rtol=rtol, what="S Sᵀ and Λ")

    draws = _ScoreMoments(lam)
    done = 0
    while done < num_samples:
        chunk = min(chunk_size, num_samples - done)
        repeated = f.repeat(chunk, *([1] * (f.dim() - 1)))  # (chunk·N, *): draw s is block s
        targets = lik.sample(repeated, generator=generator)
        leaf = repeated.clone().requires_grad_(True)
        losses = lik.loss(leaf, targets)
        if losses.shape != (chunk * n,):
            raise AssertionError(f"loss returned shape {tuple(losses.shape)}, expected (N,)")
        (score,) = torch.autograd.grad(losses.sum(), leaf)
        draws.add(score.reshape(chunk, n, k))
        done += chunk
    draws.check(z)

    if canonical:
        def loss_of_output(fn: Tensor, yn: Tensor) -> Tensor:
            return lik.loss(fn.reshape(1, *f.shape[1:]), yn.unsqueeze(0)).sum()

        hess = torch.func.vmap(torch.func.hessian(loss_of_output))(
            f.reshape(n, k), lik.sample(f, generator=generator)
        )
        assert_close(hess, lam, rtol=rtol, what="loss Hessian and Λ (canonical link)")


class _ScoreMoments:
    """Running sums for the first and second moments of sampled scores ``(S, N, K)``."""

    def __init__(self, lam: Tensor) -> None:
        self.lam = lam
        self.count = 0
        self.sum_score = torch.zeros(lam.shape[:2], dtype=lam.dtype, device=lam.device)
        self.sum_outer = torch.zeros_like(lam)
        self.sq_score = 0.0  # Σ_s ‖s_s − 0‖²
        self.sq_outer = 0.0  # Σ_s ‖s_s s_sᵀ − Λ‖²

    def add(self, score: Tensor) -> None:
        outer = score.unsqueeze(-1) * score.unsqueeze(-2)
        self.count += score.shape[0]
        self.sum_score += score.sum(0)
        self.sum_outer += outer.sum(0)
        self.sq_score += score.pow(2).sum().item()
        self.sq_outer += (outer - self.lam).pow(2).sum().item()

    def check(self, z: float) -> None:
        s = self.count
        for what, estimate, truth, sq in (
            ("mean of the score", self.sum_score / s, torch.zeros_like(self.sum_score),
             self.sq_score),
            ("second moment of the score and Λ", self.sum_outer / s, self.lam, self.sq_outer),
        ):
            bound = z * (sq / s) ** 0.5 / s**0.5
            err = torch.linalg.vector_norm(estimate - truth).item()
            if not err <= bound:
                raise AssertionError(
                    f"{what}: Monte-Carlo error {err:.3e} exceeds {z:g} standard errors "
                    f"({bound:.3e}) over {s} draws"
                )
