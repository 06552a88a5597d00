"""Registry behaviour: decorators, duplicates, unknown names, and real entry-point plugins.

Entry points are tested with real distributions: a ``*.dist-info`` folder with METADATA and
entry_points.txt on ``sys.path``, which :mod:`importlib.metadata` discovers exactly as it
discovers installed packages.
"""

import sys
import textwrap

import pytest

import curvlib
from curvlib.registry import (
    DuplicateComponentError,
    PluginLoadWarning,
    UnknownComponentError,
)


def make_distribution(root, dist, version, entry_points, modules):
    """Write an installed-looking distribution under ``root`` (on sys.path by the caller)."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[curvlib.plugins]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch, clean_registry):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("fakeplug_"):
            del sys.modules[name]


def test_builtin_likelihoods_are_listed_with_their_origin():
    lik = curvlib.available()["likelihood"]
    for name in ("categorical", "bernoulli", "gaussian"):
        assert lik[name] == "curvlib"
    assert list(lik) == sorted(lik)
    assert set(curvlib.available()) == set(curvlib.KINDS)
    assert curvlib.get("likelihood", "categorical") is curvlib.Categorical


def test_register_returns_the_object_and_records_the_module_origin(clean_registry):
    @curvlib.register("solver", "my_solver")
    class MySolver:
        """A stand-in component: the registry stores any object."""

    assert curvlib.get("solver", "my_solver") is MySolver
    solvers = curvlib.available("solver")
    assert list(solvers) == ["solver"]
    assert solvers["solver"]["my_solver"] == __name__.split(".")[0]
    assert solvers["solver"]["cholesky"] == "curvlib"


def test_duplicate_raises_and_overwrite_replaces(clean_registry):
    curvlib.register("damping", "constant_test")(object)
    with pytest.raises(DuplicateComponentError, match=r"already registered.*overwrite=True"):
        curvlib.register("damping", "constant_test")(int)
    assert curvlib.get("damping", "constant_test") is object
    curvlib.register("damping", "constant_test", overwrite=True)(int)
    assert curvlib.get("damping", "constant_test") is int


def test_duplicate_of_a_builtin_raises():
    with pytest.raises(DuplicateComponentError, match="categorical"):
        curvlib.register("likelihood", "categorical")(object)
    assert curvlib.get("likelihood", "categorical") is curvlib.Categorical


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(UnknownComponentError) as info:
        curvlib.get("likelihood", "poisson-typo")
    message = str(info.value)
    assert "'poisson-typo'" in message
    for name in ("'bernoulli'", "'categorical'", "'gaussian'"):
        assert name in message
    assert "curvlib.register" in message


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(UnknownComponentError, match="likelihood, layer, source"):
        curvlib.get("optimiser", "x")
    with pytest.raises(UnknownComponentError):
        curvlib.register("optimiser", "x")


def test_empty_name_is_rejected():
    with pytest.raises(ValueError, match="non-empty string"):
        curvlib.register("solver", "")


def test_unregister(clean_registry):
    curvlib.register("structure", "tmp")(object)
    assert curvlib.registry.unregister("structure", "tmp").obj is object
    with pytest.raises(UnknownComponentError):
        curvlib.get("structure", "tmp")


def test_entry_point_is_loaded_lazily_once_and_credited_to_its_distribution(plugin_path):
    make_distribution(
        plugin_path, "fake-curvlib-plugin", "0.1",
        {"fake": "fakeplug_good:setup", "fake_module": "fakeplug_mod"},
        {
            "fakeplug_good": """
                import curvlib
                CALLS = []
                def setup():
                    CALLS.append(1)
                    curvlib.register("solver", "fake_solver")(type("FakeSolver", (), {}))
            """,
            "fakeplug_mod": """
                import curvlib
                @curvlib.register("damping", "fake_damping")
                class FakeDamping:
                    'Registered by the module import.'
            """,
        },
    )
    curvlib.registry._plugins_loaded = False
    assert "fakeplug_good" not in sys.modules  # nothing happens before the first lookup
    assert curvlib.get("solver", "fake_solver").__name__ == "FakeSolver"
    curvlib.available()
    curvlib.get("damping", "fake_damping")
    assert sys.modules["fakeplug_good"].CALLS == [1]  # loaded once
    listing = curvlib.available()
    assert listing["solver"]["fake_solver"] == "fake-curvlib-plugin"
    assert listing["damping"]["fake_damping"] == "fake-curvlib-plugin"


def test_broken_entry_points_warn_are_skipped_and_roll_back(plugin_path):
    make_distribution(
        plugin_path, "broken-plugin", "1.0",
        {"half": "fakeplug_half", "missing": "fakeplug_does_not_exist",
         "clash": "fakeplug_clash"},
        {
            "fakeplug_half": """
                import curvlib
                curvlib.register("solver", "half_solver")(object)
                raise RuntimeError("plugin bug after one registration")
            """,
            "fakeplug_clash": """
                import curvlib
                curvlib.register("likelihood", "gaussian")(object)
            """,
        },
    )
    make_distribution(plugin_path, "fine-plugin", "1.0", {"fine": "fakeplug_fine"}, {
        "fakeplug_fine": """
            import curvlib
            curvlib.register("solver", "fine_solver")(object)
        """,
    })
    curvlib.registry._plugins_loaded = False
    with pytest.warns(PluginLoadWarning) as record:
        listing = curvlib.available()
    messages = " | ".join(str(w.message) for w in record)
    assert "plugin bug after one registration" in messages
    assert "fakeplug_does_not_exist" in messages
    assert "already registered" in messages  # the clash with the built-in gaussian
    assert "half_solver" not in listing["solver"]  # rolled back
    assert listing["solver"]["fine_solver"] == "fine-plugin"  # others still load
    assert curvlib.get("likelihood", "gaussian") is curvlib.Gaussian  # built-in intact


def test_a_failing_plugin_restores_what_it_overwrote_and_reload_skips_loaded_ones(plugin_path):
    make_distribution(
        plugin_path, "overwriting-plugin", "1.0",
        {"over": "fakeplug_over", "ok": "fakeplug_ok:setup"},
        {
            "fakeplug_over": """
                import curvlib
                curvlib.register("likelihood", "gaussian", overwrite=True)(object)
                raise RuntimeError("fails after overwriting")
            """,
            "fakeplug_ok": """
                import curvlib
                CALLS = []
                def setup():
                    CALLS.append(1)
                    curvlib.register("solver", "ok_solver")(object)
            """,
        },
    )
    curvlib.registry._plugins_loaded = False
    with pytest.warns(PluginLoadWarning, match="fails after overwriting"):
        curvlib.available()
    assert curvlib.get("likelihood", "gaussian") is curvlib.Gaussian
    assert curvlib.available("likelihood")["likelihood"]["gaussian"] == "curvlib"
    with pytest.warns(PluginLoadWarning, match="fails after overwriting"):  # retried
        curvlib.registry.load_plugins(reload=True)
    assert sys.modules["fakeplug_ok"].CALLS == [1]  # a loaded plugin is not run twice
