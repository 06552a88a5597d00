"""The out-of-tree plugin package ``plugins/curvlib-poisson`` and curvlib's entry-point path.

The package must be installed (``pip install --no-deps -e plugins/curvlib-poisson``); without it
every test here fails with that instruction instead of skipping, because a skipped plugin test
would hide a broken plugin path.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import itertools
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlib
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close, check_likelihood

try:
    from hypothesis import given, settings

    from curvlib.testing import strategies
except ImportError:  # the strategies module is optional; fall back to fixed seeds
    strategies = None  # type: ignore[assignment]

DIST = "curvlib-poisson"
MODULE = "curvlib_poisson"
INSTALL = (
    f"the plugin package {DIST!r} is not installed; from the repository root run "
    f"`pip install --no-deps -e plugins/{DIST}` and then "
    f"`python -m pytest tests/test_plugin_package.py -q` (see plugins/{DIST}/README.md)"
)


def _plugin_problem() -> str | None:
    """Why the plugin cannot be tested, or ``None`` when it is installed with its entry point."""
    if importlib.util.find_spec(MODULE) is None:
        return INSTALL
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return f"{MODULE!r} is importable but not installed as a distribution: {INSTALL}"
    return None


def _require_plugin() -> None:
    """Fail (never skip) the calling test when the plugin package is missing.

    Every test calls this first, so a missing package shows up as test failures with the
    install instruction (a fixture would report setup errors instead).
    """
    problem = _plugin_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def _poisson() -> Any:
    """The likelihood as curvlib's registry resolves it (through the entry point)."""
    return curvlib.get("likelihood", "poisson")()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the plugin path ---------------------------------------------------------------------------


def test_entry_point_is_declared() -> None:
    _require_plugin()
    eps = metadata.entry_points(group=curvlib.registry.ENTRY_POINT_GROUP, name="poisson")
    assert [(ep.value, ep.dist.name if ep.dist else None) for ep in eps] == [(MODULE, DIST)]


def test_registered_with_the_distribution_as_origin() -> None:
    _require_plugin()
    assert curvlib.available()["likelihood"]["poisson"] == DIST
    cls = curvlib.get("likelihood", "poisson")
    import curvlib_poisson

    assert cls is curvlib_poisson.Poisson
    assert issubclass(cls, curvlib.Likelihood)
    assert isinstance(curvlib.as_likelihood("poisson"), curvlib_poisson.Poisson)


def test_fresh_interpreter_loads_the_plugin_without_importing_it() -> None:
    _require_plugin()
    # Nothing imports curvlib_poisson by name: the first registry lookup must do it.
    code = textwrap.dedent(
        f"""
        import sys
        import curvlib
        assert {MODULE!r} not in sys.modules
        print(curvlib.available("likelihood")["likelihood"]["poisson"])
        print(curvlib.get("likelihood", "poisson").__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [DIST, MODULE]


# --- the likelihood ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 2), (2, 2, 2)], ids=str)
def test_check_likelihood(shape: tuple[int, ...]) -> None:
    _require_plugin()
    outputs = 0.5 * torch.randn(shape, generator=_seeded(1), dtype=torch.float64)
    check_likelihood("poisson", outputs, generator=_seeded(2), canonical=True)


@pytest.mark.parametrize("shape", [(4,), (4, 3), (3, 2, 5)], ids=str)
def test_loss_matches_torch_poisson_nll(shape: tuple[int, ...]) -> None:
    _require_plugin()
    f = torch.randn(shape, generator=_seeded(3), dtype=torch.float64)
    y = _poisson().sample(f, generator=_seeded(4))
    torch_loss = nn.PoissonNLLLoss(log_input=True, full=False, reduction="none")(f, y)
    expected = torch_loss.reshape(shape[0], -1).sum(1)
    loss = _poisson().loss(f, y)
    assert loss.shape == (shape[0],)
    # 1e-12: the same elementwise formula summed in the same order; only round-off differs.
    assert_close(loss, expected, rtol=1e-12, what="Poisson loss and PoissonNLLLoss")
    # Integer counts are accepted too.
    assert_close(_poisson().loss(f, y.long()), expected, rtol=1e-12, what="integer targets")


def test_fisher_and_its_root_are_diagonal_exponentials() -> None:
    _require_plugin()
    f = torch.randn(2, 3, 2, generator=_seeded(5), dtype=torch.float64)
    lik = _poisson()
    assert_close(lik.fisher(f), torch.diag_embed(f.reshape(2, -1).exp()), rtol=1e-15)
    assert_close(lik.fisher_sqrt(f), torch.diag_embed(f.reshape(2, -1).mul(0.5).exp()),
                 rtol=1e-15)


def test_sample_shape_dtype_and_mean() -> None:
    _require_plugin()
    f = torch.tensor([[-1.0, 0.0, 1.5]], dtype=torch.float64).expand(20_000, 3)
    y = _poisson().sample(f, generator=_seeded(6))
    assert y.shape == f.shape and y.dtype == f.dtype and not y.requires_grad
    assert torch.equal(y, y.round()) and bool((y >= 0).all())
    rate = f[0].exp()
    # Mean of 20 000 Poisson draws: standard error sqrt(rate / 20 000); allow 5 of them.
    assert bool(((y.mean(0) - rate).abs() <= 5 * (rate / 20_000).sqrt()).all())
    same = _poisson().sample(f, generator=_seeded(6))
    assert torch.equal(y, same), "a seeded generator must make sampling reproducible"


@pytest.mark.parametrize(
    ("outputs", "targets", "error", "match"),
    [
        (torch.tensor(0.5), torch.tensor(1.0), ValueError, "batch dimension"),
        (torch.ones(3, dtype=torch.long), torch.ones(3), TypeError, "floating point"),
        ([0.5, 1.0], torch.ones(2), TypeError, "torch.Tensor"),
        (torch.zeros(3, 2), torch.zeros(3), ValueError, r"outputs' shape \(3, 2\)"),
        (torch.zeros(3, 2), [[0, 1]] * 3, ValueError, "got list"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.bool), TypeError, "counts"),
    ],
    ids=["0-dim", "integer-outputs", "not-a-tensor", "target-shape", "target-list",
         "bool-targets"],
)
def test_clear_errors(outputs: Any, targets: Any, error: type[Exception], match: str) -> None:
    _require_plugin()
    with pytest.raises(error, match=match):
        _poisson().loss(outputs, targets)


def test_shape_errors_in_every_method() -> None:
    _require_plugin()
    lik = _poisson()
    for method in (lik.sample, lik.fisher, lik.fisher_sqrt):
        with pytest.raises(ValueError, match="poisson: outputs must have a batch dimension"):
            method(torch.tensor(0.5))


# --- against the oracles -----------------------------------------------------------------------


def _mlp(seed: int, sizes: tuple[int, ...]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        return nn.Sequential(*layers).double()


def _fisher_equals_ggn(model: nn.Module, inputs: Tensor, seed: int) -> None:
    lik = _poisson()
    with torch.no_grad():
        targets = lik.sample(model(inputs), generator=_seeded(seed))
    fisher = oracles.exact_fisher(model, "poisson", inputs)
    ggn = oracles.ggn(model, lik.loss, inputs, targets)
    assert_close(fisher, ggn, rtol=1e-10, what="exact Fisher and GGN (canonical link)")


@pytest.mark.parametrize("seed", range(4))
def test_exact_fisher_equals_ggn_fixed_seeds(seed: int) -> None:
    _require_plugin()
    gen = _seeded(100 + seed)
    depth = int(torch.randint(0, 3, (), generator=gen))
    sizes = tuple(int(s) for s in torch.randint(1, 5, (depth + 2,), generator=gen))
    batch = int(torch.randint(1, 6, (), generator=gen))
    inputs = torch.randn(batch, sizes[0], generator=gen, dtype=torch.float64)
    _fisher_equals_ggn(_mlp(seed, sizes), inputs, seed)


if strategies is not None:

    @settings(deadline=None)
    @given(
        spec=strategies.model_specs(kinds=("mlp",)),
        batch=strategies.batch_sizes(),
        seed=strategies.seeds(),
    )
    def _fisher_equals_ggn_drawn(spec: Any, batch: int, seed: int) -> None:
        _fisher_equals_ggn(spec.build(), spec.inputs(batch, seed), seed)

    def test_exact_fisher_equals_ggn_hypothesis() -> None:
        """Random small MLPs from ``curvlib.testing.strategies`` (the loaded profile's count)."""
        _require_plugin()
        _fisher_equals_ggn_drawn()


def test_per_sample_grads_under_vmap_match_a_loop() -> None:
    _require_plugin()
    # oracles.per_sample_grads runs Poisson.loss under torch.func.vmap(grad(...)).
    model = _mlp(7, (3, 4, 2))
    inputs = torch.randn(4, 3, generator=_seeded(8), dtype=torch.float64)
    lik = _poisson()
    with torch.no_grad():
        targets = lik.sample(model(inputs), generator=_seeded(9))
    expected = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        lik.loss(model(x.unsqueeze(0)), y.unsqueeze(0)).sum().backward()
        expected.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close(oracles.per_sample_grads(model, "poisson", inputs, targets),
                 torch.stack(expected), what="per-sample gradients")
