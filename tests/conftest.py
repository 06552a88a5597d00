"""Shared test setup: the hypothesis profile (``dev`` locally, ``ci`` under ``CI=true``)."""

import copy

import pytest

from curvlib import registry
from curvlib.testing.strategies import load_profile

PROFILE = load_profile()


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE} (set CURVLIB_HYPOTHESIS_PROFILE to change)"


@pytest.fixture
def clean_registry():
    """Snapshot the registries and plugin state, and restore them after the test.

    The installed plugins are loaded first, so the snapshot holds them: a plugin module is
    imported once per process, and a later load could not register it again.
    """
    registry.load_plugins()
    entries = copy.copy({k: dict(v) for k, v in registry._entries.items()})
    loaded = registry._plugins_loaded
    done = set(registry._loaded_entry_points)
    yield registry
    registry._loaded_entry_points.clear()
    registry._loaded_entry_points.update(done)
    registry._entries.clear()
    registry._entries.update(entries)
    registry._plugins_loaded = loaded
    registry._packages_to_distributions.cache_clear()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    # CUDA-only checks cannot run on a CPU machine: without a GPU they are skipped (reported as
    # skips, not failures), so the suite passes cleanly on CPU-only machines.
    skip = pytest.mark.skip(reason="needs a CUDA device (marker 'cuda')")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
