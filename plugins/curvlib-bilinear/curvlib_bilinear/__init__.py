r"""curvlib-bilinear: a curvlib layer plugin for ``torch.nn.Bilinear``, installed as a package.

Its ``pyproject.toml`` declares::

    [project.entry-points."curvlib.plugins"]
    bilinear = "curvlib_bilinear"

so curvlib imports this package on its first registry lookup (``curvlib.get``,
``curvlib.available``, ``curvlib.layers.plugin_for``), and the
``@curvlib.register("layer", "bilinear")`` decorator on :class:`BilinearPlugin` adds it to the
``layer`` registry with origin ``"curvlib-bilinear"``. From then on every ``nn.Bilinear`` (and
subclass) in a model gets per-sample gradients, a Gram by a three-way Khatri–Rao identity,
weighted gradients and KFAC factors from its recorded inputs and output gradients, instead
of the generic ``torch.func`` path. See :mod:`curvlib_bilinear.plugin` for the formulas.
"""

from curvlib_bilinear.plugin import (
    MAX_INTERMEDIATE,
    BilinearPlugin,
    GramMethod,
    choose_gram_method,
    gram_costs,
)

__all__ = ["MAX_INTERMEDIATE", "BilinearPlugin", "GramMethod", "choose_gram_method", "gram_costs"]

__version__ = "0.1.0"
