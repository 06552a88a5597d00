"""Alternative implementations of curvlib's per-sample quantities.

curvlib computes per-sample gradients itself, through its layer plugins and the generic
:mod:`torch.func` path (``backend="curvlib"``, the default of
:func:`curvlib.per_sample_grads` and :func:`curvlib.gram`). A *backend* here is a second,
independent implementation of the same quantities, selected with ``backend=...``:

* :mod:`curvlib.backends.backpack` (``backend="backpack"``) — BackPACK's ``BatchGrad`` for
  data targets and ``SqrtGGNMC`` for sampled targets, on the layers BackPACK supports.

Backends are imported lazily (only when selected), so curvlib does not import BackPACK
unless it is asked to.
"""
