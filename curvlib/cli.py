r"""The ``curvlib`` command: compare Fisher approximations on real data, list plugins.

Subcommands:

* ``curvlib fisher`` — the main job. On scikit-learn's bundled digits it builds a small tanh
  MLP (nothing is trained) and computes, with the dense float64 oracles of
  :mod:`curvlib.testing.oracles`, the exact Fisher of the categorical likelihood, Monte-Carlo
  Fishers for several sample counts and the empirical Fisher. It prints, per layer block and
  for the whole model, the size, trace and Frobenius norm of the exact Fisher, the relative
  Frobenius difference of each approximation to it, and the cosine between the damped natural
  gradients ``(F + λI)⁻¹ g`` of each approximation and of the exact Fisher. ``--json PATH``
  writes every number.
* ``curvlib compare`` — trains recipes (default: SGD-m, Adam, KFAC, Shampoo, TNT, FNGD) and
  new assemblies from a TOML file side by side on a digits task; prints best and final
  training loss, test accuracy or loss and time per epoch as a ratio to SGD-m, and writes
  loss plots and a JSON of every curve (:mod:`curvlib.compare`).
* ``curvlib fisher-check`` — the TNT paper's Figure 1 on digits upsampled to 16×16 with the
  256-20-20-20-20-20-10 tanh MLP: along the block-Fisher method's trajectory, the per-layer
  cosine of the TNT, KFAC, Shampoo, Adam and SGD-m directions to the block-Fisher direction;
  prints a table, writes a PNG and a JSON (:mod:`curvlib.fisher_check`).
* ``curvlib plugins`` — every registered component by kind, with the distribution it came
  from, and how to register one.

``python -m curvlib`` runs the same command. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import __version__
from curvlib._argtypes import positive_float as _positive_float
from curvlib._argtypes import positive_int as _positive_int
from curvlib.registry import ENTRY_POINT_GROUP, KINDS, available
from curvlib.testing import oracles
from curvlib.testing.assertions import cosine_similarity, relative_error

__all__ = [
    "DIGITS_SIZE",
    "MAX_PARAMETERS",
    "Block",
    "build_mlp",
    "build_parser",
    "fisher_report",
    "format_report",
    "layer_blocks",
    "load_digits_data",
    "main",
]

#: Number of images in scikit-learn's digits data set.
DIGITS_SIZE = 1797
#: Largest ``P`` the dense ``P × P`` comparison accepts (each matrix is ``8 P²`` bytes).
MAX_PARAMETERS = 8000
#: Input and output widths of the digits MLP (8 × 8 pixels, 10 classes).
DIGITS_IN, DIGITS_OUT = 64, 10

_BENCH_HINT = 'pip install -e ".[bench]"'


# --------------------------------------------------------------------------- argument types


def _int_list(text: str, *, allow_empty: bool) -> list[int]:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not parts and not allow_empty:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    values = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers, got {part!r} in {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"every entry must be a positive integer, got {value} in {text!r}"
            )
        values.append(value)
    return values


def _hidden_widths(text: str) -> list[int]:
    return _int_list(text, allow_empty=True)


def _sample_counts(text: str) -> list[int]:
    counts = _int_list(text, allow_empty=False)
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"sample counts must be distinct, got {text!r}")
    return sorted(counts)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlib`` command (subcommands ``fisher`` and ``plugins``)."""
    parser = argparse.ArgumentParser(
        prog="curvlib",
        description="curvlib: second-order optimizer components and their reference checks.",
    )
    parser.add_argument("--version", action="version", version=f"curvlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fisher = sub.add_parser(
        "fisher",
        help="compare exact, Monte-Carlo and empirical Fisher of an MLP on sklearn digits",
        description=(
            "Build a seeded tanh MLP (untrained) for scikit-learn's digits and compare, per "
            "layer block and for the whole model, the Monte-Carlo and empirical Fisher with "
            "the exact Fisher of the categorical likelihood (dense float64 oracles). Needs "
            f"scikit-learn: {_BENCH_HINT}."
        ),
    )
    fisher.add_argument(
        "--num-data",
        type=_positive_int,
        default=512,
        metavar="N",
        help=f"use the first N digits images, 1..{DIGITS_SIZE} (default: 512)",
    )
    fisher.add_argument(
        "--hidden",
        type=_hidden_widths,
        default=[16],
        metavar="W1,W2,...",
        help="hidden widths, comma-separated; '' for no hidden layer (default: 16)",
    )
    fisher.add_argument(
        "--mc-samples",
        type=_sample_counts,
        default=[1, 8, 64],
        metavar="S1,S2,...",
        help="Monte-Carlo sample counts per image, comma-separated (default: 1,8,64)",
    )
    fisher.add_argument(
        "--damping",
        type=_positive_float,
        default=1e-3,
        metavar="LAMBDA",
        help="damping lambda > 0 of the natural gradient (F + lambda I)^-1 g (default: 1e-3)",
    )
    fisher.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weight initialisation and of the Monte-Carlo sampling (default: 0)",
    )
    fisher.add_argument(
        "--json",
        type=str,
        default=None,
        metavar="PATH",
        help="also write every number as JSON to PATH",
    )

    fisher.set_defaults(subparser=fisher)

    sub.add_parser(
        "plugins",
        help="list the registered components and where they came from",
        description="List every registered component by kind with the distribution it came "
        "from, and say how to register one.",
    )
    from curvlib import compare, fisher_check

    compare.add_parser(sub)
    fisher_check.add_parser(sub)
    return parser


# --------------------------------------------------------------------------- data and model


def load_digits_data(num_data: int) -> tuple[Tensor, Tensor]:
    """The first ``num_data`` digits images as float64 pixels in ``[0, 1]`` and their labels.

    Returns ``(inputs, labels)`` of shapes ``(num_data, 64)`` (pixels divided by 16) and
    ``(num_data,)`` (int64 classes 0–9).

    Raises:
        ImportError: scikit-learn is not installed (the ``bench`` extra).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.as_tensor(digits.data[:num_data], dtype=torch.float64) / 16.0
    labels = torch.as_tensor(digits.target[:num_data], dtype=torch.int64)
    return inputs, labels


def build_mlp(widths: Sequence[int], seed: int) -> nn.Sequential:
    """A float64 MLP ``widths[0] → … → widths[-1]`` with tanh between its Linear layers.

    Weights are Glorot-uniform drawn from a :class:`torch.Generator` seeded with ``seed``
    (layer by layer, in order), biases are zero; the last layer has no activation (logits).
    """
    if len(widths) < 2:
        raise ValueError(f"an MLP needs an input and an output width, got {list(widths)}")
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out, dtype=torch.float64)
        with torch.no_grad():
            nn.init.xavier_uniform_(linear.weight, generator=generator)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Block:
    """A contiguous index range ``[start, stop)`` of the flat parameter vector.

    Attributes:
        name: a label for the table (``layer 1 (64->16)`` for a Linear layer).
        start: first index in the ``model.parameters()`` order, flattened row-major.
        stop: one past the last index.
    """

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        """The number of parameter entries ``P`` of the block."""
        return self.stop - self.start

    def of_matrix(self, matrix: Tensor) -> Tensor:
        """The diagonal block ``matrix[start:stop, start:stop]``."""
        return matrix[self.start : self.stop, self.start : self.stop]

    def of_vector(self, vector: Tensor) -> Tensor:
        """The entries ``vector[start:stop]``."""
        return vector[self.start : self.stop]


def layer_blocks(model: nn.Module) -> list[Block]:
    """One block per module that owns trainable parameters (a Linear: weight and bias together).

    Index ranges follow ``model.parameters()`` order, the order of the oracles' ``P`` axis;
    a module's parameters must be adjacent in that order.
    """
    blocks: list[Block] = []
    owners: list[str] = []
    offset = 0
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = name.rpartition(".")[0]
        if owners and owners[-1] == owner:
            last = blocks[-1]
            blocks[-1] = Block(last.name, last.start, last.stop + param.numel())
        else:
            if owner in owners:
                raise ValueError(f"the parameters of module {owner!r} are not adjacent")
            owners.append(owner)
            module = modules[owner]
            label = f"layer {len(blocks) + 1}"
            if isinstance(module, nn.Linear):
                label += f" ({module.in_features}->{module.out_features})"
            blocks.append(Block(label, offset, offset + param.numel()))
        offset += param.numel()
    return blocks


# --------------------------------------------------------------------------- the computation


def _mc_key(samples: int) -> str:
    return f"mc_{samples}"


def fisher_report(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    mc_samples: Sequence[int],
    damping: float,
    seed: int,
) -> dict[str, Any]:
    """Compare MC and empirical Fisher with the exact Fisher, per layer block and in total.

    All matrices come from :mod:`curvlib.testing.oracles` with the categorical likelihood.
    The Monte-Carlo Fisher with ``S`` samples uses its own :class:`torch.Generator` seeded
    with ``seed``, so each count's result does not depend on which other counts are asked
    for. Per block ``b`` (and for ``"all"``, the full ``P × P`` matrices):

    * ``trace_exact``, ``frobenius_exact`` of ``F_bb``;
    * ``rel_diff[key] = ‖A_bb − F_bb‖_F / ‖F_bb‖_F`` for ``key`` in ``mc_<S>``, ``empirical``;
    * ``cosine[key]`` = cosine of ``(A_bb + λI)⁻¹ g_b`` and ``(F_bb + λI)⁻¹ g_b`` with ``g``
      the mean data-label gradient (block-diagonal natural gradients, TNT paper Fig. 1).

    Returns a JSON-serialisable dict (see ``docs/cli.md`` for its layout).
    """
    lik = "categorical"
    start = time.perf_counter()
    exact = oracles.exact_fisher(model, lik, inputs)
    approx: dict[str, Tensor] = {}
    for s in mc_samples:
        generator = torch.Generator().manual_seed(seed)
        approx[_mc_key(s)] = oracles.mc_fisher(model, lik, inputs, s, generator=generator)
    approx["empirical"] = oracles.empirical_fisher(model, lik, inputs, labels)
    grad = oracles.gradient(model, lik, inputs, labels)

    blocks = layer_blocks(model)
    total = Block("all", 0, exact.shape[0])

    def summarise(block: Block) -> dict[str, Any]:
        f_exact = block.of_matrix(exact)
        g = block.of_vector(grad)
        d_exact = oracles.natural_gradient(f_exact, g, damping)
        rel, cos = {}, {}
        for key, matrix in approx.items():
            f_approx = block.of_matrix(matrix)
            rel[key] = relative_error(f_approx, f_exact)
            cos[key] = cosine_similarity(oracles.natural_gradient(f_approx, g, damping), d_exact)
        return {
            "name": block.name,
            "start": block.start,
            "stop": block.stop,
            "P": block.size,
            "trace_exact": torch.trace(f_exact).item(),
            "frobenius_exact": torch.linalg.matrix_norm(f_exact).item(),
            "rel_diff": rel,
            "cosine": cos,
        }

    rows = [summarise(b) for b in blocks]
    whole = summarise(total)
    return {
        "N": int(inputs.shape[0]),
        "P": int(exact.shape[0]),
        "likelihood": lik,
        "mc_samples": list(mc_samples),
        "damping": damping,
        "seed": seed,
        "approximations": list(approx),
        "blocks": rows,
        "total": whole,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- printing


def _column_titles(report: dict[str, Any]) -> list[str]:
    return [f"MC S={s}" for s in report["mc_samples"]] + ["empirical"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        right = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        cells = [row[0].ljust(widths[0]), *right]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(report: dict[str, Any], architecture: str) -> str:
    """The human-readable header and the two tables of a :func:`fisher_report`."""
    keys = report["approximations"]
    counts = ", ".join(str(s) for s in report["mc_samples"])
    lines = [
        "curvlib fisher: exact vs Monte-Carlo vs empirical Fisher, tanh MLP on sklearn digits",
        f"N = {report['N']} images, MLP {architecture}, P = {report['P']} parameters, "
        f"seed = {report['seed']}",
        f"MC samples S = {counts}, damping lambda = {report['damping']:g}; nothing is trained",
        "  exact F     = (1/N) sum_n J_n^T Lambda(f_n) J_n, Lambda = diag(p) - p p^T (categorical)",
        "  MC F (S)    = (1/(N S)) sum_n sum_s g_ns g_ns^T, g_ns = grad loss at y_ns ~ p(.|f_n)",
        "  empirical F = (1/N) sum_n g_n g_n^T, g_n = grad loss at the data label y_n",
        "  rel diff    = ||F_approx - F_exact||_F / ||F_exact||_F on the block",
        "  cosine      = cos((F_approx + lambda I)^-1 g, (F_exact + lambda I)^-1 g) on the block,",
        "                g = (1/N) sum_n g_n (block-diagonal natural gradients)",
        "  blocks      = each Linear layer's weight and bias; 'all' = the full P x P matrices",
        "",
        "Fisher blocks: size, exact trace and norm; relative Frobenius difference to exact",
    ]
    rows = []
    for row in [*report["blocks"], report["total"]]:
        rows.append(
            [
                row["name"],
                str(row["P"]),
                f"{row['trace_exact']:.4e}",
                f"{row['frobenius_exact']:.4e}",
                *(f"{row['rel_diff'][k]:.4f}" for k in keys),
            ]
        )
    lines += _table(["block", "P", "tr F_exact", "||F_exact||_F", *_column_titles(report)], rows)
    lines += [
        "",
        f"Damped natural gradients (lambda = {report['damping']:g}): cosine to the exact-Fisher "
        "direction",
    ]
    rows = [
        [row["name"], *(f"{row['cosine'][k]:.4f}" for k in keys)]
        for row in [*report["blocks"], report["total"]]
    ]
    lines += _table(["block", *_column_titles(report)], rows)
    lines += ["", f"computed in {report['seconds']:.1f} s"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- subcommands


def _run_fisher(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    if args.num_data > DIGITS_SIZE:
        parser.error(f"--num-data must be at most {DIGITS_SIZE} (the size of digits)")
    widths = [DIGITS_IN, *args.hidden, DIGITS_OUT]
    num_params = sum(a * b + b for a, b in itertools.pairwise(widths))
    if num_params > MAX_PARAMETERS:
        parser.error(
            f"--hidden {','.join(map(str, args.hidden))} gives P = {num_params} parameters; "
            f"the dense P x P comparison allows at most {MAX_PARAMETERS}"
        )
    try:
        inputs, labels = load_digits_data(args.num_data)
    except ImportError:
        print(
            "curvlib fisher needs scikit-learn for the digits data set; install the bench "
            f"extra: {_BENCH_HINT}  (or: pip install scikit-learn)",
            file=sys.stderr,
        )
        return 1
    model = build_mlp(widths, args.seed)
    report = fisher_report(model, inputs, labels, args.mc_samples, args.damping, args.seed)
    architecture = "-".join(map(str, widths))
    report["architecture"] = architecture
    print(format_report(report, architecture))
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"wrote {args.json}")
    return 0


def _run_plugins() -> int:
    registered = available()
    print("Registered curvlib components, by kind (name: distribution it came from)")
    for kind in KINDS:
        entries = registered[kind]
        print(f"{kind} ({len(entries)})")
        if not entries:
            print("  (none)")
        width = max((len(name) for name in entries), default=0)
        for name, origin in entries.items():
            print(f"  {name.ljust(width)}  {origin}")
    print(
        "\nTo register a component, decorate it in your own code:\n"
        '    @curvlib.register("likelihood", "poisson")\n'
        "    class Poisson(curvlib.Likelihood): ...\n"
        f"or, from an installed package, declare the {ENTRY_POINT_GROUP!r} entry-point "
        "group\nin its pyproject.toml:\n"
        f'    [project.entry-points."{ENTRY_POINT_GROUP}"]\n'
        '    poisson = "curvlib_poisson"   # a module whose import registers components\n'
        f"The kinds are: {', '.join(KINDS)}."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``curvlib`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Bad arguments raise :class:`SystemExit` with code 2 (argparse's convention).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fisher":
        return _run_fisher(args)
    if args.command == "compare":
        from curvlib import compare

        return compare.run(args)
    if args.command == "fisher-check":
        from curvlib import fisher_check

        return fisher_check.run(args)
    return _run_plugins()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
