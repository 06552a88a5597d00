r"""``curvlib compare``: train optimizers side by side on a bundled task and compare them.

The command trains the chosen recipes (default: SGD-m, Adam, KFAC, Shampoo, TNT, FNGD) on one
of three tasks built from scikit-learn's bundled digits, for a number of epochs and seeds; then
it prints a table (best and final training loss, test accuracy or test loss, time per epoch as
a ratio to SGD-m's) and writes ``loss_vs_epoch.png``, ``loss_vs_time.png`` and
``results.json``. New assemblies (a source, a structure and a solver by name, with their
options) come from a TOML file, so comparing one needs no code. See ``docs/cli.md``.

The library layer is usable from Python::

    from curvlib import compare
    specs = compare.default_specs("digits-mlp", ["sgd", "kfac"])
    results = compare.compare("digits-mlp", specs, epochs=3, seeds=[0])
    print(compare.format_table(results))

* :data:`TASKS` and :func:`load_task` — the tasks and their fixed, seeded train/test split;
* :data:`RECIPES` and :data:`DEFAULTS` — the recipes and their default hyper-parameters per
  task (where each value came from is written next to it);
* :class:`RunSpec` — one run: a recipe or an assembly of components, and its
  hyper-parameters; :func:`default_specs` and :func:`load_config` make them;
* :func:`train` — the runs of one seed, trained in lockstep (one epoch each in turn, order
  rotated every epoch, the garbage collector off during a round; evaluation untimed);
* :func:`compare` — every seed, the summary and the metadata, as one JSON-ready dict;
  :func:`format_table`, :func:`plot` and :func:`write_results` present it.

Randomness comes only from seeded :class:`torch.Generator` objects: for seed ``s`` the initial
weights (the same for every run of the seed), the batch order (the same too) and the
optimizer's sampled targets use generators seeded ``s``, ``s + 1000`` and ``s + 2000``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

import curvlib
from curvlib._argtypes import positive_float as _positive_float
from curvlib._argtypes import positive_int as _positive_int
from curvlib.damping import as_damping
from curvlib.errors import CurvlibError
from curvlib.optim import HYPER as CURVLIB_HYPER
from curvlib.solvers import as_solver
from curvlib.sources import as_source
from curvlib.structures.base import as_structure

__all__ = [
    "AUTOENCODER_WIDTHS",
    "DEFAULTS",
    "DEFAULT_RECIPES",
    "RECIPES",
    "TASKS",
    "CompareError",
    "Config",
    "Recipe",
    "RunSpec",
    "Task",
    "TaskData",
    "add_parser",
    "autoencoder",
    "compare",
    "default_specs",
    "digits_cnn",
    "digits_mlp",
    "format_table",
    "init_parameters_",
    "load_config",
    "load_digits_classification",
    "load_digits_pixels",
    "load_task",
    "plot",
    "run",
    "specs_from_config",
    "summarise",
    "train",
    "write_results",
]

_BENCH_HINT = 'pip install -e ".[bench]"'



class CompareError(CurvlibError, ValueError):
    """A bad task, recipe, configuration or assembly; the message names it and the fix."""


# =========================================================================== data and models

#: Seed of the permutation that splits digits into training and test images.
SPLIT_SEED = 0
#: Fraction of the images held out for testing (and of the training images for validation).
TEST_FRACTION = 0.2


def _split(n: int, validation: bool) -> tuple[Tensor, Tensor]:
    """``(train, test)`` indices: a seeded permutation, 20 % test; with ``validation`` the
    training part is split again and its first 20 % returned as ``test``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * n)
    test, train = perm[:n_test], perm[n_test:]
    if validation:
        n_val = round(TEST_FRACTION * train.shape[0])
        test, train = train[:n_val], train[n_val:]
    return train, test


def _sklearn_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            f"curvlib compare needs scikit-learn for the digits data set; install the bench "
            f"extra: {_BENCH_HINT}"
        ) from None
    return load_digits()


def load_digits_classification(validation: bool = False,
                               max_train: int | None = None) -> dict[str, Tensor]:
    """Digits for classification: ``x_*`` of shape ``(N, 1, 8, 8)`` (float32), ``y_*`` labels.

    One fixed split (a permutation seeded with :data:`SPLIT_SEED`): 1438 training and 359 test
    images; pixels standardised with the training images' per-pixel mean and standard
    deviation (constant pixels: deviation 1). ``validation=True`` trains on the first 80 % of
    the training images and returns the other 20 % (288) as ``x_test``/``y_test``: what tuning
    selects on. ``max_train`` keeps only the first ``max_train`` training images.
    """
    digits = _sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = _split(x.shape[0], validation)
    if max_train is not None:
        train = train[:max_train]
    mean = x[train].mean(0, keepdim=True)
    std = x[train].std(0, keepdim=True) if train.numel() > 1 else torch.ones_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant border pixels
    x = (x - mean) / std
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def load_digits_pixels(validation: bool = False,
                       max_train: int | None = None) -> dict[str, Tensor]:
    """Digits for the autoencoder: ``(N, 64)`` pixels divided by 16 (in ``[0, 1]``), float32.

    The split is :func:`load_digits_classification`'s (the test images are held out: the test
    loss is measured on images never trained on); targets are the inputs.
    """
    digits = _sklearn_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    train, test = _split(x.shape[0], validation)
    if max_train is not None:
        train = train[:max_train]
    return {"x_train": x[train], "y_train": x[train], "x_test": x[test], "y_test": x[test]}


def init_parameters_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every Linear and Conv layer with torch's default scheme, drawn from
    ``generator`` (weights Kaiming-uniform with ``a = √5``, biases uniform in
    ``±1/√fan_in``); returns ``model``. Torch's global generator is not touched."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            with torch.no_grad():
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return model


def _materialise(model: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """A model built on the meta device gets storage and weights from ``generator``."""
    model = model.to_empty(device="cpu")
    return init_parameters_(model, generator)


def _device(generator: torch.Generator | None) -> str | None:
    # with a generator the layers are built without storage (no draw from torch's global
    # generator) and initialised from the generator; without one, torch's usual init
    return "meta" if generator is not None else None


def digits_mlp(generator: torch.Generator | None = None) -> nn.Sequential:
    """MLP 64-128-64-10 (ReLU) on flattened ``(N, 1, 8, 8)`` digits.

    With ``generator`` the weights come from it (:func:`init_parameters_`); without, torch's
    default initialisation from its global generator (what ``benchmarks/digits_fngd.py``
    does after ``torch.manual_seed``).
    """
    d = _device(generator)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128, device=d), nn.ReLU(),
                          nn.Linear(128, 64, device=d), nn.ReLU(), nn.Linear(64, 10, device=d))
    return model if generator is None else _materialise(model, generator)


def digits_cnn(generator: torch.Generator | None = None) -> nn.Sequential:
    """CNN ``Conv2d(1, 16, 3, p=1)-ReLU-Conv2d(16, 32, 3, p=1)-ReLU-MaxPool2-Flatten-
    Linear(512, 10)`` on ``(N, 1, 8, 8)`` digits (initialisation as :func:`digits_mlp`)."""
    d = _device(generator)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, device=d), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, device=d), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10, device=d))
    return model if generator is None else _materialise(model, generator)


#: Widths of the digits autoencoder (the TNT paper's Figure 2 network, shrunk to 8×8 images).
AUTOENCODER_WIDTHS = (64, 128, 64, 32, 8, 32, 64, 128, 64)


def autoencoder(widths: Sequence[int] = AUTOENCODER_WIDTHS,
                generator: torch.Generator | None = None) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]`` with ReLU between them, except after the
    code layer (the narrowest, in the middle) and after the output layer: both are linear.
    Initialisation as :func:`digits_mlp`."""
    d = _device(generator)
    n = len(widths) - 1
    code = n // 2 - 1  # index of the layer that maps into the code
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(nn.Linear(widths[i], widths[i + 1], device=d))
        if i not in (code, n - 1):
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    return model if generator is None else _materialise(model, generator)


@dataclass(frozen=True)
class Task:
    """A bundled training problem.

    Attributes:
        name: what ``--task`` takes.
        description: the network, the data and the loss, in a line.
        kind: ``"classification"`` (test accuracy reported) or ``"autoencoder"`` (test loss).
        likelihood: the curvlib likelihood of the loss (``"categorical"``, ``"bernoulli"``).
        batch_size: images per batch.
        build: ``build(generator)`` returns the initial model.
        load: ``load(validation, max_train)`` returns ``x_train``, ``y_train``, ``x_test``,
            ``y_test``.
        epochs: the default number of epochs.
    """

    name: str
    description: str
    kind: str
    likelihood: str
    batch_size: int
    build: Callable[[torch.Generator | None], nn.Module]
    load: Callable[[bool, int | None], dict[str, Tensor]]
    epochs: int


#: The bundled tasks, by name.
TASKS: dict[str, Task] = {
    "digits-mlp": Task(
        "digits-mlp", "MLP 64-128-64-10 (ReLU), digits classification, cross-entropy",
        "classification", "categorical", 64, digits_mlp, load_digits_classification, 20),
    "digits-cnn": Task(
        "digits-cnn", "CNN conv3x3(1->16)-ReLU-conv3x3(16->32)-ReLU-pool2-Linear(512->10), "
        "digits classification, cross-entropy",
        "classification", "categorical", 64, digits_cnn, load_digits_classification, 20),
    "digits-autoencoder": Task(
        "digits-autoencoder", "autoencoder 64-128-64-32-8-32-64-128-64 (ReLU; linear code and "
        "output), Bernoulli likelihood summed over the 64 pixels",
        "autoencoder", "bernoulli", 100, lambda g: autoencoder(AUTOENCODER_WIDTHS, g),
        load_digits_pixels, 40),
}


@dataclass(frozen=True)
class TaskData:
    """A task's tensors (``y_* = x_*`` for the autoencoder)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def describe(self) -> str:
        """``"1438 train / 359 test images"``."""
        return f"{self.x_train.shape[0]} train / {self.x_test.shape[0]} test images"


def _get_task(name: str) -> Task:
    if name not in TASKS:
        listed = "; ".join(f"{t.name} ({t.description})" for t in TASKS.values())
        raise CompareError(f"unknown task {name!r}; the tasks are: {listed}")
    return TASKS[name]


def load_task(name: str, *, validation: bool = False, max_train: int | None = None
              ) -> TaskData:
    """The tensors of task ``name`` (see :data:`TASKS`).

    Args:
        validation: train on 80 % of the training images and test on the other 20 % (for
            tuning; the test images are not used).
        max_train: keep only the first ``max_train`` training images (quick checks).

    Raises:
        CompareError: unknown task (the message lists the tasks).
        ImportError: scikit-learn is missing (the ``bench`` extra).
    """
    task = _get_task(name)
    if max_train is not None and max_train < 1:
        raise CompareError(f"max_train must be a positive integer, got {max_train}")
    return TaskData(**task.load(validation, max_train))


# =========================================================================== recipes


@dataclass(frozen=True)
class Recipe:
    """A named optimizer of ``curvlib compare``.

    Attributes:
        name: what ``--recipes`` takes (``"kfac"``).
        label: the name in tables and plots (``"KFAC"``).
        description: what it is, in a line.
        make: ``make(model, likelihood, **hyper, steps_per_epoch=, generator=)`` → optimizer.
        options: the hyper-parameters a TOML file may set for it.
        curvlib: whether it is a curvlib optimizer (trained with ``opt.backward``).
    """

    name: str
    label: str
    description: str
    make: Callable[..., torch.optim.Optimizer]
    options: tuple[str, ...]
    curvlib: bool


def _make_sgd(model: nn.Module, likelihood: Any, *, steps_per_epoch: int,
              generator: torch.Generator, **hyper: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), **{"momentum": 0.9, **hyper})


def _make_adam(model: nn.Module, likelihood: Any, *, steps_per_epoch: int,
               generator: torch.Generator, **hyper: Any) -> torch.optim.Optimizer:
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    return torch.optim.Adam(model.parameters(), **hyper)


def _curvlib_recipe(fn: Callable[..., Any]) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """A maker for a curvlib recipe function, and the options a TOML file may give it.

    ``damping`` is the recipe's damping (FNGD's ``alpha``); the model, likelihood, generator
    and parameters are supplied by the command, FNGD's ``steps_per_epoch`` too.
    """
    params = inspect.signature(fn).parameters
    renamed = "alpha" in params  # FNGD calls its damping α (λ = α‖UᵀU‖_F)
    fixed = {"model", "likelihood", "generator", "params", "steps_per_epoch", "key", "alpha"}
    options = ("damping", *(p for p in params if p not in fixed and p != "damping"))

    def make(model: nn.Module, likelihood: Any, *, steps_per_epoch: int,
             generator: torch.Generator, **hyper: Any) -> Any:
        kwargs = dict(hyper)
        if renamed and "damping" in kwargs:
            kwargs["alpha"] = kwargs.pop("damping")
        if "generator" in params:
            kwargs["generator"] = generator
        if "steps_per_epoch" in params:
            kwargs["steps_per_epoch"] = steps_per_epoch
        return fn(model, likelihood, **kwargs)

    return make, options


def _recipe(name: str, label: str, description: str, fn: Callable[..., Any]) -> Recipe:
    make, options = _curvlib_recipe(fn)
    return Recipe(name, label, description, make, options, True)


#: The recipes ``--recipes`` accepts, by name.
RECIPES: dict[str, Recipe] = {
    "sgd": Recipe("sgd", "SGD-m", "torch.optim.SGD with momentum 0.9", _make_sgd,
                  ("lr", "momentum", "weight_decay", "nesterov", "dampening"), False),
    "adam": Recipe("adam", "Adam", "torch.optim.Adam (default betas)", _make_adam,
                   ("lr", "betas", "eps", "weight_decay", "amsgrad"), False),
    "kfac": _recipe("kfac", "KFAC", "curvlib.KFAC: per-sample true-Fisher Kronecker factors",
                    curvlib.KFAC),
    "shampoo": _recipe("shampoo", "Shampoo", "curvlib.Shampoo: per-mode inverse roots (eigh)",
                       curvlib.Shampoo),
    "tnt": _recipe("tnt", "TNT", "curvlib.TNT: tensor-normal factors of the sampled gradient",
                   curvlib.TNT),
    "fngd": _recipe("fngd", "FNGD", "curvlib.FNGD: SMW coefficients of epoch 1, shared after",
                    curvlib.FNGD),
    "empirical_tnt": _recipe("empirical_tnt", "EmpiricalTNT",
                             "curvlib.EmpiricalTNT: TNT with the data's targets",
                             curvlib.EmpiricalTNT),
    "natural_gradient": _recipe("natural_gradient", "NaturalGradient",
                                "curvlib.NaturalGradient: per-layer SMW of the sampled Fisher, "
                                "every step", curvlib.NaturalGradient),
}

#: The recipes a plain ``curvlib compare`` runs.
DEFAULT_RECIPES: tuple[str, ...] = ("sgd", "adam", "kfac", "shampoo", "tnt", "fngd")

# Default hyper-parameters per task and recipe (everything not listed keeps the recipe's
# default: momentum 0.9; the TNT/KFAC/Shampoo schedule (T1, T2) = (1, 20) for the MLP and the
# autoencoder, (10, 100) for the CNN). ``damping`` is FNGD's α. Where each value came from:
#   [F] benchmarks/digits_fngd.py --tune (validation split, 3 seeds, 20 epochs with the lr
#       ×0.1 at 50 % and 75 %): SGD-m and FNGD on the MLP and the CNN;
#   [A] benchmarks/digits_autoencoder.py (lowest final training loss, 3 seeds, 40 epochs;
#       TNT with a warm start there): SGD-m, Adam and TNT on the autoencoder;
#   [G] a small grid run by benchmarks/compare_tune.py on the validation split (the test
#       images are not used): 2 seeds, the task's default epochs, constant lr; best mean final
#       validation accuracy (autoencoder: lowest mean final validation loss). Grids and every
#       score: benchmarks/results/compare_tune.json; summary in benchmarks/README.md.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits-mlp": {
        "sgd": {"lr": 0.1},  # [F]
        "adam": {"lr": 3e-3},  # [G]
        "kfac": {"lr": 1e-3, "damping": 1e-3},  # [G]
        "shampoo": {"lr": 3e-3, "damping": 1e-5},  # [G] (grid edge; 1e-4: 1 image less)
        "tnt": {"lr": 3e-5, "damping": 0.01},  # [G]
        "fngd": {"lr": 0.1, "damping": 1.0},  # [F]
        "empirical_tnt": {"lr": 3e-5, "damping": 0.01},  # [G]
        "natural_gradient": {"lr": 0.1, "damping": 0.01},  # [G]
    },
    "digits-cnn": {
        "sgd": {"lr": 0.1},  # [F]
        "adam": {"lr": 0.01},  # [G] (grid edge)
        "kfac": {"lr": 3e-4, "damping": 1e-3},  # [G]
        "shampoo": {"lr": 3e-3, "damping": 1e-5},  # [G] (grid edge; tied with 1e-4)
        "tnt": {"lr": 0.1, "damping": 1.0},  # [G] (tied with lr 3e-6, damping 0.01)
        "fngd": {"lr": 0.1, "damping": 0.1},  # [F]
        "empirical_tnt": {"lr": 3e-6, "damping": 0.01},  # [G] (grid edge)
        "natural_gradient": {"lr": 0.1, "damping": 0.01},  # [G]
    },
    "digits-autoencoder": {
        "sgd": {"lr": 0.03},  # [A]
        "adam": {"lr": 3e-3},  # [A]
        "kfac": {"lr": 1e-3, "damping": 1e-3},  # [G]
        "shampoo": {"lr": 0.01, "damping": 0.01},  # [G] (grid edge)
        "tnt": {"lr": 3e-5, "damping": 0.01},  # [A], and the best of its [G] grid too
        "fngd": {"lr": 0.03, "damping": 1.0},  # [G]
        "empirical_tnt": {"lr": 1e-5, "damping": 0.01},  # [G]
        "natural_gradient": {"lr": 0.1, "damping": 0.01},  # [G]
    },
}


def _get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        listed = ", ".join(f"{r.name} ({r.label})" for r in RECIPES.values())
        raise CompareError(
            f"unknown recipe {name!r}; the recipes are: {listed}. A new assembly of "
            f"components is defined with [[run]] in a --config TOML file (docs/cli.md)"
        )
    return RECIPES[name]


# =========================================================================== runs


#: Keys of a ``[[run]]`` that name components (``*_options`` are tables of their options).
COMPONENT_KEYS = ("source", "structure", "solver", "damping_rule", "source_options",
                  "structure_options", "solver_options")


@dataclass
class RunSpec:
    """One run of a comparison: a recipe, or an assembly of components, with hyper-parameters.

    Attributes:
        name: the label in the table, the plots and the JSON (unique within a comparison).
        recipe: a key of :data:`RECIPES`, or ``None`` for an assembly.
        hyper: the hyper-parameters (``lr``, ``damping``, … — what the recipe takes, or the
            :func:`curvlib.assemble` hyper-parameters for an assembly).
        components: for an assembly: ``source``, ``structure``, ``solver`` (default
            ``"cholesky"``), optionally ``damping_rule`` and ``source_options``,
            ``structure_options``, ``solver_options`` (dicts).
    """

    name: str
    recipe: str | None = None
    hyper: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Any] | None = None

    @property
    def is_curvlib(self) -> bool:
        """Whether the optimizer is a curvlib one (trained with ``opt.backward``)."""
        return self.recipe is None or RECIPES[self.recipe].curvlib

    def describe(self) -> str:
        """The hyper-parameters (and, for an assembly, the components) in a short string."""
        parts = []
        if self.components is not None:
            c = self.components
            comp = f"{c['source']}+{c['structure']}+{c.get('solver', 'cholesky')}"
            if c.get("damping_rule"):
                comp += f"+{c['damping_rule']}"
            parts.append(comp)
            for key in ("source_options", "structure_options", "solver_options"):
                parts += [f"{k}={v}" for k, v in (c.get(key) or {}).items()]
        parts += [f"{k}={_short(v)}" for k, v in self.hyper.items()]
        return ", ".join(parts)

    def build(self, model: nn.Module, likelihood: str, *, steps_per_epoch: int,
              generator: torch.Generator) -> torch.optim.Optimizer:
        """The optimizer for ``model``.

        Raises:
            CompareError: an unknown component or option, a bad value, or an incompatible
                assembly (the message of curvlib's error, prefixed with the run's name).
        """
        try:
            if self.recipe is not None:
                return RECIPES[self.recipe].make(
                    model, likelihood, steps_per_epoch=steps_per_epoch, generator=generator,
                    **self.hyper)
            return self._assemble(model, likelihood, steps_per_epoch, generator)
        except CompareError:
            raise
        except (ValueError, TypeError, LookupError) as exc:
            # UnknownComponentError is a LookupError, CompatibilityError a ValueError
            raise CompareError(f"run {self.name!r}: {type(exc).__name__}: {exc}") from exc

    def _assemble(self, model: nn.Module, likelihood: str, steps_per_epoch: int,
                  generator: torch.Generator) -> torch.optim.Optimizer:
        c = self.components
        assert c is not None
        structure_options = dict(c.get("structure_options") or {})
        if (c["structure"] == "coefficient_sharing" and "steps_per_epoch" not in
                structure_options and structure_options.get("key", "position") == "position"):
            structure_options["steps_per_epoch"] = steps_per_epoch
        source = _component("source", as_source, c["source"], c.get("source_options"))
        structure = _component("structure", as_structure, c["structure"], structure_options)
        solver = _component("solver", as_solver, c.get("solver", "cholesky"),
                            c.get("solver_options"))
        rule = c.get("damping_rule")
        return curvlib.assemble(
            model, likelihood, source=source, structure=structure, solver=solver,
            damping_rule=None if rule is None else as_damping(rule), generator=generator,
            **self.hyper)


def _component(kind: str, resolve: Callable[..., Any], name: Any,
               options: Mapping[str, Any] | None) -> Any:
    """A component from its registered name and options; an unknown option is named with
    the options the component takes."""
    options = dict(options or {})
    if not isinstance(name, str):
        raise CompareError(f"{kind} must be a registered name (a string), got {name!r}")
    cls = curvlib.get(kind, name)  # UnknownComponentError lists the registered names
    if options and isinstance(cls, type):
        accepted = [p.name for p in inspect.signature(cls).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes_any = any(p.kind is p.VAR_KEYWORD
                        for p in inspect.signature(cls).parameters.values())
        unknown = [k for k in options if k not in accepted]
        if unknown and not takes_any:
            raise CompareError(
                f"{kind} {name!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"are: {', '.join(accepted) or 'none'}"
            )
    return resolve(name, **options)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flags(lr: float | None, damping: float | None) -> dict[str, float]:
    return {k: v for k, v in (("lr", lr), ("damping", damping)) if v is not None}


def default_specs(task: str, recipes: Iterable[str] = DEFAULT_RECIPES, *,
                  lr: float | None = None, damping: float | None = None) -> list[RunSpec]:
    """One :class:`RunSpec` per recipe with the task's :data:`DEFAULTS`; ``lr`` and
    ``damping`` override those of every curvlib recipe (SGD-m and Adam keep theirs).

    Raises:
        CompareError: an unknown task or recipe; ``lr`` or ``damping`` NaN or infinite.
    """
    _get_task(task)
    _check_finite("the flags", _flags(lr, damping))
    specs = []
    for name in recipes:
        recipe = _get_recipe(name)
        hyper = dict(DEFAULTS[task][name])
        if recipe.curvlib:
            hyper.update(_flags(lr, damping))
        specs.append(RunSpec(recipe.label, name, hyper))
    return specs


# =========================================================================== TOML configuration

#: Top-level keys of a ``--config`` TOML file.
CONFIG_KEYS = ("task", "epochs", "seeds", "recipes", "lr_decay", "hyper", "run")


@dataclass
class Config:
    """What a ``--config`` file sets (``None``: not set)."""

    task: str | None = None
    epochs: int | None = None
    seeds: list[int] | None = None
    recipes: list[str] | None = None
    lr_decay: bool | None = None
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: the file's text as it was read (``None`` for a configuration built in code); the
    #: command stores it in ``results.json`` so that the run can be repeated
    text: str | None = field(default=None, repr=False, compare=False)


def _read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of the ``--config`` file ``path`` (read once, decoded as UTF-8).

    Raises:
        CompareError: the path does not exist, is a directory, cannot be read or is not
            UTF-8 text; the message names the path.
    """
    shown = f"config file {os.fspath(path)!r}"
    if os.path.isdir(path):
        raise CompareError(f"{shown} is a directory; --config takes the path of a TOML file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CompareError(f"{shown} does not exist") from None
    except OSError as exc:  # permission denied, a directory on some systems, an I/O error
        raise CompareError(f"{shown} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompareError(
            f"{shown} is not valid UTF-8 text (byte {exc.start}: {exc.reason}); TOML files "
            "must be UTF-8 encoded") from None


def _parse_toml(text: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        import tomllib  # Python ≥ 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise CompareError(
                "reading a --config TOML file needs Python 3.11 or the tomli package "
                "(pip install tomli)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CompareError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None


def _check_finite(where: str, values: Mapping[str, Any]) -> None:
    """Refuse a NaN or infinite number among ``values`` (looking into tables and arrays, so
    that ``betas`` and ``[run.*_options]`` are checked too); the message names ``where``
    and the key. Values of other types are left to the checks that know them."""
    for key, value in values.items():
        _check_finite_value(where, str(key), value)


def _check_finite_value(where: str, key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CompareError(
            f"{where}: {key} = {value} is not a finite number; hyper-parameters and options "
            "must be finite (nan, inf and -inf are refused)")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite_value(where, f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_value(where, f"{key}[{i}]", v)


def _unknown_keys(where: str, given: Iterable[str], allowed: Sequence[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise CompareError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {where}; the keys there are: {', '.join(allowed)}"
        )


def _expect(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CompareError(f"{where} must be {what}, got {value!r}")
    return value


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a ``--config`` TOML file.

    Layout (every key optional)::

        task = "digits-mlp"
        epochs = 10
        seeds = [0, 1, 2]
        recipes = ["sgd", "kfac"]       # built-in recipes to run
        lr_decay = false                # lr ×0.1 at 50 % and 75 % of the epochs

        [hyper.kfac]                    # a recipe's hyper-parameters
        lr = 0.01
        damping = 0.03

        [[run]]                         # a new assembly (or: recipe = "kfac" for a variant)
        name = "Shampoo-TF-Newton"
        source = "true_fisher"
        structure = "shampoo"
        solver = "newton"
        lr = 1e-3
        damping = 1e-3
        [run.structure_options]
        root = 2

    Raises:
        CompareError: a path that does not exist, is a directory or is not UTF-8 text,
            unreadable TOML, an unknown key (named, with the allowed keys), a value of the
            wrong type, a NaN or infinite number (named with its table and key), an unknown
            task or recipe.
    """
    text = _read_config_text(path)
    raw = _parse_toml(text, path)
    where = f"config file {os.fspath(path)!r}"
    _unknown_keys(where, raw, CONFIG_KEYS)
    cfg = Config(text=text)
    if "task" in raw:
        cfg.task = _get_task(_expect("task", raw["task"], str, "a task name")).name
    if "epochs" in raw:
        cfg.epochs = _expect("epochs", raw["epochs"], int, "a positive integer")
        if cfg.epochs < 1:
            raise CompareError(f"epochs must be a positive integer, got {cfg.epochs}")
    if "seeds" in raw:
        seeds = _expect("seeds", raw["seeds"], list, "a list of integers")
        for s in seeds:
            _expect("every seed", s, int, "a non-negative integer")
        cfg.seeds = _check_seeds(seeds)
    if "recipes" in raw:
        names = _expect("recipes", raw["recipes"], list, "a list of recipe names")
        cfg.recipes = [_get_recipe(_expect("every recipe", n, str, "a name")).name
                       for n in names]
    if "lr_decay" in raw:
        cfg.lr_decay = _expect("lr_decay", raw["lr_decay"], bool, "true or false")
    hyper = _expect("[hyper]", raw.get("hyper", {}), dict, "a table of recipe tables")
    for name, values in hyper.items():
        recipe = _get_recipe(name)
        _expect(f"[hyper.{name}]", values, dict, "a table of hyper-parameters")
        _unknown_keys(f"[hyper.{name}] of {where}", values, recipe.options)
        _check_finite(f"[hyper.{name}] of {where}", values)
        cfg.hyper[name] = dict(values)
    runs = _expect("[[run]]", raw.get("run", []), list, "an array of tables ([[run]])")
    for i, entry in enumerate(runs):
        _expect(f"[[run]] number {i + 1}", entry, dict, "a table")
        cfg.runs.append(_check_run(entry, i, where))
    return cfg


def _check_run(entry: dict[str, Any], index: int, where: str) -> dict[str, Any]:
    label = f"[[run]] number {index + 1}"
    if "name" not in entry:
        raise CompareError(f"{label} of {where} needs a name (name = \"...\")")
    name = _expect(f"{label}: name", entry["name"], str, "a string")
    label = f"[[run]] {name!r}"
    if "recipe" in entry:
        recipe = _get_recipe(_expect(f"{label}: recipe", entry["recipe"], str, "a name"))
        clash = [k for k in COMPONENT_KEYS if k in entry]
        if clash:
            raise CompareError(
                f"{label} of {where} sets recipe = {recipe.name!r} and "
                f"{', '.join(map(repr, clash))}: a run is either a recipe or an assembly of "
                f"source/structure/solver, not both")
        _unknown_keys(f"{label} of {where} (recipe {recipe.name!r})", entry,
                      ("name", "recipe", *recipe.options))
        _check_finite(f"{label} of {where}", entry)
        return dict(entry)
    if "structure" not in entry or "source" not in entry:
        raise CompareError(
            f"{label} of {where} needs either recipe = \"...\" or source = \"...\" and "
            f"structure = \"...\" (solver defaults to \"cholesky\")")
    _unknown_keys(f"{label} of {where}", entry, ("name", *COMPONENT_KEYS, *CURVLIB_HYPER))
    for key in ("source_options", "structure_options", "solver_options"):
        if key in entry:
            _expect(f"{label}: {key}", entry[key], dict, "a table ([run.{key}])")
    _check_finite(f"{label} of {where}", entry)
    return dict(entry)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if not seeds:
        raise CompareError("seeds must not be empty")
    if any(s < 0 for s in seeds):
        raise CompareError(f"seeds must be non-negative integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds must be distinct, got {list(seeds)}")
    return list(seeds)


def specs_from_config(task: str, recipes: Sequence[str], cfg: Config, *,
                      lr: float | None = None, damping: float | None = None) -> list[RunSpec]:
    """The runs: ``recipes`` with :data:`DEFAULTS`, then ``lr``/``damping`` (the flags), then
    the file's ``[hyper.<recipe>]``; then the file's ``[[run]]`` entries (whose ``lr`` and
    ``damping``, when missing, come from the flags, for a variant of a recipe from its
    defaults).

    Raises:
        CompareError: ``[hyper.X]`` for a recipe that is not run, a duplicate run name, an
            assembly without ``lr`` or ``damping``, a NaN or infinite value (a
            :class:`Config` built in code is checked as :func:`load_config` checks a file).
    """
    for name, values in cfg.hyper.items():
        _check_finite(f"[hyper.{name}]", values)
    for entry in cfg.runs:
        _check_finite(f"[[run]] {entry.get('name')!r}", entry)
    specs = default_specs(task, recipes, lr=lr, damping=damping)
    idle = sorted(set(cfg.hyper) - set(recipes))
    if idle:
        raise CompareError(
            f"[hyper.{idle[0]}] is set but {idle[0]!r} is not among the recipes run "
            f"({', '.join(recipes)}); add it to recipes = [...] or --recipes")
    for spec in specs:
        spec.hyper.update(cfg.hyper.get(spec.recipe or "", {}))
    for entry in cfg.runs:
        name = entry["name"]
        if "recipe" in entry:
            recipe = RECIPES[entry["recipe"]]
            hyper = dict(DEFAULTS[task][recipe.name])
            if recipe.curvlib:
                hyper.update(_flags(lr, damping))
            hyper.update({k: v for k, v in entry.items() if k not in ("name", "recipe")})
            specs.append(RunSpec(name, recipe.name, hyper))
            continue
        hyper = {k: v for k, v in entry.items() if k in CURVLIB_HYPER}
        for key, flag in (("lr", lr), ("damping", damping)):
            if key not in hyper:
                if flag is None:
                    raise CompareError(
                        f"[[run]] {name!r} needs {key} (set {key} = ... in the run, or pass "
                        f"--{key})")
                hyper[key] = flag
        components = {k: entry[k] for k in COMPONENT_KEYS if k in entry}
        specs.append(RunSpec(name, None, hyper, components))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CompareError(f"two runs are named {spec.name!r}; run names must be unique")
        seen.add(spec.name)
    return specs


# =========================================================================== training


def _lr_factor(epoch: int, epochs: int, decay: bool) -> float:
    """1, then 0.1 once 50 % of the epochs are done and 0.01 once 75 % are (``epoch`` counts
    from 0: with 20 epochs, 0.1 from the 11th and 0.01 from the 16th)."""
    if not decay:
        return 1.0
    return 0.1 ** ((epoch >= math.ceil(epochs / 2)) + (epoch >= math.ceil(3 * epochs / 4)))


class _Run:
    """One spec on one seed, advanced an epoch at a time."""

    def __init__(self, spec: RunSpec, task: Task, data: TaskData, seed: int, epochs: int,
                 lr_decay: bool):
        self.spec, self.task, self.data = spec, task, data
        self.epochs, self.lr_decay = epochs, lr_decay
        self.likelihood = curvlib.as_likelihood(task.likelihood)
        self.model = task.build(torch.Generator().manual_seed(seed))
        self.order = torch.Generator().manual_seed(seed + 1000)
        n = data.x_train.shape[0]
        self.steps_per_epoch = math.ceil(n / task.batch_size)
        self.opt = spec.build(self.model, task.likelihood, steps_per_epoch=self.steps_per_epoch,
                              generator=torch.Generator().manual_seed(seed + 2000))
        self.base_lr = [g["lr"] for g in self.opt.param_groups]
        self.done = 0
        self.diverged_at: int | None = None
        self.failed: str | None = None
        self.warnings: dict[str, int] = {}
        self.train_loss: list[float] = []
        self.test_loss: list[float] = []
        self.test_accuracy: list[float] = []
        self.batch_loss: list[float] = []
        self.epoch_time: list[float] = []
        self.evaluate()

    @property
    def stopped(self) -> bool:
        return self.diverged_at is not None or self.failed is not None

    def _finite_parameters(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def epoch(self) -> None:
        """Train one epoch (timed), then evaluate (not timed)."""
        self.done += 1
        if self.stopped:
            self._pad()
            return
        factor = _lr_factor(self.done - 1, self.epochs, self.lr_decay)
        for group, lr in zip(self.opt.param_groups, self.base_lr, strict=True):
            group["lr"] = lr * factor
        d = self.data
        perm = torch.randperm(d.x_train.shape[0], generator=self.order)
        batches = [(d.x_train[idx], d.y_train[idx]) for idx in perm.split(self.task.batch_size)]
        total = 0.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                start = time.perf_counter()
                for x, y in batches:
                    loss = self._step(x, y)
                    total += float(loss)
                    if not math.isfinite(total):
                        break
                elapsed = time.perf_counter() - start
            except Exception as exc:  # a step that fails: diverged, or a real failure
                elapsed = math.nan
                if self._finite_parameters() and math.isfinite(total):
                    self.failed = f"{type(exc).__name__}: {exc}"
                else:
                    total = math.nan
        for w in caught:
            key = f"{w.category.__name__}: {w.message}"
            self.warnings[key] = self.warnings.get(key, 0) + 1
        if self.failed is not None:
            self._pad()
            return
        if not math.isfinite(total):
            self.diverged_at = self.done
            self._pad()
            return
        self.epoch_time.append(elapsed)
        self.batch_loss.append(total / len(batches))
        self.evaluate()
        if not math.isfinite(self.train_loss[-1]):
            self.diverged_at = self.done
            self.epoch_time[-1] = math.nan  # not a complete, comparable epoch

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        opt = self.opt
        opt.zero_grad()
        outputs = self.model(x)
        if self.spec.is_curvlib:
            loss = opt.backward(outputs, y)  # type: ignore[attr-defined]
        else:
            loss = self.likelihood.mean_loss(outputs, y)
            loss.backward()
            loss = loss.detach()
        opt.step()
        return loss

    def _pad(self) -> None:
        """A stopped run's entries for this epoch: non-finite losses, no time."""
        while len(self.train_loss) < self.done + 1:
            self.train_loss.append(math.inf)
            self.test_loss.append(math.inf)
            if self.task.kind == "classification":
                self.test_accuracy.append(math.nan)
        while len(self.epoch_time) < self.done:
            self.epoch_time.append(math.nan)
            self.batch_loss.append(math.inf)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Mean loss on all training images, and the test loss (and accuracy)."""
        d, lik = self.data, self.likelihood
        train = float(lik.mean_loss(self.model(d.x_train), d.y_train))
        out = self.model(d.x_test)
        self.train_loss.append(train if math.isfinite(train) else math.inf)
        test = float(lik.mean_loss(out, d.y_test))
        self.test_loss.append(test if math.isfinite(test) else math.inf)
        if self.task.kind == "classification":
            acc = 100.0 * float((out.argmax(1) == d.y_test).float().mean())
            self.test_accuracy.append(acc if math.isfinite(test) else math.nan)

    def close(self) -> None:
        close = getattr(self.opt, "close", None)
        if close is not None:
            close()

    def record(self) -> dict[str, Any]:
        """The run's curves (index ``e``: after epoch ``e``; 0 is the initial point)."""
        times = [0.0]
        for t in self.epoch_time:
            times.append(times[-1] + (t if math.isfinite(t) else 0.0))
        rec: dict[str, Any] = {
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "batch_loss": self.batch_loss,
            "epoch_time": self.epoch_time,
            "time": times,
            "diverged_at": self.diverged_at,
            "failed": self.failed,
            "warnings": self.warnings,
        }
        if self.task.kind == "classification":
            rec["test_accuracy"] = self.test_accuracy
        return rec


class _Bars:
    """One tqdm bar per run (or nothing)."""

    def __init__(self, names: Sequence[str], seed: int, epochs: int, enabled: bool):
        self.bars: list[Any] = []
        if not enabled:
            return
        from tqdm import tqdm

        width = max(len(n) for n in names)
        self.bars = [tqdm(total=epochs, desc=f"{n.ljust(width)} seed {seed}", position=i,
                          leave=True, unit="epoch", file=sys.stderr, dynamic_ncols=True)
                     for i, n in enumerate(names)]

    def update(self, index: int, run: _Run) -> None:
        if not self.bars:
            return
        bar = self.bars[index]
        if run.diverged_at is not None:
            bar.set_postfix_str(f"diverged at epoch {run.diverged_at}", refresh=False)
        elif run.failed is not None:
            bar.set_postfix_str("failed", refresh=False)
        else:
            bar.set_postfix_str(f"loss {run.train_loss[-1]:.4g}", refresh=False)
        bar.update(1)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def train(task: str, specs: Sequence[RunSpec], *, epochs: int, seed: int,
          data: TaskData | None = None, lr_decay: bool = False, progress: bool = False
          ) -> dict[str, dict[str, Any]]:
    """Train every spec on one seed, in lockstep: each epoch, every run trains one epoch in
    turn (the order rotated by one each epoch, so that machine drift hits all runs alike;
    the garbage collector runs between these rounds, not during them).

    Args:
        task: a key of :data:`TASKS`.
        specs: the runs (names unique).
        epochs: epochs per run.
        seed: seeds the initial weights (``seed``), the batch order (``seed + 1000``) and
            sampled targets (``seed + 2000``): identical for every run of the seed.
        data: the task's tensors (default: :func:`load_task`).
        lr_decay: multiply each learning rate by 0.1 at 50 % and again at 75 % of the epochs.
        progress: show a tqdm bar per run on stderr.

    Returns:
        ``{name: record}``; a record holds ``train_loss``, ``test_loss`` (and
        ``test_accuracy`` for classification, in %) at epochs ``0..epochs``, ``batch_loss``
        (mean over the epoch's batches), ``epoch_time`` (s, training only) and cumulative
        ``time`` (s), ``diverged_at`` (the epoch whose loss was not finite, or ``None``),
        ``failed`` (an error message, or ``None``) and ``warnings`` (message → count).
    """
    t = _get_task(task)
    data = load_task(task) if data is None else data
    runs = [_Run(spec, t, data, seed, epochs, lr_decay) for spec in specs]
    bars = _Bars([s.name for s in specs], seed, epochs, progress)
    try:
        for e in range(epochs):
            shift = e % len(runs)
            # one full collection per round, none while the round's epochs are timed
            gc.collect()
            gc.disable()
            try:
                for i in list(range(shift, len(runs))) + list(range(shift)):
                    runs[i].epoch()
                    bars.update(i, runs[i])
            finally:
                gc.enable()
    finally:
        bars.close()
        for r in runs:
            r.close()
    return {spec.name: r.record() for spec, r in zip(specs, runs, strict=True)}


# =========================================================================== summary


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard deviation (``None`` when a value is not finite or none is given)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    ok = bool(values) and len(finite) == len(values)
    return {"mean": statistics.fmean(finite) if ok else None,
            "std": (statistics.stdev(finite) if len(finite) > 1 else 0.0) if ok else None,
            "values": list(values)}


def _time_ratios(own: Sequence[float], sgd: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(own, sgd, strict=False)
            if math.isfinite(a) and math.isfinite(b) and b > 0]


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per run: best and final training loss, final test metric, epoch time and its ratio
    to the reference's (SGD-m): ``time_ratio`` per seed the median over epochs of
    ``t_run(e) / t_SGD-m(e)`` (same seed and epoch), ``time_ratio_total`` per seed the total
    training time over SGD-m's in the same epochs, each then mean ± std over seeds;
    ``time_ratio_first_epoch`` and ``time_ratio_later_epochs`` are medians over all seeds.
    Also which seeds diverged (at which epoch) or failed."""
    runs = results["runs"]
    reference = results.get("reference")
    classification = results["task"]["kind"] == "classification"
    out: dict[str, dict[str, Any]] = {}
    for name, entry in runs.items():
        seeds = entry["seeds"]
        recs = list(seeds.values())
        best = [min(r["train_loss"][1:]) if len(r["train_loss"]) > 1 else r["train_loss"][0]
                for r in recs]
        final = [r["train_loss"][-1] for r in recs]
        s: dict[str, Any] = {
            "hyper": entry["hyper"],
            "best_train_loss": _stats(best),
            "final_train_loss": _stats(final),
            "final_test_loss": _stats([r["test_loss"][-1] for r in recs]),
            "epoch_ms": _median([t * 1e3 for r in recs for t in r["epoch_time"]]),
            "diverged": {seed: r["diverged_at"] for seed, r in seeds.items()
                         if r["diverged_at"] is not None},
            "failed": {seed: r["failed"] for seed, r in seeds.items() if r["failed"]},
        }
        if classification:
            s["final_test_accuracy"] = _stats([r["test_accuracy"][-1] for r in recs])
            s["best_test_accuracy"] = _stats(
                [max((a for a in r["test_accuracy"][1:] if math.isfinite(a)),
                     default=math.nan) for r in recs])
        if reference is not None:
            ref = runs[reference]["seeds"]
            per_seed, totals, first, later = [], [], [], []
            for seed, r in seeds.items():
                own, base = r["epoch_time"], ref[seed]["epoch_time"]
                ratios = _time_ratios(own, base)
                per_seed.append(statistics.median(ratios) if ratios else math.nan)
                both = [(a, b) for a, b in zip(own, base, strict=False)
                        if math.isfinite(a) and math.isfinite(b)]
                totals.append(sum(a for a, _ in both) / sum(b for _, b in both)
                              if both and sum(b for _, b in both) > 0 else math.nan)
                first += _time_ratios(own[:1], base[:1])
                later += _time_ratios(own[1:], base[1:])
            s["time_ratio"] = _stats(per_seed)
            s["time_ratio_total"] = _stats(totals)
            s["time_ratio_first_epoch"] = _median(first)
            s["time_ratio_later_epochs"] = _median(later)
        out[name] = s
    return out


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


# =========================================================================== the comparison


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"curvlib": curvlib.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform()}
    for name in ("sklearn", "numpy", "matplotlib", "tqdm"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", None)
    return out


def _loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def compare(task: str, specs: Sequence[RunSpec], *, epochs: int | None = None,
            seeds: Sequence[int] = (0,), lr_decay: bool = False, validation: bool = False,
            max_train: int | None = None, progress: bool = False,
            reference: str | None = "SGD-m") -> dict[str, Any]:
    """Train ``specs`` on ``task`` for every seed (each seed in lockstep) and summarise.

    Every spec is built once on the task's model before the data are loaded, so that a bad
    assembly fails at once.

    Args:
        epochs: epochs per run (default: the task's, :attr:`Task.epochs`).
        reference: the run whose epoch time the others are divided by (``None``: no ratios).
        validation, max_train: see :func:`load_task`.
        lr_decay, progress: see :func:`train`.

    Returns:
        A JSON-ready dict (non-finite floats are written as ``null`` by
        :func:`write_results`): ``task``, ``config``, ``versions``, ``reference``, ``runs``
        (``{name: {"recipe", "components", "hyper", "seeds": {seed: record}}}``, records as
        :func:`train` returns them) and ``summary`` (:func:`summarise`).

    Raises:
        CompareError: bad arguments or a run that cannot be built.
    """
    t = _get_task(task)
    epochs = t.epochs if epochs is None else epochs
    if epochs < 1:
        raise CompareError(f"epochs must be a positive integer, got {epochs}")
    seeds = _check_seeds(list(seeds))
    names = [s.name for s in specs]
    if not specs:
        raise CompareError("nothing to run: give at least one recipe or [[run]]")
    if len(set(names)) != len(names):
        raise CompareError(f"run names must be unique, got {names}")
    if reference is not None and reference not in names:
        raise CompareError(f"the reference run {reference!r} is not among the runs {names}")
    coverage: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:  # fail early, before the data are loaded and anything is trained
        opt = spec.build(t.build(torch.Generator().manual_seed(0)), t.likelihood,
                         steps_per_epoch=1, generator=torch.Generator().manual_seed(0))
        rows = opt.coverage() if hasattr(opt, "coverage") else []
        coverage[spec.name] = [{"name": r.name, "shape": list(r.shape), "group": r.group,
                                "preconditioned": r.preconditioned, "treatment": r.treatment}
                               for r in rows]
        close = getattr(opt, "close", None)
        if close is not None:
            close()
    data = load_task(task, validation=validation, max_train=max_train)
    steps = math.ceil(data.x_train.shape[0] / t.batch_size)
    started = time.perf_counter()
    load_start = _loadavg()
    per_seed = {seed: train(task, specs, epochs=epochs, seed=seed, data=data,
                            lr_decay=lr_decay, progress=progress) for seed in seeds}
    results: dict[str, Any] = {
        "task": {"name": t.name, "description": t.description, "kind": t.kind,
                 "likelihood": t.likelihood, "batch_size": t.batch_size,
                 "data": data.describe(), "steps_per_epoch": steps,
                 "split": ("validation (80/20 of the training images)" if validation
                           else "train/test")},
        "config": {"epochs": epochs, "seeds": seeds, "lr_decay": lr_decay,
                   "validation": validation, "max_train": max_train,
                   "threads": torch.get_num_threads()},
        "versions": _versions(),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": _loadavg()},
        "wall_s": round(time.perf_counter() - started, 2),
        "reference": reference,
        "runs": {spec.name: {"recipe": spec.recipe, "components": spec.components,
                             "hyper": spec.hyper, "describe": spec.describe(),
                             "coverage": coverage[spec.name],
                             "seeds": {seed: per_seed[seed][spec.name] for seed in seeds}}
                 for spec in specs},
    }
    results["summary"] = summarise(results)
    return results


# =========================================================================== presentation


def format_fallbacks(results: dict[str, Any]) -> str:
    """For each run whose optimizer leaves parameters to the fallback (SGD with momentum),
    which ones and why (empty when every run preconditions every parameter)."""
    blocks = []
    for name, run in results["runs"].items():
        rows = [r for r in run.get("coverage", []) if not r["preconditioned"]]
        if not rows:
            continue
        width = max(len(r["name"]) for r in rows)
        lines = [f"{name}: {len(rows)} of {len(run['coverage'])} parameter tensors are not "
                 f"preconditioned:"]
        lines += [f"  {r['name'].ljust(width)}  {r['treatment']}" for r in rows]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _fmt_stats(s: dict[str, Any], fmt: str) -> str:
    """``mean ± std`` (the std to two significant digits for ``g`` formats), or the one
    value."""
    if s["mean"] is None:
        return "-"
    if len(s["values"]) == 1:
        return format(s["mean"], fmt)
    std = format(s["std"], ".2g" if fmt.endswith("g") else fmt)
    return f"{format(s['mean'], fmt)} ± {std}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: one row per run, then notes on diverged or failed runs and
    warnings."""
    summary, runs = results["summary"], results["runs"]
    classification = results["task"]["kind"] == "classification"
    n_seeds = len(results["config"]["seeds"])
    metric = "test acc %" if classification else "test loss"
    ratio = "time/epoch x SGD-m" if results["reference"] == "SGD-m" else (
        f"time/epoch x {results['reference']}")
    header = ["run", "hyper-parameters", "best train loss", "final train loss", metric,
              "ms/epoch", ratio, "total x " + (results["reference"] or "-")]
    rows = []
    notes = []
    for name, s in summary.items():
        if s["diverged"] or s["failed"]:
            bad = s["diverged"] | {k: "failed" for k in s["failed"]}
            if len(bad) == n_seeds:
                epochs = sorted({v for v in s["diverged"].values()})
                final = ("diverged (epoch " + ", ".join(map(str, epochs)) + ")") if epochs \
                    else "failed"
            else:
                final = f"diverged/failed in {len(bad)}/{n_seeds} seeds"
            for seed, epoch in s["diverged"].items():
                notes.append(f"{name}, seed {seed}: the loss was not finite in epoch {epoch} "
                             "(diverged); its later epochs were not trained")
            for seed, msg in s["failed"].items():
                notes.append(f"{name}, seed {seed}: FAILED: {msg}")
        else:
            final = _fmt_stats(s["final_train_loss"], ".4g")
        test = (_fmt_stats(s["final_test_accuracy"], ".2f") if classification
                else _fmt_stats(s["final_test_loss"], ".3f"))
        r, total = s.get("time_ratio"), s.get("time_ratio_total")
        rows.append([
            name, runs[name]["describe"], _fmt_stats(s["best_train_loss"], ".4g"), final,
            test, "-" if s["epoch_ms"] is None else f"{s['epoch_ms']:.1f}",
            "-" if r is None or r["mean"] is None else _fmt_stats(r, ".2f"),
            "-" if total is None or total["mean"] is None else _fmt_stats(total, ".2f"),
        ])
    lines = _table(header, rows, right={2, 3, 4, 5, 6, 7})
    for name, entry in runs.items():
        counts: dict[str, int] = {}
        for rec in entry["seeds"].values():
            for msg, c in rec["warnings"].items():
                counts[msg] = counts.get(msg, 0) + c
        for msg, c in counts.items():
            notes.append(f"{name}: {c} warning(s): {msg}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _curves(recs: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float],
                                                                list[float]]:
    """Mean, min and max over seeds of ``key``, up to the first epoch where a seed is not
    finite."""
    n = min(len(r[key]) for r in recs)
    mean, lo, hi = [], [], []
    for e in range(n):
        vals = [r[key][e] for r in recs]
        if any(v is None or not math.isfinite(v) for v in vals):
            break
        mean.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return mean, lo, hi


def plot(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``loss_vs_epoch.png`` and ``loss_vs_time.png`` (training loss on all training
    images, mean over seeds, band from the lowest to the highest seed; a curve stops where a
    seed diverged) into ``out_dir``; returns the paths. Uses matplotlib's Agg canvas (no
    display, no global backend change). Each file is written atomically (a temporary file
    in ``out_dir``, then renamed): an interrupted write leaves the previous file, if any."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"the plots need matplotlib: {_BENCH_HINT}") from None

    out = Path(out_dir)
    task, cfg = results["task"], results["config"]
    title = (f"{task['name']}: {task['description']}\n{task['data']}, batch "
             f"{task['batch_size']}, {len(cfg['seeds'])} seed(s) (mean; band: min-max)")
    paths = []
    for kind, xlabel in (("epoch", "epoch"),
                         ("time", "training time, s (mean over seeds; evaluation not timed)")):
        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, entry in results["runs"].items():
            recs = list(entry["seeds"].values())
            mean, lo, hi = _curves(recs, "train_loss")
            if not mean:
                continue
            if kind == "epoch":
                xs = list(range(len(mean)))
            else:
                xs = [statistics.fmean(r["time"][e] for r in recs) for e in range(len(mean))]
            (line,) = ax.plot(xs, mean, label=f"{name} ({entry['describe']})",
                              marker="." if len(xs) < 30 else None)
            if len(recs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
            if len(mean) < len(recs[0]["train_loss"]):  # diverged: mark where it stopped
                ax.plot(xs[-1:], mean[-1:], marker="x", color=line.get_color(), markersize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (all training images)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        path = out / f"loss_vs_{kind}.png"
        _write_atomic(path, lambda handle, fig=fig: fig.savefig(handle, format="png", dpi=100),
                      binary=True)
        paths.append(path)
    return paths


def _json_ready(o: Any) -> Any:
    """JSON has no inf/nan: such floats become ``null``; dict keys become strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_ready(v) for v in o]
    return o


def _write_atomic(path: Path, write: Callable[[IO[Any]], object], *, binary: bool) -> None:
    """Call ``write(handle)`` on a new temporary file next to ``path``, then rename it onto
    ``path`` (:func:`os.replace`, atomic within a directory): ``path`` is either its previous
    content or the complete new one, never a part. On any error (or an interrupt) the
    temporary file is removed and the error re-raised. The file gets the permissions a
    plain ``open(path, "w")`` would give it (``0o666`` less the umask)."""
    directory = path.parent
    for _ in range(100):
        tmp = directory / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"could not create a temporary file in {os.fspath(directory)!r}")
    try:
        with (os.fdopen(fd, "wb") if binary
              else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``results.json`` into ``out_dir`` (created if needed); returns its path.

    The file is written atomically (a temporary file in ``out_dir``, then renamed): an
    interrupted write leaves the previous ``results.json``, if any, and no temporary file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    ready = _json_ready(results)

    def write(handle: IO[Any]) -> None:
        json.dump(ready, handle, indent=1)
        handle.write("\n")

    _write_atomic(path, write, binary=False)
    return path


def _prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder ``out_dir`` if it is missing and check that a file can be
    written in it (a probe file is created and removed); returns it as a :class:`Path`.

    Raises:
        CompareError: ``out_dir`` is an existing file, cannot be created (a parent is a
            file, permission denied, …) or is not writable; the message names the path.
    """
    out = Path(out_dir)
    shown = f"--out {os.fspath(out_dir)!r}"
    if out.exists() and not out.is_dir():
        raise CompareError(f"{shown} is an existing file, not a directory; pass the path of "
                           "a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"{shown}: cannot create the output directory: "
                           f"{exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".curvlib-compare-", suffix=".probe")
    except OSError as exc:
        raise CompareError(f"{shown}: the output directory is not writable: "
                           f"{exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return out


# =========================================================================== command line


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-negative integers, got {text!r}") from None
    try:
        return _check_seeds(seeds)
    except CompareError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of recipe names")
    return names


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "compare",
        help="train recipes side by side on a digits task; table, plots and JSON",
        description=(
            "Train optimizers side by side on a task built from scikit-learn's digits "
            "(one epoch each in turn per seed, so that their epoch times compare), then print "
            "best and final training loss, test accuracy (or test loss) and time per epoch as "
            "a ratio to SGD-m's, and write loss_vs_epoch.png, loss_vs_time.png and "
            f"results.json. Needs the bench extra: {_BENCH_HINT}."
        ),
    )
    p.add_argument("--task", default=None, metavar="TASK",
                   help=f"one of {', '.join(TASKS)} (default: digits-mlp)")
    p.add_argument("--recipes", type=_name_list, default=None, metavar="R1,R2,...",
                   help=f"recipes to run, from {', '.join(RECIPES)} (default: "
                        f"{','.join(DEFAULT_RECIPES)}); sgd is always run, as the timing "
                        "reference")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="TOML file: task, epochs, seeds, recipes, [hyper.<recipe>] tables, "
                        "and [[run]] entries defining new assemblies (see docs/cli.md)")
    p.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                   help="epochs per run (default: " + ", ".join(
                       f"{t.name} {t.epochs}" for t in TASKS.values()) + ")")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                   help="seeds, comma-separated (default: 0)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate of every curvlib run (not SGD-m and Adam: set theirs "
                        "in --config); a [hyper.<recipe>] or [[run]] value in --config wins")
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="damping of every curvlib run (FNGD: alpha); a --config value wins")
    p.add_argument("--lr-decay", action="store_true", default=None,
                   help="multiply the learning rates by 0.1 at 50%% and at 75%% of the epochs "
                        "(default: constant)")
    p.add_argument("--out", default="curvlib-compare", metavar="DIR",
                   help="output folder for results.json and the plots (default: "
                        "./curvlib-compare)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads (default: 1; the layers are small, and one thread "
                        "gives steadier timings)")
    p.add_argument("--max-train", type=_positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick checks)")
    p.add_argument("--validation", action="store_true",
                   help="train on 80%% of the training images and report on the other 20%% "
                        "instead of the test images (for tuning)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    p.set_defaults(subparser=p)
    return p


def _resolve(args: argparse.Namespace
             ) -> tuple[str, list[RunSpec], int, list[int], bool, str | None]:
    """Task, runs, epochs, seeds and lr decay from the flags (first) and the config file, and
    the config file's text (``None`` without one)."""
    cfg = load_config(args.config) if args.config else Config()
    task = args.task or cfg.task or "digits-mlp"
    _get_task(task)
    recipes = args.recipes or cfg.recipes
    if recipes is None:
        recipes = list(DEFAULT_RECIPES)
    recipes = [_get_recipe(r).name for r in recipes]
    if len(set(recipes)) != len(recipes):
        raise CompareError(f"a recipe is listed twice: {recipes}")
    if "sgd" not in recipes:
        recipes.insert(0, "sgd")  # the timing reference
    specs = specs_from_config(task, recipes, cfg, lr=args.lr, damping=args.damping)
    epochs = args.epochs or cfg.epochs or TASKS[task].epochs
    seeds = args.seeds or cfg.seeds or [0]
    lr_decay = bool(args.lr_decay if args.lr_decay is not None else cfg.lr_decay)
    return task, specs, epochs, seeds, lr_decay, cfg.text


#: The lines printed under the table.
EXPLANATION = """\
train loss: mean loss on all training images after an epoch (best: the lowest over the epochs)
ms/epoch: median training time of an epoch (evaluation is not timed)
time/epoch x SGD-m: per seed, the median over epochs of the run's epoch time over SGD-m's
  epoch time in the same epoch (the runs of a seed train in lockstep)
total x SGD-m: per seed, the run's total training time over SGD-m's
mean ± std over the seeds where more than one seed ran"""


def run(args: argparse.Namespace) -> int:
    """Run ``curvlib compare`` with parsed arguments; returns the exit status (0 ok, 1 a run
    failed, a dependency is missing or the results could not be written; usage errors —
    a bad flag or config file, an output folder that cannot be created or written — exit
    with 2 through argparse, before any training)."""
    parser: argparse.ArgumentParser = args.subparser
    try:
        task, specs, epochs, seeds, lr_decay, config_text = _resolve(args)
    except CompareError as exc:
        parser.error(str(exc))
    progress = not args.no_progress and sys.stderr.isatty()
    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            print(f"curvlib compare: the progress bars need tqdm: {_BENCH_HINT} (or pass "
                  "--no-progress)", file=sys.stderr)
            return 1
    try:  # before training: a run must not end with nowhere to write its results
        out = _prepare_out_dir(args.out)
    except CompareError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    t = TASKS[task]
    print(f"curvlib compare: {task}: {t.description}")
    print(f"{len(specs)} runs x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
          f"{epochs} epochs, batch {t.batch_size}, "
          f"lr {'x0.1 at 50% and 75% of the epochs' if lr_decay else 'constant'}, "
          f"{args.threads} thread(s)", flush=True)
    try:
        results = compare(task, specs, epochs=epochs, seeds=seeds, lr_decay=lr_decay,
                          validation=args.validation, max_train=args.max_train,
                          progress=progress)
    except CompareError as exc:
        parser.error(str(exc))
    except ImportError as exc:
        print(f"curvlib compare: {exc}", file=sys.stderr)
        return 1
    results["command"] = " ".join(["curvlib", *sys.argv[1:]]) if sys.argv else None
    results["argv"] = list(sys.argv)
    results["config"]["config_file"] = args.config
    if args.config:  # the file as it was read, so that the run can be repeated
        results["config"]["config_text"] = config_text
    results["config"]["recipes"] = [s.recipe for s in specs if s.recipe is not None]
    print(f"data: {results['task']['data']} "
          f"({results['task']['split']}); trained and evaluated in {results['wall_s']:.1f} s")
    print()
    print(format_table(results))
    print()
    fallbacks = format_fallbacks(results)
    if fallbacks:
        print(fallbacks)
        print()
    print(EXPLANATION)
    try:
        path = write_results(results, out)
        pngs = plot(results, out)
    except ImportError as exc:
        print(f"curvlib compare: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up or the folder went away meanwhile
        print(f"curvlib compare: cannot write the results into {os.fspath(out)!r}: {exc}",
              file=sys.stderr)
        return 1
    print(f"wrote {path}, {', '.join(map(str, pngs))}")
    failed = any(s["failed"] for s in results["summary"].values())
    return 1 if failed else 0
