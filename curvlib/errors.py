"""curvlib's error types: one base class, :class:`CurvlibError`, for everything curvlib refuses.

curvlib's contract is *exact or refused*: a model, an input or a call either gives the result
the dense float64 reference gives, or raises one of these before any state changes, with a
message that names the parameter or input at fault and a fix. Catch :class:`CurvlibError` to
catch them all; each also subclasses the builtin exception a Python user would expect
(``ValueError`` for bad values, ``RuntimeError`` for a call that cannot work), so code that
caught those keeps working.

This module imports nothing from curvlib; every other module may import it.
"""

from __future__ import annotations

__all__ = [
    "CoverageError",
    "CurvlibError",
    "HyperparameterError",
    "InputError",
    "StateDictError",
    "UsageError",
]


class CurvlibError(Exception):
    """Base class of every error curvlib raises on purpose."""


class CoverageError(CurvlibError, RuntimeError):
    """A parameter the optimizer was asked to precondition cannot be preconditioned exactly:
    its layer records miss a use of it (a registered layer whose ``forward`` is not called, a
    weight used functionally), it is shared in a way the structure has no formula for, or its
    module cannot be recorded. The message names the parameter and the fix (usually: put it in
    a param group with ``precondition=False``, which gives it SGD with momentum)."""


class HyperparameterError(CurvlibError, ValueError):
    """A hyperparameter is out of its range, NaN or infinite (the message names the key, the
    param group and the accepted range)."""


class InputError(CurvlibError, ValueError):
    """A batch the likelihood or optimizer cannot use: empty, targets of the wrong shape or
    dtype, class indices out of range, Bernoulli targets outside ``[0, 1]``."""


class StateDictError(CurvlibError, ValueError):
    """A state dict that does not fit the optimizer it is loaded into (another model, another
    recipe, parameters of other shapes)."""


class UsageError(CurvlibError, RuntimeError):
    """An optimizer used outside its protocol: ``step()`` after a plain ``loss.backward()``,
    a closed optimizer, micro-batches that cannot be accumulated, a param group added between
    ``opt.backward`` and ``step``."""
