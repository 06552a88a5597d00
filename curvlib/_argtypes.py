"""Argument types shared by the ``curvlib`` subcommands (argparse ``type=`` callables that
raise :class:`argparse.ArgumentTypeError` with a message naming the bad value)."""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_float", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str, allowed, what: str, finite_what: str) -> float:
    """A finite number for which ``allowed(value)`` holds; the messages name ``what`` (not a
    number) and ``finite_what`` (a number out of range or not finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and allowed(value)):
        raise argparse.ArgumentTypeError(f"expected {finite_what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _finite_float(text, lambda v: v > 0, "a positive number",
                         "a positive finite number")


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0."""
    return _finite_float(text, lambda v: v >= 0, "a number >= 0", "a finite number >= 0")
