"""Structures (kind ``structure``): curvature approximations a solver inverts.

Built in: ``tensor_normal`` (TNT), ``smw`` (per-batch damped Fisher by Sherman–Morrison–
Woodbury, FNGD), ``coefficient_sharing`` (FNGD's reuse of ``smw``'s coefficients), and the
baselines ``kfac`` (per-layer Kronecker factors), ``shampoo`` (per-mode inverse roots),
``diagonal`` (Adam-like second moments) and ``dense`` (the exact block). See
:mod:`curvlib.structures.base` for the two protocols (vector and batch structures).
"""

from curvlib.structures.base import BatchContext, Plan, Structure, as_structure
from curvlib.structures.dense import Dense
from curvlib.structures.diagonal import Diagonal
from curvlib.structures.kfac import KFAC
from curvlib.structures.shampoo import Shampoo
from curvlib.structures.sharing import CoefficientSharing
from curvlib.structures.smw import SMW
from curvlib.structures.tensor_normal import TensorNormal, mode_statistics, normalise

__all__ = [
    "KFAC",
    "SMW",
    "BatchContext",
    "CoefficientSharing",
    "Dense",
    "Diagonal",
    "Plan",
    "Shampoo",
    "Structure",
    "TensorNormal",
    "as_structure",
    "mode_statistics",
    "normalise",
]
