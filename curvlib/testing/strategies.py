r"""Hypothesis strategies for property-testing curvature approximations.

Hypothesis draws *configurations* — an architecture, a likelihood, a batch size, a damping,
a seed — and torch makes the numbers from the seed. Drawn values therefore print as short,
readable configurations when a property fails, and hypothesis shrinks them towards small
models, batch size 1 and simple spectra.

Strategies:

* :func:`model_specs` — small MLPs and CNNs (Conv1d / Conv2d), with or without bias, several
  activations, optionally a spatial (fully convolutional) output;
* :func:`problems` — a :class:`Problem`: model, likelihood, matching inputs and targets;
* :func:`linear_cases`, :func:`conv_cases`, :func:`generic_cases` — single modules with
  their calls, for the layer-plugin contract (:mod:`curvlib.testing.contract`);
* :func:`family_cases` — the correctness contract's model families beyond the specs: a weight
  reused through ``F.linear``, a tied embedding/head, ``nn.MultiheadAttention``, an
  ``nn.TransformerEncoderLayer`` and a plain MLP (:mod:`curvlib.testing.families`);
* :func:`spd_matrices` — symmetric positive-definite matrices with a controlled spectrum;
* :func:`tensor_shapes` (order 1–4), :func:`batch_sizes` (from 1), :func:`dampings`
  (log-uniform), :func:`seeds`, :func:`likelihood_names`.

Settings profiles (:func:`load_profile`, counts in :data:`PROFILE_EXAMPLES`): ``dev`` — 25
examples per property, for quick local runs; ``ci`` — 200, derandomized, so CI is
reproducible; ``long`` — 1000, *not* derandomized (each run explores new examples), for long
local runs. The profile comes from ``CURVLIB_HYPOTHESIS_PROFILE``, else ``ci`` when ``CI`` is
set to a true value, else ``dev``. All set ``deadline=None``: timings on shared machines are
too noisy to fail on. A property too expensive for the full count runs :func:`examples` of a
stated fraction of it, so its count still scales with the profile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from curvlib.likelihoods import as_likelihood
from curvlib.testing.families import FAMILIES, FamilyCase, family_cases

if TYPE_CHECKING:
    from curvlib.testing.contract import LayerCase

__all__ = [
    "ACTIVATIONS",
    "BUILTIN_LIKELIHOODS",
    "FAMILIES",
    "PROFILE_EXAMPLES",
    "FamilyCase",
    "ModelSpec",
    "Problem",
    "batch_sizes",
    "conv_cases",
    "dampings",
    "examples",
    "family_cases",
    "generic_cases",
    "likelihood_names",
    "linear_cases",
    "load_profile",
    "make_targets",
    "model_specs",
    "problems",
    "register_profiles",
    "seeds",
    "selected_profile",
    "spd_matrices",
    "tensor_shapes",
]

#: Activation names understood by :class:`ModelSpec`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}

#: The likelihoods curvlib ships.
BUILTIN_LIKELIHOODS: tuple[str, ...] = ("categorical", "bernoulli", "gaussian")

Kind = Literal["mlp", "cnn1d", "cnn2d"]


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class ModelSpec:
    """A small architecture, built deterministically from its ``seed``.

    * ``mlp``: ``Linear`` layers of sizes ``in_shape[0] → *widths → out_features`` with the
      activation between them; inputs ``(N, in_shape[0])``.
    * ``cnn1d`` / ``cnn2d``: ``ConvNd`` layers with ``widths`` channels, kernel ``kernel``,
      stride ``stride``, padding ``padding`` and the activation after each, then either
      ``Flatten`` and ``Linear`` to ``out_features`` outputs, or, with ``spatial_output``, a
      1×1 convolution to ``out_features`` channels keeping the spatial dimensions (outputs
      ``(N, out_features, *)``, as in segmentation); inputs ``(N, *in_shape)``.

    Weights come from torch's default initialisation under ``torch.manual_seed(seed)``
    inside :func:`torch.random.fork_rng`, so the global random state is untouched.
    """

    kind: Kind
    in_shape: tuple[int, ...]
    widths: tuple[int, ...]
    out_features: int
    activation: str = "tanh"
    bias: bool = True
    kernel: int = 2
    stride: int = 1
    padding: int = 0
    spatial_output: bool = False
    seed: int = 0

    def build(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """The model as an ``nn.Sequential`` in ``dtype``."""
        act = ACTIVATIONS[self.activation]
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.kind == "mlp":
                sizes = (self.in_shape[0], *self.widths)
                for a, b in pairwise(sizes):
                    layers += [nn.Linear(a, b, bias=self.bias), act()]
                layers.append(nn.Linear(sizes[-1], self.out_features, bias=self.bias))
            else:
                conv = nn.Conv1d if self.kind == "cnn1d" else nn.Conv2d
                channels = (self.in_shape[0], *self.widths)
                for a, b in pairwise(channels):
                    layers += [
                        conv(a, b, self.kernel, self.stride, self.padding, bias=self.bias),
                        act(),
                    ]
                if self.spatial_output:
                    layers.append(conv(channels[-1], self.out_features, 1, bias=self.bias))
                else:
                    flat = channels[-1] * math.prod(self.feature_shape())
                    layers += [nn.Flatten(), nn.Linear(flat, self.out_features, bias=self.bias)]
            model = nn.Sequential(*layers)
        return model.to(dtype)

    def feature_shape(self) -> tuple[int, ...]:
        """Spatial shape after the convolutions (empty for an MLP)."""
        if self.kind == "mlp":
            return ()
        shape = self.in_shape[1:]
        for _ in self.widths:
            shape = tuple(
                (s + 2 * self.padding - self.kernel) // self.stride + 1 for s in shape
            )
        return shape

    def output_shape(self) -> tuple[int, ...]:
        """Shape of one sample's output."""
        if self.kind != "mlp" and self.spatial_output:
            return (self.out_features, *self.feature_shape())
        return (self.out_features,)

    def inputs(self, batch_size: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard-normal inputs ``(batch_size, *in_shape)`` from ``seed``."""
        return torch.randn(
            (batch_size, *self.in_shape), generator=_seeded_generator(seed), dtype=dtype
        )


def make_targets(
    likelihood: str, output_shape: tuple[int, ...], batch_size: int, seed: int,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Random targets a likelihood accepts for outputs ``(batch_size, *output_shape)``.

    ``categorical``: class indices ``(N, *output_shape[1:])``; ``bernoulli``: 0/1 values;
    ``gaussian``: standard normal values, both of the outputs' shape; any other registered
    likelihood: its own ``sample`` at standard-normal outputs. These are *data* targets (for
    the empirical Fisher and gradients), not draws from the model.
    """
    gen = _seeded_generator(seed)
    shape = (batch_size, *output_shape)
    if likelihood == "categorical":
        return torch.randint(output_shape[0], (batch_size, *output_shape[1:]), generator=gen)
    if likelihood == "bernoulli":
        return torch.randint(2, shape, generator=gen).to(dtype)
    if likelihood == "gaussian":
        return torch.randn(shape, generator=gen, dtype=dtype)
    # any other (plugin) likelihood: targets drawn from it at standard-normal outputs
    outputs = torch.randn(shape, generator=gen, dtype=dtype)
    return as_likelihood(likelihood).sample(outputs, generator=gen)


@dataclass(frozen=True)
class Problem:
    """A model with a likelihood, inputs and data targets; prints as its configuration."""

    spec: ModelSpec
    likelihood: str
    batch_size: int
    seed: int
    model: nn.Module = field(repr=False, compare=False)
    inputs: Tensor = field(repr=False, compare=False)
    targets: Tensor = field(repr=False, compare=False)

    @classmethod
    def make(
        cls, spec: ModelSpec, likelihood: str, batch_size: int, seed: int,
        dtype: torch.dtype = torch.float64,
    ) -> Problem:
        """Build the model and draw inputs and targets from ``seed``."""
        as_likelihood(likelihood)  # an unknown name fails here, listing the known ones
        model = spec.build(dtype)
        inputs = spec.inputs(batch_size, seed, dtype)
        targets = make_targets(likelihood, spec.output_shape(), batch_size, seed + 1, dtype)
        return cls(spec, likelihood, batch_size, seed, model, inputs, targets)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for torch's generators."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def batch_sizes(min_size: int = 1, max_size: int = 6) -> st.SearchStrategy[int]:
    """Batch sizes, from 1 by default (one sample is the edge case that matters most)."""
    return st.integers(min_value=min_size, max_value=max_size)


def likelihood_names(names: tuple[str, ...] = BUILTIN_LIKELIHOODS) -> st.SearchStrategy[str]:
    """Likelihood names to draw from (the built-ins by default)."""
    return st.sampled_from(names)


def dampings(min_value: float = 1e-6, max_value: float = 1e2) -> st.SearchStrategy[float]:
    """Dampings ``λ`` drawn log-uniformly from ``[min_value, max_value]``."""
    if not 0 < min_value <= max_value:
        raise ValueError("dampings need 0 < min_value <= max_value")
    lo, hi = math.log10(min_value), math.log10(max_value)
    return st.floats(lo, hi).map(lambda e: min(max(10.0**e, min_value), max_value))


def tensor_shapes(
    min_order: int = 1, max_order: int = 4, min_side: int = 1, max_side: int = 5
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes of parameter tensors of order ``min_order``–``max_order`` (bias, weight, conv)."""
    return st.lists(
        st.integers(min_side, max_side), min_size=min_order, max_size=max_order
    ).map(tuple)


@st.composite
def model_specs(
    draw: st.DrawFn,
    kinds: tuple[Kind, ...] = ("mlp", "cnn1d", "cnn2d"),
    bias: bool | None = None,
    activations: tuple[str, ...] = tuple(ACTIVATIONS),
    spatial_output: bool | None = None,
    min_out: int = 1,
    max_depth: int = 2,
) -> ModelSpec:
    """Small architectures (a few hundred parameters at most).

    Args:
        kinds: which of ``mlp``, ``cnn1d``, ``cnn2d`` to draw.
        bias: fix the presence of biases, or draw it (``None``).
        activations: activation names to draw from (keys of :data:`ACTIVATIONS`).
        spatial_output: for CNNs, fix whether outputs keep spatial dims, or draw it.
        min_out: smallest number of outputs (channels) per position; use 2 for categorical.
        max_depth: most hidden layers.
    """
    kind = draw(st.sampled_from(kinds))
    widths = tuple(draw(st.lists(st.integers(1, 4), min_size=0 if kind == "mlp" else 1,
                                 max_size=max_depth)))
    out = draw(st.integers(min_out, max(min_out, 4)))
    common = dict(
        widths=widths,
        out_features=out,
        activation=draw(st.sampled_from(activations)),
        bias=draw(st.booleans()) if bias is None else bias,
        seed=draw(seeds()),
    )
    if kind == "mlp":
        return ModelSpec(kind="mlp", in_shape=(draw(st.integers(1, 5)),), **common)
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    channels = draw(st.integers(1, 3))
    n_spatial = 1 if kind == "cnn1d" else 2
    # Smallest input side that keeps every layer's output side >= 1, from the last layer back.
    low = 1
    for _ in widths:
        low = max(1, (low - 1) * stride + kernel - 2 * padding)
    sides = tuple(draw(st.integers(low, low + 3)) for _ in range(n_spatial))
    spatial = draw(st.booleans()) if spatial_output is None else spatial_output
    return ModelSpec(kind=kind, in_shape=(channels, *sides), kernel=kernel, stride=stride,
                     padding=padding, spatial_output=spatial, **common)


@st.composite
def problems(
    draw: st.DrawFn,
    likelihoods: tuple[str, ...] = BUILTIN_LIKELIHOODS,
    kinds: tuple[Kind, ...] = ("mlp", "cnn1d", "cnn2d"),
    bias: bool | None = None,
    sizes: st.SearchStrategy[int] | None = None,
    dtype: torch.dtype = torch.float64,
    spatial_output: bool | None = None,
) -> Problem:
    """A :class:`Problem`: a drawn model, a likelihood, matching inputs and data targets.

    Categorical problems get at least two classes. ``sizes`` draws the batch size
    (default :func:`batch_sizes`, from 1); ``kinds``, ``bias`` and ``spatial_output`` are
    passed to :func:`model_specs`.
    """
    likelihood = draw(st.sampled_from(likelihoods))
    min_out = 2 if likelihood == "categorical" else 1
    spec = draw(model_specs(kinds=kinds, bias=bias, min_out=min_out,
                            spatial_output=spatial_output))
    n = draw(sizes if sizes is not None else batch_sizes())
    return Problem.make(spec, likelihood, n, draw(seeds()), dtype)


@st.composite
def spd_matrices(
    draw: st.DrawFn,
    sizes: st.SearchStrategy[int] | None = None,
    min_eigenvalue: float = 1e-3,
    max_condition: float = 1e6,
    with_spectrum: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Symmetric positive-definite ``Q diag(e) Qᵀ`` with a controlled spectrum.

    The smallest eigenvalue is ``min_eigenvalue``, the largest ``min_eigenvalue · κ`` with the
    condition number ``κ`` drawn log-uniformly from ``[1, max_condition]``, the others
    log-uniform in between; ``Q`` is a random orthogonal matrix from the drawn seed. With
    ``with_spectrum=True`` the strategy yields ``(matrix, eigenvalues)`` (ascending).
    """
    n = draw(sizes if sizes is not None else st.integers(1, 8))
    log_kappa = draw(st.floats(0.0, math.log10(max_condition)))
    gen = _seeded_generator(draw(seeds()))
    u = torch.rand(n, generator=gen, dtype=dtype).sort().values
    if n >= 2:
        u[0], u[-1] = 0.0, 1.0
    else:
        u[0] = 0.0
    eig = min_eigenvalue * 10.0 ** (log_kappa * u)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix
    matrix = (q * eig) @ q.T
    matrix = (matrix + matrix.T) / 2
    return (matrix, eig) if with_spectrum else matrix


#: ``max_examples`` of each profile :func:`register_profiles` registers.
PROFILE_EXAMPLES: dict[str, int] = {"dev": 25, "ci": 200, "long": 1000}


def register_profiles() -> None:
    """Register the ``dev``, ``ci`` and ``long`` hypothesis profiles (idempotent).

    ``dev``: 25 examples, random. ``ci``: 200 examples, derandomized (the same examples on
    every run, so CI is reproducible; the example database is off), failing examples printed
    as a reproduction blob. ``long``: 1000 examples, random (new examples each run, failures
    saved to the example database and replayed first), reproduction blobs printed. All three
    set ``deadline=None`` and suppress the ``too_slow`` health check.
    """
    # Each profile starts from hypothesis's defaults, not from whatever profile is loaded when
    # this runs (load_profile registers again): else dev, registered while ci is active,
    # would inherit ci's derandomize.
    common = dict(parent=settings.get_profile("default"), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
    n = PROFILE_EXAMPLES
    settings.register_profile("dev", max_examples=n["dev"], **common)
    settings.register_profile("ci", max_examples=n["ci"], derandomize=True, print_blob=True,
                              **common)
    settings.register_profile("long", max_examples=n["long"], derandomize=False,
                              print_blob=True, **common)


def examples(fraction: float) -> int:
    """``fraction`` of the active profile's ``max_examples``, rounded up, at least 1.

    For a property too expensive to run the profile's full count:
    ``@settings(max_examples=examples(0.1))`` runs ``⌈0.1 · max_examples⌉`` examples — 20
    under ``ci``, 3 under ``dev``, 100 under ``long`` — so the count stays a stated function
    of the profile instead of a constant. "Active" is ``hypothesis.settings.default`` when
    this is called: a ``settings`` decorator runs at import, so load the profile first (as
    ``tests/conftest.py`` does, before the test modules are imported); with no profile
    loaded it is hypothesis's own default, 100.
    """
    if not fraction > 0:
        raise ValueError(f"examples(fraction) needs fraction > 0, got {fraction!r}")
    # round() first so that e.g. 0.15 · 200 = 30.000000000000004 rounds up to 30, not 31
    return max(1, math.ceil(round(fraction * settings.default.max_examples, 6)))


def load_profile(name: str | None = None) -> str:
    """Register and load a profile; returns its name.

    Without ``name``: ``CURVLIB_HYPOTHESIS_PROFILE`` if set, else ``ci`` when the ``CI``
    environment variable is true (``1``, ``true``, ``yes``), else ``dev``.
    """
    register_profiles()
    if name is None:
        name = selected_profile()
    settings.load_profile(name)
    return name


def selected_profile() -> str:
    """The profile :func:`load_profile` loads without a name, from the environment:
    ``CURVLIB_HYPOTHESIS_PROFILE`` if set, else ``ci`` when ``CI`` is ``1``, ``true`` or
    ``yes``, else ``dev``."""
    return os.environ.get("CURVLIB_HYPOTHESIS_PROFILE") or (
        "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
    )


# -- single-layer cases for the layer-plugin contract (curvlib.testing.contract) ------------


def _case(description: str, module: nn.Module, calls: list) -> LayerCase:
    from curvlib.testing.contract import LayerCase

    return LayerCase(description, module, tuple(calls))


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@st.composite
def linear_cases(draw: st.DrawFn, max_calls: int = 2) -> LayerCase:
    """``nn.Linear`` with or without bias, inputs ``(N, *, D)`` with 0–2 extra dimensions,
    called 1–``max_calls`` times in one forward (weight sharing; extra dims may differ)."""

    d_in, d_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    bias = draw(st.booleans())
    n = draw(batch_sizes(1, 4))
    seed = draw(seeds())
    n_calls = draw(st.integers(1, max_calls))
    extras = [tuple(draw(st.lists(st.integers(1, 3), max_size=2))) for _ in range(n_calls)]
    gen = _seeded_generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = nn.Linear(d_in, d_out, bias=bias).double()
    calls = [((_randn(gen, n, *e, d_in),), {}) for e in extras]
    desc = f"Linear({d_in}, {d_out}, bias={bias}) N={n} extra dims per call={extras}"
    return _case(desc, module, calls)


@st.composite
def conv_cases(draw: st.DrawFn, dims: tuple[int, ...] = (1, 2, 3), max_calls: int = 2
               ) -> LayerCase:
    """``nn.Conv{1,2,3}d`` over stride, padding (numbers, ``'same'``, ``'valid'``, every
    ``padding_mode``), dilation, groups and bias, called 1–``max_calls`` times (inputs of
    different spatial sizes)."""
    dim = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, 2))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_kind = draw(st.sampled_from(["numbers", "same", "valid"]))
    if padding_kind == "same":
        stride: tuple[int, ...] = (1,) * dim
        padding: Any = "same"
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
        padding = (tuple(draw(st.integers(0, 2)) for _ in range(dim))
                   if padding_kind == "numbers" else "valid")
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    n = draw(batch_sizes(1, 3))
    seed = draw(seeds())
    if padding == "same":
        pads = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    elif padding == "valid":
        pads = [0] * dim
    else:
        pads = [2 * p for p in padding]
    # inputs large enough for the kernel and for reflect padding (pad < side)
    low = [max(d * (k - 1) + 1 - p, max(p // 2, p - p // 2) + 1, 1)
           for k, d, p in zip(kernel, dilation, pads, strict=True)]
    n_calls = draw(st.integers(1, max_calls))
    sides = [tuple(draw(st.integers(lo, lo + 2)) for lo in low) for _ in range(n_calls)]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = conv(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias, padding_mode=mode).double()
    gen = _seeded_generator(seed)
    calls = [((_randn(gen, n, c_in, *s),), {}) for s in sides]
    desc = (f"Conv{dim}d({c_in}, {c_out}, kernel={kernel}, stride={stride}, padding={padding!r},"
            f" dilation={dilation}, groups={groups}, bias={bias}, padding_mode={mode!r}) "
            f"N={n} input sides per call={sides}")
    return _case(desc, module, calls)


class _Scale(nn.Module):
    """A parameter of its own and a child with parameters (only its own are its to handle)."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.inner = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


@st.composite
def generic_cases(draw: st.DrawFn) -> LayerCase:
    """Modules no built-in plugin handles: norms (LayerNorm, GroupNorm, BatchNorm in eval),
    Embedding, PReLU, Bilinear, transposed convolutions and a module with its own parameter
    and a child — the generic plugin's territory."""
    kind = draw(st.sampled_from(["layernorm", "groupnorm", "batchnorm_eval", "embedding",
                                 "prelu", "bilinear", "convtranspose1d", "convtranspose2d",
                                 "scale"]))
    n = draw(batch_sizes(1, 3))
    seed = draw(seeds())
    gen = _seeded_generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "layernorm":
            module, args = nn.LayerNorm(3), (_randn(gen, n, 2, 3),)
            with torch.no_grad():
                module.weight.normal_()
                module.bias.normal_()
        elif kind == "groupnorm":
            module, args = nn.GroupNorm(2, 4), (_randn(gen, n, 4, 3),)
        elif kind == "batchnorm_eval":
            module = nn.BatchNorm1d(3)
            with torch.no_grad():
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            module.eval()
            args = (_randn(gen, n, 3),)
        elif kind == "embedding":
            module = nn.Embedding(5, 3)
            args = (torch.randint(5, (n, 4), generator=gen),)
        elif kind == "prelu":
            module, args = nn.PReLU(3), (_randn(gen, n, 3, 2),)
        elif kind == "bilinear":
            module = nn.Bilinear(2, 3, 2)
            args = (_randn(gen, n, 2), _randn(gen, n, 3))
        elif kind == "convtranspose1d":
            module = nn.ConvTranspose1d(2, 3, 2, stride=2)
            args = (_randn(gen, n, 2, 3),)
        elif kind == "convtranspose2d":
            module = nn.ConvTranspose2d(2, 2, 2, groups=2)
            args = (_randn(gen, n, 2, 2, 3),)
        else:
            module, args = _Scale(3), (_randn(gen, n, 3),)
    module = module.double()
    return _case(f"{kind} N={n} seed={seed}", module, [(args, {})])
