r"""The BackPACK backend (``curvlib.backends.backpack``) against curvlib and the dense oracles.

BackPACK is an independent implementation, so agreement to float64 round-off with curvlib's own
path *and* with the :mod:`torch.func` oracles is evidence that all three are right.

* Data targets: rows equal ``curvlib.per_sample_grads(backend="curvlib")`` and
  ``oracles.per_sample_grads`` to ``1e-10`` (norm-wise, relative), on MLPs and Conv1d/2d/3d
  CNNs (bias or not, strides, paddings, dilations, groups), every likelihood; ``gram`` too.
* Sampled targets (BackPACK's ``SqrtGGNMC``): exact structural checks — a categorical row is
  the gradient of *some* class label (all classes enumerated with the oracle), a Bernoulli row
  that of label 0 or 1, a Gaussian row lies in the range of ``J_nᵀ`` (the gradient of some
  target) — then an exact check of the documented conversion against BackPACK 1.7's draws
  reproduced from the seed, and a statistical check that the MC Fisher of many rows approaches
  ``oracles.exact_fisher``.
* Reproducibility from the caller's generator, the global RNG untouched, the user's model and
  ``.grad`` untouched, and clear errors for what BackPACK cannot do.

Sampled-target models use the activations BackPACK's second-order rules know (Tanh, ReLU,
Sigmoid); data targets use all of the strategies' activations (BatchGrad needs rules only for
modules with parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack, extend
from backpack.context import CTX
from backpack.extensions import BatchGrad, SqrtGGNMC
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import curvlib
from curvlib.backends import backpack as bp_backend
from curvlib.likelihoods import Gaussian, Likelihood
from curvlib.sources import Empirical, GramSource, SourceError, TrueFisher
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import (
    BUILTIN_LIKELIHOODS,
    ModelSpec,
    Problem,
    batch_sizes,
    make_targets,
    model_specs,
    problems,
    seeds,
)

# Raw BackPACK runs below (pinning its limitations) hook a first layer whose inputs need no
# gradient; torch warns about that, harmlessly (BackPACK needs only the output gradient).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing when gradients are computed:UserWarning"
)

F64 = torch.float64
#: Activations BackPACK's SqrtGGNMC has rules for (it has none for GELU and Softplus).
SECOND_ORDER_ACTIVATIONS = ("tanh", "relu", "sigmoid")
FIX = re.escape("backend='curvlib'")


def backpack_grads(model, likelihood, inputs, targets=None, **kwargs):
    return curvlib.per_sample_grads(model, likelihood, inputs, targets, backend="backpack",
                                    **kwargs)


def flat(grads: dict[str, Tensor]) -> Tensor:
    """Rows ``(R, P)``: the per-parameter results concatenated in model order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_layout(got: dict[str, Tensor], model: nn.Module, rows: int) -> None:
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert list(got) == list(shapes)
    for name, g in got.items():
        assert g.shape == (rows, *shapes[name]), name
        assert g.dtype == F64


def assert_each_close(got: dict[str, Tensor], expected: dict[str, Tensor], what: str) -> None:
    """Per parameter to 1e-10 relative; parameters whose gradient vanishes (dead ReLUs) are
    compared with an absolute tolerance of round-off relative to all parameters together."""
    scale = torch.linalg.vector_norm(flat(expected)).item()
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14 * scale,
                     what=f"{what}: {name}")


# ------------------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class Case:
    """A model with inputs and data targets that prints as its description."""

    description: str
    likelihood: str
    model: nn.Module = field(repr=False, compare=False)
    inputs: Tensor = field(repr=False, compare=False)
    targets: Tensor = field(repr=False, compare=False)


ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


@st.composite
def conv_cases(draw, likelihoods=BUILTIN_LIKELIHOODS, dims=(1, 2, 3)) -> Case:
    """``ConvNd`` (1–3 d) with groups, dilation, stride, zero padding, bias or not; then an
    activation, ``Flatten`` and ``Linear``."""
    dim = draw(st.sampled_from(dims))
    likelihood = draw(st.sampled_from(likelihoods))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(dim))
    bias = draw(st.booleans())
    act = draw(st.sampled_from(SECOND_ORDER_ACTIVATIONS))
    k_out = draw(st.integers(2 if likelihood == "categorical" else 1, 3))
    n = draw(batch_sizes(1, 3))
    seed = draw(seeds())
    low = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding,
                                                              strict=True)]
    sides = tuple(draw(st.integers(lo, lo + 2)) for lo in low)
    out_sides = [(s + 2 * p - d * (k - 1) - 1) // st_ + 1
                 for s, p, d, k, st_ in zip(sides, padding, dilation, kernel, stride,
                                            strict=True)]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            conv(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, bias=bias),
            ACT[act](),
            nn.Flatten(),
            nn.Linear(c_out * math.prod(out_sides), k_out, bias=bias),
        ).to(F64)
    inputs = torch.randn((n, c_in, *sides), generator=gen(seed), dtype=F64)
    targets = make_targets(likelihood, (k_out,), n, seed + 1)
    desc = (f"Conv{dim}d({c_in}, {c_out}, kernel={kernel}, stride={stride}, padding={padding},"
            f" dilation={dilation}, groups={groups}, bias={bias}) {act} -> Linear(., {k_out})"
            f" {likelihood} N={n} input sides={sides} seed={seed}")
    return Case(desc, likelihood, model, inputs, targets)


@st.composite
def sampled_problems(draw, likelihood: str, spatial_output: bool | None = False) -> Problem:
    """Problems BackPACK's SqrtGGNMC handles: its activations; one output for Bernoulli."""
    spec = draw(model_specs(activations=SECOND_ORDER_ACTIVATIONS, spatial_output=spatial_output,
                            min_out=2 if likelihood == "categorical" else 1))
    if likelihood == "bernoulli":  # BackPACK: sampled BCE needs one output per sample
        spec = dataclasses.replace(spec, out_features=1, spatial_output=False)
    return Problem.make(spec, likelihood, draw(batch_sizes(1, 4)), draw(seeds()))


def true_fisher(s: int) -> TrueFisher:
    return TrueFisher(num_samples=s, per_sample=True)


# ---------------------------------------------------------------------------- data targets


@given(problems())
def test_data_targets_equal_curvlib_and_the_oracle(problem):
    m, lik, x, y = problem.model, problem.likelihood, problem.inputs, problem.targets
    got = backpack_grads(m, lik, x, y)
    assert_same_layout(got, m, problem.batch_size)
    assert_each_close(got, curvlib.per_sample_grads(m, lik, x, y, backend="curvlib"),
                      "BackPACK vs curvlib")
    assert_close(flat(got), oracles.per_sample_grads(m, lik, x, y), what="BackPACK vs oracle")
    gram = curvlib.gram(m, lik, x, y, backend="backpack")
    assert_each_close(gram, curvlib.gram(m, lik, x, y), "Gram, BackPACK vs curvlib")


@given(conv_cases())
def test_data_targets_on_convolutions_with_groups_dilation_and_3d(case):
    m, lik, x, y = case.model, case.likelihood, case.inputs, case.targets
    for source in ("empirical", GramSource(), Empirical()):
        got = backpack_grads(m, lik, x, y, source=source)
        assert_same_layout(got, m, x.shape[0])
        assert_each_close(got, curvlib.per_sample_grads(m, lik, x, y, source=source),
                          "BackPACK vs curvlib")
    assert_close(flat(got), oracles.per_sample_grads(m, lik, x, y), what="BackPACK vs oracle")


def test_frozen_and_unused_parameters_as_curvlib():
    """Frozen parameters are left out; a module that is never called gets zero rows."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.unused = nn.Linear(2, 2)
            self.frozen = nn.Linear(4, 2).requires_grad_(False)

        def forward(self, x):
            return self.frozen(torch.tanh(self.a(x)))  # functional ops are fine for BatchGrad

    model = Net().to(F64)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    got = backpack_grads(model, "gaussian", x, y)
    assert list(got) == ["a.weight", "a.bias", "unused.weight", "unused.bias"]
    assert not got["unused.weight"].any() and got["unused.weight"].shape == (5, 2, 2)
    assert_each_close(got, curvlib.per_sample_grads(model, "gaussian", x, y), "frozen/unused")


def test_float32_results_stay_float32():
    p = Problem.make(ModelSpec("cnn1d", (2, 6), (3,), 3, "tanh", seed=3), "categorical", 4, 5,
                     dtype=torch.float32)
    got = backpack_grads(p.model, p.likelihood, p.inputs, p.targets)
    assert all(g.dtype == torch.float32 for g in got.values())
    # float32 round-off, not the float64 standard
    assert_close(flat(got), oracles.per_sample_grads(p.model, p.likelihood, p.inputs,
                                                     p.targets), rtol=1e-5)


def test_batchnorm_in_eval_mode_and_custom_containers_are_supported():
    class Block(nn.Module):  # a container that is not nn.Sequential, made of modules only
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.ReLU()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))

        def forward(self, x):
            return self.head(self.act(self.bn(self.conv(x))))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Block().to(F64)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = torch.randn(4, 2, 4, dtype=F64), torch.randint(3, (4,))
    got = backpack_grads(model, "categorical", x, y)
    assert_close(flat(got), oracles.per_sample_grads(model, "categorical", x, y))
    rows = flat(backpack_grads(model, "categorical", x, source=true_fisher(2),
                               generator=gen(0)))
    assert_rows_are_gradients_of_candidates(rows, class_gradients(model, "categorical", x, 3))


# ------------------------------------------------------------------------- sampled targets


def class_gradients(model, likelihood, x, num_classes):
    """``(C, N, P)``: per-sample gradients with every sample labelled ``c``."""
    shape = (x.shape[0], 1) if likelihood == "bernoulli" else (x.shape[0],)
    dtype = F64 if likelihood == "bernoulli" else torch.long
    return torch.stack([oracles.per_sample_grads(model, likelihood, x,
                                                 torch.full(shape, c, dtype=dtype))
                        for c in range(num_classes)])


def assert_rows_are_gradients_of_candidates(rows: Tensor, candidates: Tensor) -> None:
    """Row ``s·N + n`` equals one of ``candidates[:, n]`` (1e-10 of the largest candidate)."""
    n = candidates.shape[1]
    assert rows.shape[0] % n == 0
    for r in range(rows.shape[0]):
        cand = candidates[:, r % n]
        err = torch.linalg.vector_norm(cand - rows[r], dim=1).min().item()
        scale = torch.linalg.vector_norm(cand, dim=1).max().item()
        assert err <= 1e-10 * scale, (
            f"row {r} (sample {r % n}) is no candidate's gradient: distance {err:.3e}, "
            f"scale {scale:.3e}"
        )


@given(sampled_problems("categorical"), st.integers(1, 3), seeds())
def test_sampled_categorical_rows_are_gradients_of_some_class(problem, s, seed):
    m, x = problem.model, problem.inputs
    got = backpack_grads(m, "categorical", x, source=true_fisher(s), generator=gen(seed))
    assert_same_layout(got, m, s * problem.batch_size)
    candidates = class_gradients(m, "categorical", x, problem.spec.out_features)
    assert_rows_are_gradients_of_candidates(flat(got), candidates)


@pytest.mark.parametrize("spec", [
    ModelSpec("cnn1d", (2, 4), (3,), 2, "tanh", kernel=2, spatial_output=True, seed=1),
    ModelSpec("cnn2d", (1, 3, 3), (2,), 2, "relu", kernel=2, spatial_output=True, seed=2),
], ids=["cnn1d-3-positions", "cnn2d-2x2-positions"])
def test_sampled_categorical_with_positions_are_gradients_of_some_labelling(spec):
    """Spatial outputs: each row is the gradient of one joint labelling of all positions."""
    p = Problem.make(spec, "categorical", 3, 7)
    positions = spec.feature_shape()
    labellings = itertools.product(range(spec.out_features), repeat=math.prod(positions))
    candidates = torch.stack([
        oracles.per_sample_grads(p.model, "categorical", p.inputs,
                                 torch.tensor(lab).reshape(positions).expand(3, *positions))
        for lab in labellings
    ])
    rows = flat(backpack_grads(p.model, "categorical", p.inputs, source=true_fisher(4),
                               generator=gen(0)))
    assert_rows_are_gradients_of_candidates(rows, candidates)


@given(sampled_problems("bernoulli"), st.integers(1, 3), seeds())
def test_sampled_bernoulli_rows_are_gradients_of_label_0_or_1(problem, s, seed):
    m, x = problem.model, problem.inputs
    source = GramSource(targets="sampled", num_samples=s)
    got = backpack_grads(m, "bernoulli", x, source=source, generator=gen(seed))
    assert_same_layout(got, m, s * problem.batch_size)
    assert_rows_are_gradients_of_candidates(flat(got), class_gradients(m, "bernoulli", x, 2))


@given(sampled_problems("gaussian", spatial_output=None), st.integers(1, 3), seeds())
def test_sampled_gaussian_rows_are_gradients_of_some_target(problem, s, seed):
    """Row ``s·N + n`` is ``J_nᵀ u`` for some ``u``: the gradient of ``½‖f_n − y‖²`` at
    ``y = f_n − u``. ``u`` by least squares; the residual must be round-off (backward error
    relative to ``‖J_n‖ ‖u‖``, since ``J_n`` may be ill-conditioned)."""
    m, x, n = problem.model, problem.inputs, problem.batch_size
    rows = flat(backpack_grads(m, "gaussian", x, source=true_fisher(s), generator=gen(seed)))
    assert rows.shape[0] == s * n
    jac = oracles.jacobians(m, x)  # (N, K, P)
    a = jac.repeat(s, 1, 1).mT  # (S·N, P, K): J_nᵀ for row s·N + n
    u = torch.linalg.lstsq(a, rows.unsqueeze(-1), driver="gelsd").solution
    residual = torch.linalg.vector_norm((a @ u).squeeze(-1) - rows, dim=1)
    bound = torch.linalg.matrix_norm(a) * torch.linalg.vector_norm(u.squeeze(-1), dim=1)
    assert (residual <= 1e-10 * bound + 1e-300).all(), (residual / bound).max()


def _reference_targets(likelihood: str, f: Tensor, s: int, seed: int) -> Tensor:
    """BackPACK 1.7's draws for outputs ``f``, reproduced from the seed, as our targets.

    BackPACK draws (in ``_compute_sampled_grads_manual``, one ``sample([S])`` call, the only
    use of the random generator in the backward pass) ``ỹ ~ Categorical(softmax(f))``,
    ``ỹ ~ Binomial(1, σ(f))`` or ``ỹ ~ N(f, ½ I)``; the documented targets of our rows are
    ``ỹ``, ``ỹ`` and ``f + √2 (ỹ − f)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if likelihood == "categorical":
            dist = torch.distributions.Categorical(probs=f.softmax(1).movedim(1, -1))
            return dist.sample(torch.Size([s]))
        if likelihood == "bernoulli":
            return torch.distributions.Binomial(probs=f.sigmoid()).sample(torch.Size([s]))
        draw = torch.distributions.Normal(f, torch.tensor(math.sqrt(0.5))).sample(
            torch.Size([s]))
        return f + math.sqrt(2) * (draw - f)


@pytest.mark.parametrize(("likelihood", "spec"), [
    ("categorical", ModelSpec("mlp", (3,), (4,), 3, "tanh", seed=0)),
    ("categorical", ModelSpec("cnn1d", (2, 5), (2,), 3, "relu", spatial_output=True, seed=1)),
    ("bernoulli", ModelSpec("mlp", (3,), (4,), 1, "sigmoid", seed=2)),
    ("gaussian", ModelSpec("mlp", (3,), (4,), 2, "tanh", seed=3)),
    ("gaussian", ModelSpec("cnn2d", (1, 3, 3), (2,), 2, "tanh", spatial_output=True, seed=4)),
])
def test_sampled_rows_are_the_documented_gradients_of_backpacks_draws(likelihood, spec):
    """Pins BackPACK 1.7's sampled vectors and our conversion of them, sign included.

    The draws are reproduced from the seed the backend takes from the generator; this depends
    on BackPACK's sampling code. If BackPACK changes it, this test fails while the
    version-independent checks above (enumeration, range, statistics) still hold: re-derive
    the conversion in ``per_sample_grads``'s docstring, then update ``_reference_targets``.
    """
    p, s = Problem.make(spec, likelihood, 3, 11), 4
    rows = flat(backpack_grads(p.model, likelihood, p.inputs, source=true_fisher(s),
                               generator=gen(5)))
    seed = bp_backend._draw_seed(gen(5))
    f = p.model(p.inputs).detach()
    if likelihood != "categorical":
        f = f.flatten(1)  # the backend's nn.Flatten before MSELoss / BCEWithLogitsLoss
    targets = _reference_targets(likelihood, f, s, seed)
    if likelihood != "categorical":
        targets = targets.reshape(s, 3, *spec.output_shape())
    expected = torch.cat([oracles.per_sample_grads(p.model, likelihood, p.inputs, t)
                          for t in targets])
    assert_close(rows, expected, what=f"sampled rows vs BackPACK's reproduced draws ({likelihood})")


FISHER_CASES = [
    ("categorical", ModelSpec("mlp", (3,), (3,), 3, "tanh", seed=0)),
    ("categorical", ModelSpec("cnn1d", (2, 4), (2,), 2, "sigmoid", spatial_output=True, seed=1)),
    ("bernoulli", ModelSpec("cnn1d", (1, 5), (2,), 1, "tanh", seed=2)),
    ("gaussian", ModelSpec("mlp", (2,), (3,), 2, "relu", seed=3)),
    ("gaussian", ModelSpec("cnn2d", (1, 3, 3), (2,), 1, "tanh", spatial_output=True, seed=4)),
]


@pytest.mark.parametrize(("likelihood", "spec"), FISHER_CASES)
def test_mc_fisher_of_sampled_rows_approaches_the_exact_fisher(likelihood, spec):
    """``F̂ = VᵀV/(S·N)`` from ``S = 4000`` draws per sample against ``oracles.exact_fisher``.

    Tolerance: ``F̂ − F = (1/N) Σ_n (1/S) Σ_s (g g ᵀ − F_n)`` with ``F_n = J_nᵀ Λ_n J_n`` the
    exact per-sample Fisher, a mean of independent zero-mean terms, so
    ``E‖F̂ − F‖²_F = σ² = (1/(N² S)) Σ_n E‖g gᵀ − F_n‖²_F``; we estimate ``σ²`` from the same
    draws and require ``‖F̂ − F‖_F ≤ 5 σ̂``. By Markov's inequality a correct implementation
    fails with probability at most 1/25 for a random seed (far less in practice: the squared
    error is a sum of many terms), and the seed is fixed, so the test is deterministic. We
    also assert ``5 σ̂ < 0.25 ‖F‖_F``: a wrong scale of the rows by a factor √2 (or a wrong
    ``√S``) would move ``F̂`` by at least ``‖F‖_F`` and be caught.
    """
    s, n = 4000, 3
    p = Problem.make(spec, likelihood, n, 21)
    rows = flat(backpack_grads(p.model, likelihood, p.inputs, source=true_fisher(s),
                               generator=gen(2024)))
    fisher = oracles.exact_fisher(p.model, likelihood, p.inputs)
    estimate = rows.T @ rows / (s * n)
    per_sample = torch.stack([oracles.exact_fisher(p.model, likelihood, p.inputs[i:i + 1])
                              for i in range(n)])  # F_n
    g = rows.reshape(s, n, -1)
    # ‖g gᵀ − F_n‖² = ‖g‖⁴ − 2 gᵀ F_n g + ‖F_n‖²
    sq = (g.pow(2).sum(-1).pow(2) - 2 * torch.einsum("snp,npq,snq->sn", g, per_sample, g)
          + per_sample.pow(2).sum((-1, -2)))
    sigma = math.sqrt(sq.mean(0).sum().item() / (n * n * s))
    err = torch.linalg.matrix_norm(estimate - fisher).item()
    norm = torch.linalg.matrix_norm(fisher).item()
    assert 5 * sigma < 0.25 * norm, "too few draws for the check to have power"
    assert err <= 5 * sigma, f"‖F̂ − F‖ = {err:.3e} > 5σ̂ = {5 * sigma:.3e} (‖F‖ = {norm:.3e})"


@given(sampled_problems("categorical"), st.integers(1, 2), seeds())
def test_sampled_gram_is_the_gram_of_the_rows(problem, s, seed):
    m, x = problem.model, problem.inputs
    source = GramSource(targets="sampled", num_samples=s)
    grams = curvlib.gram(m, "categorical", x, source=source, generator=gen(seed),
                         backend="backpack")
    rows = backpack_grads(m, "categorical", x, source=source, generator=gen(seed))
    for name, g in rows.items():
        v = g.reshape(g.shape[0], -1)
        assert grams[name].shape == (s * problem.batch_size,) * 2
        assert_close(grams[name], v @ v.T, what=name)


@given(conv_cases(likelihoods=("categorical",)), st.integers(1, 2), seeds())
def test_sampled_categorical_on_convolutions_with_groups_dilation_and_3d(case, s, seed):
    m, x = case.model, case.inputs
    rows = flat(backpack_grads(m, "categorical", x, source=true_fisher(s), generator=gen(seed)))
    k = m[-1].out_features
    assert_rows_are_gradients_of_candidates(rows, class_gradients(m, "categorical", x, k))


# -------------------------------------------------------------------------- reproducibility


@given(st.sampled_from(["categorical", "bernoulli", "gaussian"]).flatmap(
    lambda lik: st.tuples(st.just(lik), sampled_problems(lik))), st.integers(1, 3), seeds())
def test_same_generator_state_gives_the_same_rows_and_the_global_rng_is_untouched(
        drawn, s, seed):
    likelihood, problem = drawn
    m, x = problem.model, problem.inputs
    state = torch.random.get_rng_state()
    first = backpack_grads(m, likelihood, x, source=true_fisher(s), generator=gen(seed))
    second = backpack_grads(m, likelihood, x, source=true_fisher(s), generator=gen(seed))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_generator_advances_and_without_one_the_global_rng_is_used():
    p = Problem.make(ModelSpec("mlp", (3,), (4,), 2, "tanh", seed=0), "gaussian", 4, 1)
    g = gen(0)
    first = flat(backpack_grads(p.model, "gaussian", p.inputs, source="true_fisher",
                                generator=g))
    again = flat(backpack_grads(p.model, "gaussian", p.inputs, source="true_fisher",
                                generator=g))
    assert first.shape == (4, 3 * 4 + 4 + 4 * 2 + 2)
    assert not torch.equal(first, again)  # a new seed from the advanced generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        a = flat(backpack_grads(p.model, "gaussian", p.inputs, source="true_fisher"))
        torch.manual_seed(3)
        b = flat(backpack_grads(p.model, "gaussian", p.inputs, source="true_fisher"))
    assert torch.equal(a, b)


# --------------------------------------------------------------------- the model untouched


def snapshot(model: nn.Module) -> dict:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_always_called", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {
        name: (sorted(vars(module)),
               {h: dict(getattr(module, h, {})) for h in hooks},
               {k: v.clone() for k, v in module.state_dict(keep_vars=False).items()})
        for name, module in model.named_modules()
    }


def assert_snapshot_equal(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        keys_b, hooks_b, state_b = before[name]
        keys_a, hooks_a, state_a = after[name]
        assert keys_a == keys_b, f"module {name!r}: attributes {set(keys_a) ^ set(keys_b)}"
        assert hooks_a == hooks_b, f"module {name!r}: hooks changed"
        for k in state_b:
            assert torch.equal(state_a[k], state_b[k]), f"{name}.{k}"


@pytest.mark.parametrize("call", ["data", "sampled", "sampled-unsupported"])
def test_the_users_model_grads_inputs_and_backpacks_hook_list_are_untouched(call):
    act = nn.GELU() if call == "sampled-unsupported" else nn.Tanh()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 3, 2), act, nn.Flatten(), nn.Linear(9, 3)).to(F64)
    x = torch.randn(4, 2, 4, dtype=F64, requires_grad=True)
    y = torch.randint(3, (4,))
    sentinels = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 7.0)
        sentinels[name] = p.grad
    before, handles = snapshot(model), len(CTX.hook_handles)
    if call == "data":
        backpack_grads(model, "categorical", x, y)
    elif call == "sampled":
        backpack_grads(model, "categorical", x, source=true_fisher(2), generator=gen(0))
    else:
        with pytest.raises(NotImplementedError, match="GELU"):
            backpack_grads(model, "categorical", x, source=true_fisher(2), generator=gen(0))
    assert_snapshot_equal(before, snapshot(model))
    assert len(CTX.hook_handles) == handles, "BackPACK's global hook list grew"
    assert x.grad is None
    for name, p in model.named_parameters():
        assert p.grad is sentinels[name] and (p.grad == 7.0).all(), name
    for module in model.modules():
        assert not hasattr(module, "input0") and not hasattr(module, "output")
        assert not getattr(module, "_backpack_extend", False)


# ---------------------------------------------------------------------------------- errors


def _mlp(*middle: nn.Module, d_out: int = 3) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), *middle, nn.Linear(4, d_out)).to(F64)


X = torch.randn(4, 3, dtype=F64, generator=gen(0))
Y_CLASS = torch.randint(3, (4,), generator=gen(1))


def test_layer_with_parameters_and_no_backpack_rule_is_refused():
    model = _mlp(nn.LayerNorm(4))
    with pytest.raises(NotImplementedError, match=r"module '1' \(LayerNorm\).*BatchGrad.*" + FIX):
        backpack_grads(model, "categorical", X, Y_CLASS)
    with pytest.raises(NotImplementedError, match=r"module '1' \(LayerNorm\).*SqrtGGNMC"):
        backpack_grads(model, "categorical", X, source="true_fisher", generator=gen(0))


def test_parameter_free_module_without_second_order_rule_is_refused_for_sampled_targets():
    model = _mlp(nn.GELU())
    backpack_grads(model, "categorical", X, Y_CLASS)  # BatchGrad needs no rule for GELU
    with pytest.raises(NotImplementedError,
                       match=r"module '1' \(GELU\) is on the path.*SqrtGGNMC.*" + FIX):
        backpack_grads(model, "categorical", X, source="true_fisher", generator=gen(0))


class Poisson(Likelihood):
    """A plugin likelihood (log link): no BackPACK loss."""

    def loss(self, outputs, targets):
        return (outputs.exp() - targets * outputs).reshape(outputs.shape[0], -1).sum(1)

    def sample(self, outputs, generator=None):
        return torch.poisson(outputs.detach().exp(), generator=generator)

    def fisher(self, outputs):
        return torch.diag_embed(outputs.exp().reshape(outputs.shape[0], -1))

    def fisher_sqrt(self, outputs):
        return torch.diag_embed(outputs.exp().sqrt().reshape(outputs.shape[0], -1))


class ScaledGaussian(Gaussian):
    """A subclass may change the loss, so it has no BackPACK loss either."""


@pytest.mark.parametrize("likelihood", [Poisson(), ScaledGaussian()], ids=["plugin", "subclass"])
def test_likelihood_without_backpack_loss_is_refused(likelihood):
    with pytest.raises(NotImplementedError,
                       match=r"only likelihoods with a BackPACK loss.*" + FIX):
        backpack_grads(_mlp(), likelihood, X, torch.ones(4, 3, dtype=F64))


def test_sampled_bernoulli_with_several_outputs_is_refused():
    with pytest.raises(NotImplementedError, match=r"one output\s+per sample.*" + FIX):
        backpack_grads(_mlp(), "bernoulli", X, source="true_fisher", generator=gen(0))
    # data targets are fine with several outputs
    y = torch.randint(2, (4, 3), generator=gen(2)).to(F64)
    assert_close(flat(backpack_grads(_mlp(), "bernoulli", X, y)),
                 oracles.per_sample_grads(_mlp(), "bernoulli", X, y))


def test_backpack_still_rejects_sampled_bce_with_several_outputs():
    """Pins the BackPACK 1.7 limitation behind the refusal above. When this test fails,
    BackPACK supports it: drop the check in ``_summed_loss`` and extend the Bernoulli tests."""
    model, loss_fn = extend(copy.deepcopy(_mlp())), extend(nn.BCEWithLogitsLoss(reduction="sum"))
    out = model(X)
    with pytest.raises(NotImplementedError, match="scalar-valued"), backpack(SqrtGGNMC()):
        loss_fn(out, torch.zeros_like(out)).backward()


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # torch, inside BackPACK
@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(2, 3, 3, padding="same"),
], ids=["reflect", "circular", "same"])
def test_convolutions_backpack_gets_wrong_are_refused(conv):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 36, 2)).to(F64)
    x, y = torch.randn(3, 2, 6, 6, dtype=F64), torch.randn(3, 2, dtype=F64)
    with pytest.raises(NotImplementedError, match=r"module '0' \(Conv2d\).*padding.*" + FIX):
        backpack_grads(model, "gaussian", x, y)
    # ... because BackPACK 1.7 is silently wrong there (when this fails, lift the refusal)
    replica, loss_fn = extend(copy.deepcopy(model)), extend(nn.MSELoss(reduction="sum"))
    with backpack(BatchGrad()):
        loss_fn(replica(x), y).backward()
    raw = 0.5 * flat({n: p.grad_batch for n, p in replica.named_parameters()})
    expected = oracles.per_sample_grads(model, "gaussian", x, y)
    assert torch.linalg.vector_norm(raw - expected) > 1e-3 * torch.linalg.vector_norm(expected)


def test_module_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.out = nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.act(self.lin(self.act(self.lin(x)))))

    with pytest.raises(NotImplementedError, match=r"module 'lin' \(Linear\) is called 2 times"):
        backpack_grads(Twice().to(F64), "gaussian", X, torch.zeros(4, 2, dtype=F64))
    # a parameter-free module used twice matters only to the second-order rules
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 3)).to(F64)
    assert_close(flat(backpack_grads(model, "categorical", X, Y_CLASS)),
                 oracles.per_sample_grads(model, "categorical", X, Y_CLASS))
    with pytest.raises(NotImplementedError, match=r"module '1' \(Tanh\) is called 2 times"):
        backpack_grads(model, "categorical", X, source="true_fisher", generator=gen(0))


def test_shared_parameters_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 3)).to(F64)
    model[2].bias = model[0].bias  # tied
    with pytest.raises(NotImplementedError, match=r"'0.bias' is shared with '2.bias'.*" + FIX):
        backpack_grads(model, "categorical", X, Y_CLASS)


def test_batchnorm_with_batch_statistics_is_refused():
    model = _mlp(nn.BatchNorm1d(4))  # training mode
    with pytest.raises(NotImplementedError, match=r"\(BatchNorm1d\).*batch statistics.*eval"):
        backpack_grads(model, "categorical", X, Y_CLASS)


def test_parameters_of_a_module_with_children_are_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.scale = nn.Linear(3, 3), nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.inner(x) * self.scale

    with pytest.raises(NotImplementedError, match=r"module '<model>' \(Scale\) has parameters "
                                                  r"of its own \(scale\) and child modules"):
        backpack_grads(Scale().to(F64), "gaussian", X, torch.zeros(4, 3, dtype=F64))


def test_functional_operations_between_modules_are_refused_for_sampled_targets():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Functional().to(F64)
    assert_close(flat(backpack_grads(model, "categorical", X, Y_CLASS)),
                 oracles.per_sample_grads(model, "categorical", X, Y_CLASS))
    with pytest.raises(NotImplementedError, match=r"see only modules.*" + FIX):
        backpack_grads(model, "categorical", X, source="true_fisher", generator=gen(0))


def test_a_parameter_also_used_outside_its_module_fails_the_sum_check():
    """BatchGrad sees only the module's use of its weight; the backend's consistency check
    (rows must add up to autograd's gradient) turns the silent error into a refusal."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)

    with pytest.raises(NotImplementedError, match=r"'lin.weight'.*do not add up.*" + FIX):
        backpack_grads(Reuse().to(F64), "gaussian", X, torch.zeros(4, 3, dtype=F64))


def test_source_errors_match_curvlibs():
    with pytest.raises(SourceError, match="targets"):
        backpack_grads(_mlp(), "categorical", X)  # empirical without targets
    with pytest.raises(SourceError, match="per_sample_grads"):
        backpack_grads(_mlp(), "categorical", X, source=TrueFisher(num_samples=2))
    with pytest.raises(SourceError):
        curvlib.per_sample_grads(_mlp(), "categorical", X, source=TrueFisher(num_samples=2))
    with pytest.raises(ValueError, match="backend must be"):
        curvlib.per_sample_grads(_mlp(), "categorical", X, Y_CLASS, backend="nope")


# -------------------------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_cuda_matches_cpu_and_leaves_the_cuda_rng_alone(likelihood):
    spec = ModelSpec("cnn1d", (2, 5), (3,), 1 if likelihood == "bernoulli" else 3, "tanh",
                     seed=0)
    p = Problem.make(spec, likelihood, 4, 1)
    cuda = torch.device("cuda")
    model, x, y = copy.deepcopy(p.model).to(cuda), p.inputs.to(cuda), p.targets.to(cuda)
    got = backpack_grads(model, likelihood, x, y)
    assert all(g.device.type == "cuda" for g in got.values())
    assert_close(flat(got).cpu(), flat(backpack_grads(p.model, likelihood, p.inputs,
                                                      p.targets)))
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.random.get_rng_state()
    g1 = backpack_grads(model, likelihood, x, source=true_fisher(3), generator=gen(4))
    g2 = backpack_grads(model, likelihood, x, source=true_fisher(3),
                        generator=torch.Generator(device=cuda).manual_seed(4))
    g3 = backpack_grads(model, likelihood, x, source=true_fisher(3),
                        generator=torch.Generator(device=cuda).manual_seed(4))
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert torch.equal(torch.random.get_rng_state(), cpu_state)
    assert all(g.device.type == "cuda" and g.shape[0] == 12 for g in g1.values())
    assert torch.equal(flat(g2), flat(g3))
