"""Testing tools: dense float64 oracles, hypothesis strategies and assertions.

* :mod:`curvlib.testing.oracles` — exact / MC / empirical Fisher, GGN, Gram, per-sample
  gradients, blocks and the damped natural gradient, from the definitions;
* :mod:`curvlib.testing.strategies` — hypothesis strategies for models, problems, SPD
  matrices, tensor shapes and dampings, and the ``dev`` / ``ci`` settings profiles;
* :mod:`curvlib.testing.assertions` — comparisons with informative failure messages.

The strategies module imports :mod:`hypothesis` (the ``test`` extra); the oracles do not.
"""

from curvlib.testing import oracles

__all__ = ["oracles"]
