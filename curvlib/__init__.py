"""curvlib: assemble second-order optimizers from components and test them against the Fisher.

Public entry points:

* :func:`register`, :func:`get`, :func:`available` — the component registries
  (:mod:`curvlib.registry`);
* :class:`Likelihood` and the built-ins :class:`Categorical`, :class:`Bernoulli`,
  :class:`Gaussian` (:mod:`curvlib.likelihoods`);
* :func:`per_sample_grads` and :func:`gram` — per-sample quantities by parameter name, through
  the curvature sources (:mod:`curvlib.sources`) and layer plugins (:mod:`curvlib.layers`);
* :func:`assemble` and the recipes :func:`TNT`, :func:`FNGD`, :func:`KFAC`, :func:`Shampoo`,
  :func:`EmpiricalTNT` and :func:`NaturalGradient` — optimizers from a source, a structure and
  a solver (:mod:`curvlib.optim`, :mod:`curvlib.structures`,
  :mod:`curvlib.solvers`);
* :class:`Capture` — record layer inputs and output gradients (:mod:`curvlib.capture`);
* :class:`Coverage` and :func:`format_coverage` — which parameter gets which treatment
  (``opt.coverage()``, :mod:`curvlib.coverage`);
* :mod:`curvlib.errors` — :class:`CurvlibError`, the base of every refusal, and its kinds;
* :mod:`curvlib.diagnostics` — cosine similarity to the block-Fisher direction and block
  errors of any assembled optimizer;
* :mod:`curvlib.testing` — dense float64 oracles, hypothesis strategies and assertions.
"""

from curvlib import damping, diagnostics, errors, layers, solvers, structures
from curvlib.capture import Capture
from curvlib.coverage import Coverage, format_coverage
from curvlib.errors import CurvlibError
from curvlib.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, as_likelihood
from curvlib.optim import CurvatureOptimizer, assemble
from curvlib.recipes import FNGD, KFAC, TNT, EmpiricalTNT, NaturalGradient, Shampoo
from curvlib.registry import KINDS, available, get, register
from curvlib.sources import Statistics, gram, per_sample_grads

__version__ = "0.1.0.dev0"

__all__ = [
    "FNGD",
    "KFAC",
    "KINDS",
    "TNT",
    "Bernoulli",
    "Capture",
    "Categorical",
    "Coverage",
    "CurvatureOptimizer",
    "CurvlibError",
    "EmpiricalTNT",
    "Gaussian",
    "Likelihood",
    "NaturalGradient",
    "Shampoo",
    "Statistics",
    "__version__",
    "as_likelihood",
    "assemble",
    "available",
    "damping",
    "diagnostics",
    "errors",
    "format_coverage",
    "get",
    "gram",
    "layers",
    "per_sample_grads",
    "register",
    "solvers",
    "structures",
]
