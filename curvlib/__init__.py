"""curvlib: assemble second-order optimizers from components and test them against the Fisher.

Public entry points:

* :func:`register`, :func:`get`, :func:`available` — the component registries
  (:mod:`curvlib.registry`);
* :class:`Likelihood` and the built-ins :class:`Categorical`, :class:`Bernoulli`,
  :class:`Gaussian` (:mod:`curvlib.likelihoods`);
* :mod:`curvlib.testing` — dense float64 oracles, hypothesis strategies and assertions.
"""

from curvlib.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, as_likelihood
from curvlib.registry import KINDS, available, get, register

__version__ = "0.1.0.dev0"

__all__ = [
    "KINDS",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "__version__",
    "as_likelihood",
    "available",
    "get",
    "register",
]
