"""The out-of-tree layer plugin ``plugins/curvlib-bilinear`` (``nn.Bilinear``), end to end.

The package must be installed (``pip install --no-deps -e plugins/curvlib-bilinear``, part of
the README's test command); without it every test here fails with that instruction instead of
skipping, because a skipped plugin test would hide a broken plugin path.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from torch import Tensor, nn

import curvlib
from curvlib.capture import Call
from curvlib.layers import LayerPluginError, plugin_for
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.contract import LayerCase, check_layer_plugin
from curvlib.testing.strategies import seeds

DIST = "curvlib-bilinear"
MODULE = "curvlib_bilinear"
INSTALL = (
    f"the plugin package {DIST!r} is not installed; from the repository root run "
    f"`pip install --no-deps -e plugins/{DIST}` and then "
    f"`python -m pytest tests/test_plugin_bilinear.py -q` (see plugins/{DIST}/README.md)"
)
METHODS = ("auto", "contract", "materialise")

# Load the entry points while this module is collected, before any test runs. The
# ``clean_registry`` fixture (tests/conftest.py) restores "plugins not loaded" after tests
# that run first (test_docs.py); the next lookup then finds the plugin module already
# imported, so its @register decorator does not run again and the plugin would be missing.
curvlib.registry.load_plugins()


def _plugin() -> Any:
    """The plugin module, or a test failure (never a skip) with the install instruction."""
    problem = None
    if importlib.util.find_spec(MODULE) is None:
        problem = INSTALL
    else:
        try:
            metadata.distribution(DIST)
        except metadata.PackageNotFoundError:
            problem = f"{MODULE!r} is importable but not installed as a distribution: {INSTALL}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    import curvlib_bilinear

    return curvlib_bilinear


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@st.composite
def bilinear_cases(draw: st.DrawFn, max_calls: int = 2) -> LayerCase:
    """``nn.Bilinear(I1, I2, O)`` with sizes 1–4, with or without bias, sometimes with the
    weight or the bias frozen, batch 1–4, called 1–``max_calls`` times in one forward with
    0–2 extra position dimensions per call (they may differ between calls) and ``input2``
    passed positionally or by keyword."""
    i1, i2, o = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    bias = draw(st.booleans())
    frozen = draw(st.sampled_from(["nothing", "weight", "bias"] if bias else ["nothing"]))
    n = draw(st.integers(1, 4))
    seed = draw(seeds())
    n_calls = draw(st.integers(1, max_calls))
    extras = [tuple(draw(st.lists(st.integers(1, 3), max_size=2))) for _ in range(n_calls)]
    keyword = [draw(st.booleans()) for _ in range(n_calls)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = nn.Bilinear(i1, i2, o, bias=bias).double()
    if frozen != "nothing":
        getattr(module, frozen).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for e, kw in zip(extras, keyword, strict=True):
        x1, x2 = _randn(gen, n, *e, i1), _randn(gen, n, *e, i2)
        calls.append(((x1,), {"input2": x2}) if kw else ((x1, x2), {}))
    desc = (f"Bilinear({i1}, {i2}, {o}, bias={bias}) frozen={frozen} N={n} "
            f"extra dims per call={extras} input2 by keyword={keyword}")
    return LayerCase(desc, module, tuple(calls))


# --- the contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_contract(method: str) -> None:
    """Per-sample gradients, Gram and weighted gradients against the autograd loop (1e-10)."""
    plugin = _plugin().BilinearPlugin(gram_method=method)
    check_layer_plugin(plugin, bilinear_cases())


def test_contraction_and_materialisation_agree_on_a_wider_layer() -> None:
    mod = _plugin()
    gen = torch.Generator().manual_seed(3)
    module = nn.Bilinear(6, 5, 7).double()
    x1, x2, z = _randn(gen, 5, 3, 6), _randn(gen, 5, 3, 5), _randn(gen, 5, 3, 7)
    calls = [Call((x1, x2), {}, None, z)]
    grams = {m: mod.BilinearPlugin(m).gram(module, calls)["weight"] for m in METHODS}
    assert_close(grams["contract"], grams["materialise"], rtol=1e-12, what="the two methods")
    assert_close(grams["auto"], grams["materialise"], rtol=1e-12, what="auto")


# --- the cost model --------------------------------------------------------------------------


def test_gram_costs_and_the_choice() -> None:
    mod = _plugin()
    n, t, i1, i2, o = 4, 2, 3, 5, 6
    costs = mod.gram_costs(n, t, i1, i2, o)
    assert costs["contract"] == (n * t) ** 2 * (o + i1 + i2 + 2)
    assert costs["materialise"] == n * t * (o * i1 * i2 + i1 * i2) + n * n * o * i1 * i2
    # a wide layer and few rows: the Khatri–Rao contraction; long sequences: materialise
    assert mod.choose_gram_method("auto", 8, 1, 64, 64, 64) == "contract"
    assert mod.choose_gram_method("auto", 8, 512, 2, 2, 2) == "materialise"
    # forced methods are returned as they are
    assert mod.choose_gram_method("contract", 8, 512, 2, 2, 2) == "contract"
    assert mod.choose_gram_method("materialise", 8, 1, 64, 64, 64) == "materialise"


def test_auto_avoids_an_intermediate_that_does_not_fit() -> None:
    mod = _plugin()
    # Contraction costs fewer multiply-adds here, but its (NT)² matrix is too large, while
    # the N·O·I1·I2 per-sample gradients fit.
    n, t, i1, i2, o = 2**14, 1, 16, 16, 16
    costs = mod.gram_costs(n, t, i1, i2, o)
    assert costs["contract"] < costs["materialise"]
    assert (n * t) ** 2 > mod.MAX_INTERMEDIATE >= n * o * i1 * i2
    assert mod.choose_gram_method("auto", n, t, i1, i2, o) == "materialise"


def test_unknown_gram_method_is_rejected() -> None:
    mod = _plugin()
    with pytest.raises(ValueError, match="gram_method must be 'auto', 'contract' or"):
        mod.BilinearPlugin("khatri-rao")


# --- registration and lookup -----------------------------------------------------------------


def test_entry_point_is_declared() -> None:
    _plugin()
    eps = metadata.entry_points(group=curvlib.registry.ENTRY_POINT_GROUP, name="bilinear")
    assert [(ep.value, ep.dist.name if ep.dist else None) for ep in eps] == [(MODULE, DIST)]


def test_registered_with_the_distribution_as_origin() -> None:
    mod = _plugin()
    assert curvlib.available("layer")["layer"]["bilinear"] == DIST
    assert curvlib.get("layer", "bilinear") is mod.BilinearPlugin


def test_plugin_for_finds_it_for_bilinear_and_subclasses() -> None:
    mod = _plugin()

    class MyBilinear(nn.Bilinear):
        pass

    assert isinstance(plugin_for(nn.Bilinear(2, 3, 4)), mod.BilinearPlugin)
    assert isinstance(plugin_for(MyBilinear(2, 3, 4)), mod.BilinearPlugin)
    assert nn.Bilinear in curvlib.layers.registered_layer_types()["bilinear"]


def test_fresh_interpreter_loads_the_plugin_without_importing_it() -> None:
    _plugin()
    # Nothing imports curvlib_bilinear by name: the first registry lookup must do it.
    code = textwrap.dedent(
        f"""
        import sys
        import torch
        import curvlib
        assert {MODULE!r} not in sys.modules
        print(curvlib.available()["layer"]["bilinear"])
        plugin = curvlib.layers.plugin_for(torch.nn.Bilinear(2, 3, 4))
        print(type(plugin).__module__.split(".")[0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [DIST, MODULE]


# --- through the whole pipeline --------------------------------------------------------------


class BilinearNet(nn.Module):
    """``out(tanh(bil(x, x²)))``, optionally with the bilinear layer called twice (shared)."""

    def __init__(self, d: int, h: int, k: int, shared: bool):
        super().__init__()
        self.bil = nn.Bilinear(d, d, h)
        self.out = nn.Linear(h, k)
        self.shared = shared

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.bil(x, x**2)
        if self.shared:
            hidden = hidden + self.bil(x**2, x)
        return self.out(torch.tanh(hidden))


# The oracles vmap nn.Bilinear, for which torch warns that it has no batching rule.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(
    ("shape", "d", "h", "shared", "path"),
    [
        ((3,), 4, 3, False, "contract"),
        ((3,), 4, 3, True, "contract"),
        ((2, 6), 2, 2, False, "materialise"),
        ((2, 3, 2), 2, 3, True, "materialise"),
    ],
    ids=["flat", "flat-shared", "sequence", "2d-positions-shared"],
)
def test_gram_and_per_sample_grads_equal_the_oracles(
    shape: tuple[int, ...], d: int, h: int, shared: bool, path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = _plugin()
    n, positions = shape[0], int(torch.Size(shape[1:]).numel()) * (2 if shared else 1)
    assert mod.choose_gram_method("auto", n, positions, d, d, h) == path  # both paths run

    used: list[str] = []
    for name in ("gram", "per_sample_grads"):
        original = getattr(mod.BilinearPlugin, name)

        def spy(self: Any, module: nn.Module, calls: Any, _f: Any = original,
                _name: str = name) -> Any:
            used.append(_name)
            return _f(self, module, calls)

        monkeypatch.setattr(mod.BilinearPlugin, name, spy)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = BilinearNet(d, h, 2, shared).double()
    gen = torch.Generator().manual_seed(12)
    x = _randn(gen, *shape, d)
    y = _randn(gen, *shape, 2)
    assert isinstance(plugin_for(model.bil), mod.BilinearPlugin)

    grads = curvlib.per_sample_grads(model, "gaussian", x, y)
    gram = curvlib.gram(model, "gaussian", x, y)
    assert "per_sample_grads" in used and "gram" in used, "the plugin was not used"

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert list(grads) == names and list(gram) == names
    expected = oracles.per_sample_grads(model, "gaussian", x, y)
    got = torch.cat([grads[name].reshape(n, -1) for name in names], 1)
    assert_close(got, expected, rtol=1e-10, what="per-sample gradients")
    start = 0
    for name, p in model.named_parameters():
        block = expected[:, start:start + p.numel()]
        start += p.numel()
        assert_close(gram[name], block @ block.T, rtol=1e-10, what=f"Gram of {name}")
    assert_close(sum(gram.values()), oracles.gram(model, "gaussian", x, y), rtol=1e-10,
                 what="Gram of all parameters")


# --- KFAC factors ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("frozen", ["nothing", "weight", "bias"])
def test_kfac_is_exact_for_one_sample_at_one_position(mode: str, frozen: str) -> None:
    mod = _plugin()
    gen = torch.Generator().manual_seed(5)
    module = nn.Bilinear(3, 2, 4).double()
    if frozen != "nothing":
        getattr(module, frozen).requires_grad_(False)
    calls = [Call((_randn(gen, 1, 3), _randn(gen, 1, 2)), {}, None, _randn(gen, 1, 4))]
    plugin = mod.BilinearPlugin()
    factors = plugin.kfac_factors(module, calls, mode=mode)
    grads = plugin.per_sample_grads(module, calls)
    g = torch.cat([grads[k].reshape(1, -1) for k in ("weight", "bias") if k in grads], 1)[0]
    assert factors.mode == mode and factors.groups == 1
    assert_close(factors.dense(), torch.outer(g, g), rtol=1e-12, what="B ⊗ A")


def test_kfac_reduce_is_exact_when_inputs_repeat_over_positions() -> None:
    mod = _plugin()
    gen = torch.Generator().manual_seed(6)
    module = nn.Bilinear(2, 3, 2).double()
    x1 = _randn(gen, 1, 1, 2).expand(1, 4, 2)
    x2 = _randn(gen, 1, 1, 3).expand(1, 4, 3)
    calls = [Call((x1, x2), {}, None, _randn(gen, 1, 4, 2))]
    plugin = mod.BilinearPlugin()
    grads = plugin.per_sample_grads(module, calls)
    g = torch.cat([grads["weight"].reshape(1, -1), grads["bias"]], 1)[0]
    assert_close(plugin.kfac_factors(module, calls, mode="reduce").dense(),
                 torch.outer(g, g), rtol=1e-12, what="reduce-mode B ⊗ A")


def test_kfac_expand_formula_over_samples_positions_and_calls() -> None:
    mod = _plugin()
    gen = torch.Generator().manual_seed(7)
    module = nn.Bilinear(2, 2, 3).double()
    calls = [Call((_randn(gen, 3, 2, 2), _randn(gen, 3, 2, 2)), {}, None, _randn(gen, 3, 2, 3)),
             Call((_randn(gen, 3, 2),), {"input2": _randn(gen, 3, 2)}, None, _randn(gen, 3, 3))]
    feats, zs = [], []
    for c in calls:
        x1, x2 = c.inputs[0], c.inputs[1] if len(c.inputs) > 1 else c.kwargs["input2"]
        f = torch.einsum("...i,...j->...ij", x1, x2).reshape(3, -1, 4)
        feats.append(torch.cat([f, torch.ones(*f.shape[:2], 1, dtype=f.dtype)], -1))
        zs.append(c.grad_output.reshape(3, -1, 3))
    xb, z = torch.cat(feats, 1).reshape(-1, 5), torch.cat(zs, 1).reshape(-1, 3)
    factors = mod.BilinearPlugin().kfac_factors(module, calls)
    assert_close(factors.input_cov[0], xb.T @ xb / xb.shape[0], rtol=1e-12, what="A")
    assert_close(factors.grad_cov[0], z.T @ z / 3, rtol=1e-12, what="B")
    with pytest.raises(ValueError, match="KFAC mode"):
        mod.BilinearPlugin().kfac_factors(module, calls, mode="sideways")


# --- dtypes and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "work"), [(torch.float16, torch.float32),
                                              (torch.float32, torch.float32),
                                              (torch.float64, torch.float64)])
def test_results_are_in_the_working_dtype(dtype: torch.dtype, work: torch.dtype) -> None:
    mod = _plugin()
    gen = torch.Generator().manual_seed(8)
    module = nn.Bilinear(2, 3, 2)
    calls = [Call(tuple(_randn(gen, 3, k).to(dtype) for k in (2, 3)), {}, None,
                  _randn(gen, 3, 2).to(dtype))]
    for method in METHODS:
        plugin = mod.BilinearPlugin(method)
        vectors = {k: torch.ones(p.shape, dtype=torch.float64)
                   for k, p in module.named_parameters()}
        for result in (plugin.per_sample_grads(module, calls), plugin.gram(module, calls),
                       plugin.weighted_grads(module, calls, torch.ones(3, dtype=dtype)),
                       plugin.weighted_grads(module, calls, torch.ones(3, dtype=torch.float64),
                                             params=["weight"]),
                       plugin.row_dots(module, calls, vectors)):
            assert {v.dtype for v in result.values()} == {work}


def _call(x1: Tensor, x2: Tensor | None, z: Tensor | None, keyword: bool = False) -> Call:
    if x2 is None:
        return Call((x1,), {}, None, z)
    return Call((x1,), {"input2": x2}, None, z) if keyword else Call((x1, x2), {}, None, z)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_call(torch.randn(2), torch.randn(3), torch.randn(2)), "no batch dimension"),
        (_call(torch.randn(2, 2), torch.randn(1, 3), torch.randn(2, 2)), "must agree"),
        (_call(torch.randn(2, 2), torch.randn(2, 3), torch.randn(2, 5, 2)), "must agree"),
        (_call(torch.randn(2, 2), None, torch.randn(2, 2)), "second input"),
        (Call((), {"input1": torch.randn(2, 2), "input2": torch.randn(2, 3)}, None,
              torch.randn(2, 2)), "positional first input"),
        (_call(torch.randn(2, 2), torch.randn(2, 3), None), "no output gradient"),
    ],
    ids=["unbatched", "batch-mismatch", "z-mismatch", "no-input2", "input1-keyword", "no-z"],
)
def test_clear_errors(call: Call, match: str) -> None:
    plugin = _plugin().BilinearPlugin()
    module = nn.Bilinear(2, 3, 2)

    def row_dots(module: nn.Module, calls: list[Call]) -> Any:
        return plugin.row_dots(module, calls, {"weight": torch.zeros(2, 2, 3)})

    for method in (plugin.per_sample_grads, plugin.gram, row_dots):
        with pytest.raises(LayerPluginError, match=match):
            method(module, [call])


def test_coefficients_must_match_the_batch() -> None:
    plugin = _plugin().BilinearPlugin()
    call = _call(torch.randn(3, 2), torch.randn(3, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3,\)"):
        plugin.weighted_grads(nn.Bilinear(2, 3, 2), [call], torch.ones(4))
    with pytest.raises(LayerPluginError, match="not called"):
        plugin.weighted_grads(nn.Bilinear(2, 3, 2), [], torch.ones(3))


def test_row_dots_by_contraction_equal_the_materialising_default() -> None:
    """The contraction ``Σ_t z V x1 x2`` equals the base class's materialised ``⟨g_n, v⟩``,
    over two calls, for one parameter or both."""
    mod = _plugin()
    gen = torch.Generator().manual_seed(5)
    module = nn.Bilinear(3, 4, 2).double()
    calls = [Call((_randn(gen, 5, 2, 3), _randn(gen, 5, 2, 4)), {}, None, _randn(gen, 5, 2, 2)),
             Call((_randn(gen, 5, 3),), {"input2": _randn(gen, 5, 4)}, None, _randn(gen, 5, 2))]
    vectors = {"weight": _randn(gen, 2, 3, 4), "bias": _randn(gen, 2)}
    plugin = mod.BilinearPlugin()
    expected = curvlib.layers.LayerPlugin.row_dots(plugin, module, calls, vectors)
    got = plugin.row_dots(module, calls, vectors)
    assert got.keys() == {"weight", "bias"}
    for name in got:
        assert got[name].shape == (5,)
        assert_close(got[name], expected[name], what=f"row_dots {name}")
    assert set(plugin.row_dots(module, calls, {"bias": vectors["bias"]})) == {"bias"}


def test_unknown_parameter_names_are_rejected() -> None:
    plugin = _plugin().BilinearPlugin()
    module = nn.Bilinear(2, 3, 2, bias=False)
    call = _call(torch.randn(3, 2), torch.randn(3, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"no trainable parameter\(s\) \['bias'\]"):
        plugin.weighted_grads(module, [call], torch.ones(3), params=["bias"])
    with pytest.raises(ValueError, match=r"no trainable parameter\(s\) \['nope'\]"):
        plugin.row_dots(module, [call], {"nope": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"has shape \(2, 3, 2\), the parameter \(2, 2, 3\)"):
        plugin.row_dots(module, [call], {"weight": torch.zeros(2, 3, 2)})
