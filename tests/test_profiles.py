"""The hypothesis profiles and the example-count rule the suite's settings rely on."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlib.testing.strategies import (
    PROFILE_EXAMPLES,
    examples,
    load_profile,
    selected_profile,
)

PROFILE = selected_profile()  # the profile tests/conftest.py loaded


def test_profiles_are_registered_as_documented():
    load_profile(PROFILE)  # registers all three; reloads the active one
    dev, ci, long = (settings.get_profile(n) for n in ("dev", "ci", "long"))
    assert (dev.max_examples, ci.max_examples, long.max_examples) == (25, 200, 1000)
    assert PROFILE_EXAMPLES == {"dev": 25, "ci": 200, "long": 1000}
    assert ci.derandomize and ci.database is None  # CI explores the same examples every run
    assert not dev.derandomize and not long.derandomize
    assert dev.deadline is ci.deadline is long.deadline is None


@pytest.mark.parametrize(("name", "fraction", "count"), [
    ("ci", 1, 200), ("ci", 0.5, 100), ("ci", 0.15, 30), ("ci", 0.075, 15), ("ci", 0.03, 6),
    ("dev", 1, 25), ("dev", 0.2, 5), ("dev", 0.1, 3), ("dev", 0.03, 1), ("dev", 0.001, 1),
    ("long", 0.15, 150), ("long", 0.03, 30),
])
def test_examples_is_the_rounded_up_fraction_of_the_profile(name, fraction, count):
    try:
        load_profile(name)
        assert examples(fraction) == count
    finally:
        load_profile(PROFILE)


@pytest.mark.parametrize("fraction", [0, -0.1, float("nan")])
def test_examples_needs_a_positive_fraction(fraction):
    with pytest.raises(ValueError, match="fraction > 0"):
        examples(fraction)


@settings(max_examples=examples(0.05))
@given(st.integers())
def test_a_scaled_pin_keeps_the_rest_of_the_active_profile(n):
    # settings(...) at import inherits from the profile conftest.py loaded first: under ci
    # a test with its own count is still derandomized, and no test gets a deadline.
    current = settings()
    assert current.deadline is None
    assert current.derandomize == (PROFILE == "ci")


def test_the_active_profile_is_the_one_conftest_loaded():
    assert settings.default.max_examples == settings.get_profile(PROFILE).max_examples
