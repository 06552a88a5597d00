"""Structures (kind ``structure``): curvature approximations a solver inverts.

Built in: ``tensor_normal`` (TNT). See :mod:`curvlib.structures.base` for the protocol.
"""

from curvlib.structures.base import Structure, as_structure
from curvlib.structures.tensor_normal import TensorNormal, mode_statistics, normalise

__all__ = ["Structure", "TensorNormal", "as_structure", "mode_statistics", "normalise"]
