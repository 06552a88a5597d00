"""One registry per component kind, filled by decorators and by installed plugins.

curvlib's components are looked up by ``(kind, name)``. Built-ins register themselves with the
:func:`register` decorator when curvlib is imported. Installed packages register through the
entry-point group ``curvlib.plugins``: each entry point names either a module (importing it runs
its ``@curvlib.register`` decorators) or a function of no arguments that registers what it
wants. The group is loaded once, lazily, on the first :func:`get` or :func:`available`; a plugin
that fails to load is reported with a :class:`PluginLoadWarning` and skipped, and whatever it
registered before failing is removed again, so a broken plugin never leaves half its components
behind.

Example of a plugin package's ``pyproject.toml``::

    [project.entry-points."curvlib.plugins"]
    poisson = "curvlib_poisson"          # a module whose import registers components

Every registration remembers where it came from (:attr:`Registration.origin`): the distribution
of the entry point that registered it, else the distribution that ships the object's module,
else the object's top-level module name (for code that is not installed, e.g. ``__main__``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from curvlib.errors import CurvlibError

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "DuplicateComponentError",
    "PluginLoadWarning",
    "Registration",
    "UnknownComponentError",
    "available",
    "get",
    "load_plugins",
    "register",
    "registrations",
    "resolve",
    "unregister",
]

#: The component kinds, one registry each.
KINDS: tuple[str, ...] = ("likelihood", "layer", "source", "structure", "solver", "damping")

#: The entry-point group that installed plugin packages declare.
ENTRY_POINT_GROUP = "curvlib.plugins"

T = TypeVar("T")


class UnknownComponentError(CurvlibError, LookupError):
    """A kind or a name that is not registered; the message lists what is."""


class DuplicateComponentError(CurvlibError, ValueError):
    """A name registered twice for one kind without ``overwrite=True``."""


class PluginLoadWarning(UserWarning):
    """An entry point of the ``curvlib.plugins`` group failed to load and was skipped."""


@dataclass(frozen=True)
class Registration:
    """One registered component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the name it is looked up by.
        obj: the registered object (usually a class).
        origin: the distribution it came from (``"curvlib"`` for built-ins), or the top-level
            module name when the object belongs to no installed distribution.
    """

    kind: str
    name: str
    obj: Any
    origin: str


_entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
_plugins_loaded = False
# While an entry point loads: its distribution name, and the registrations it made so far.
_loading_origin: str | None = None
_loading_made: list[tuple[str, str, Registration | None]] | None = None
# Entry points (name, value) that loaded successfully; reload=True skips them.
_loaded_entry_points: set[tuple[str, str]] = set()


def _check_kind(kind: str) -> dict[str, Registration]:
    try:
        return _entries[kind]
    except (KeyError, TypeError):
        raise UnknownComponentError(
            f"unknown component kind {kind!r}; the kinds are: {', '.join(KINDS)}"
        ) from None


@lru_cache(maxsize=1)
def _packages_to_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


def _origin_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    top = module.split(".")[0]
    if top == "curvlib":
        return "curvlib"
    if _loading_origin is not None:
        return _loading_origin
    dists = _packages_to_distributions().get(top)
    return dists[0] if dists else top


def register(kind: str, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Decorator that registers a component under ``(kind, name)`` and returns it unchanged.

    Args:
        kind: one of :data:`KINDS`.
        name: the lookup name; a non-empty string.
        overwrite: replace an existing registration of the same name instead of raising.

    Raises:
        UnknownComponentError: ``kind`` is not one of :data:`KINDS`.
        DuplicateComponentError: ``name`` is taken and ``overwrite`` is false.

    Example::

        @curvlib.register("likelihood", "poisson")
        class Poisson(curvlib.Likelihood): ...
    """
    table = _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a component name must be a non-empty string, got {name!r}")

    def decorator(obj: T) -> T:
        if name in table and not overwrite:
            old = table[name]
            raise DuplicateComponentError(
                f"{kind} {name!r} is already registered (by {old.origin}: {old.obj!r}); "
                f"pass overwrite=True to replace it, or choose another name"
            )
        if _loading_made is not None:
            _loading_made.append((kind, name, table.get(name)))
        table[name] = Registration(kind, name, obj, _origin_of(obj))
        return obj

    return decorator


def unregister(kind: str, name: str) -> Registration:
    """Remove a registration and return it; raises :class:`UnknownComponentError` if absent."""
    table = _check_kind(kind)
    if name not in table:
        raise _unknown(kind, name)
    return table.pop(name)


def _unknown(kind: str, name: str) -> UnknownComponentError:
    names = sorted(_entries[kind])
    listed = ", ".join(repr(n) for n in names) if names else "none"
    return UnknownComponentError(
        f"no {kind} named {name!r}; registered {kind} names: {listed}. Register one with "
        f"@curvlib.register({kind!r}, 'name') or install a package that declares the "
        f"{ENTRY_POINT_GROUP!r} entry-point group"
    )


def get(kind: str, name: str) -> Any:
    """The object registered under ``(kind, name)``.

    Loads the installed plugins first if that has not happened yet.

    Raises:
        UnknownComponentError: the kind or the name is unknown; the message lists the
            registered names of that kind.
    """
    table = _check_kind(kind)
    load_plugins()
    if name not in table:
        raise _unknown(kind, name)
    return table[name].obj


def resolve(kind: str, component: Any, base: type, **options: Any) -> Any:
    """An instance of ``base`` from a registered name, a class, or an instance.

    Names are looked up with :func:`get`; names and classes are instantiated with
    ``options``; an instance is returned as it is (options are then an error).
    """
    if isinstance(component, base):
        if options:
            raise TypeError(f"options can only be given with a {kind} name or class")
        return component
    cls = get(kind, component) if isinstance(component, str) else component
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(
            f"{component!r} is not a curvlib {kind} (a {base.__module__}.{base.__qualname__})"
        )
    return cls(**options)


def registrations(kind: str) -> list[Registration]:
    """All registrations of one kind, sorted by name (loads plugins first)."""
    table = _check_kind(kind)
    load_plugins()
    return [table[n] for n in sorted(table)]


def available(kind: str | None = None) -> dict[str, dict[str, str]]:
    """What is registered: ``{kind: {name: origin}}`` with names in sorted order.

    ``origin`` is the distribution a component came from (``"curvlib"`` for built-ins). With
    ``kind`` given, the mapping holds that kind only. Loads the installed plugins first.
    """
    kinds = KINDS if kind is None else (kind,)
    return {k: {r.name: r.origin for r in registrations(k)} for k in kinds}


@contextmanager
def _loading(origin: str) -> Iterator[list[tuple[str, str, Registration | None]]]:
    global _loading_origin, _loading_made
    made: list[tuple[str, str, Registration | None]] = []
    _loading_origin, _loading_made = origin, made
    try:
        yield made
    finally:
        _loading_origin, _loading_made = None, None


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_plugins(*, reload: bool = False) -> None:
    """Load the ``curvlib.plugins`` entry points (once; again only with ``reload=True``).

    Each entry point names a module, whose import registers components, or a function of no
    arguments, which is called. A plugin that raises is skipped with a
    :class:`PluginLoadWarning` and every registration it made is rolled back (an entry it
    overwrote is restored). With ``reload=True`` the entry points that have not loaded
    successfully yet are tried (again); use it after installing a package at run time.
    """
    global _plugins_loaded
    if _plugins_loaded and not reload:
        return
    _plugins_loaded = True
    for ep in _entry_points():
        if (ep.name, ep.value) in _loaded_entry_points:
            continue
        dist = getattr(ep, "dist", None)
        origin = dist.name if dist is not None else ep.value.split(".")[0].split(":")[0]
        with _loading(origin) as made:
            try:
                loaded = ep.load()
                if inspect.isfunction(loaded):
                    loaded()
            except Exception as exc:
                for kind, name, replaced in reversed(made):  # undo, restoring overwrites
                    if replaced is None:
                        _entries[kind].pop(name, None)
                    else:
                        _entries[kind][name] = replaced
                module = ep.value.split(":")[0]
                sys.modules.pop(module, None)  # a retry with reload=True imports it afresh
                warnings.warn(
                    f"curvlib plugin {ep.name!r} ({ep.value}) from {origin!r} failed to load "
                    f"and was skipped: {type(exc).__name__}: {exc}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
            else:
                _loaded_entry_points.add((ep.name, ep.value))
