"""Tests of the ``curvlib`` command (:mod:`curvlib.cli`), run in-process through ``main``.

One small ``curvlib fisher`` run (64 images, one hidden layer of width 4, P = 310) is shared by
the tests that read its table and its JSON; its numbers are checked against the oracles of
:mod:`curvlib.testing.oracles` computed here directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from curvlib import cli
from curvlib.testing import oracles
from curvlib.testing.assertions import cosine_similarity, relative_error

NEEDS_SKLEARN = 'curvlib fisher needs scikit-learn: pip install -e ".[bench]"'
NUM_DATA = 64
HIDDEN = 4
MC_SAMPLES = (1, 4, 32)
SEED = 3
DAMPING = 1e-2
ARGS = [
    "fisher",
    "--num-data", str(NUM_DATA),
    "--hidden", str(HIDDEN),
    "--mc-samples", ",".join(map(str, MC_SAMPLES)),
    "--damping", str(DAMPING),
    "--seed", str(SEED),
]  # fmt: skip
BLOCK_NAMES = ["layer 1 (64->4)", "layer 2 (4->10)", "all"]
APPROX_TITLES = [f"MC S={s}" for s in MC_SAMPLES] + ["empirical"]
APPROX_KEYS = [f"mc_{s}" for s in MC_SAMPLES] + ["empirical"]


def _require_sklearn() -> None:
    """Fail (never skip): the test command installs the bench extra, so sklearn is there."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        pytest.fail(NEEDS_SKLEARN)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """``(stdout, json report)`` of one small ``curvlib fisher`` run."""
    _require_sklearn()
    path = tmp_path_factory.mktemp("cli") / "fisher.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([*ARGS, "--json", str(path)])
    assert code == 0
    return out.getvalue(), json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model and data of the shared run, rebuilt here: digits straight from sklearn."""
    _require_sklearn()
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data[:NUM_DATA], dtype=torch.float64) / 16
    labels = torch.tensor(digits.target[:NUM_DATA], dtype=torch.int64)
    return cli.build_mlp([64, HIDDEN, 10], SEED), inputs, labels


@pytest.fixture(scope="module")
def exact(problem: tuple[torch.nn.Module, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The exact Fisher of the shared run, from the oracle."""
    model, inputs, _ = problem
    return oracles.exact_fisher(model, "categorical", inputs)


def _cells(line: str) -> list[str]:
    """A table line's cells: columns are separated by two or more spaces."""
    return re.split(r" {2,}", line.strip())


def _table(stdout: str, first_title: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows of the table whose header starts with ``first_title``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_title))
    header = _cells(lines[start])
    assert set(lines[start + 1]) <= {"-", " "}, "a rule under the header"
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(_cells(line))
    return header, rows


def _fisher_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    return _table(stdout, "block  ")


def _cosine_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    second = stdout[stdout.index("Damped natural gradients") :]
    return _table(second, "block  ")


# --------------------------------------------------------------------------- the printed table


def test_header_states_what_is_printed(run: tuple[str, dict[str, Any]]) -> None:
    stdout, _ = run
    assert f"N = {NUM_DATA} images" in stdout
    assert "P = 310 parameters" in stdout
    assert f"seed = {SEED}" in stdout
    assert "MLP 64-4-10" in stdout
    for definition in ("exact F", "MC F (S)", "empirical F", "rel diff", "cosine"):
        assert definition in stdout


def test_fisher_table_has_the_rows_and_columns(run: tuple[str, dict[str, Any]]) -> None:
    stdout, report = run
    header, rows = _fisher_table(stdout)
    assert header == ["block", "P", "tr F_exact", "||F_exact||_F", *APPROX_TITLES]
    assert [r[0] for r in rows] == BLOCK_NAMES
    for row, data in zip(rows, [*report["blocks"], report["total"]], strict=True):
        assert len(row) == len(header)
        assert row[1] == str(data["P"])
        # The table prints 5 significant digits (.4e) and 4 decimals (.4f): these compare the
        # printed rounding with the JSON; the values themselves are checked against the
        # oracles at 1e-10 further down this file.
        assert float(row[2]) == pytest.approx(data["trace_exact"], rel=1e-4)
        assert float(row[3]) == pytest.approx(data["frobenius_exact"], rel=1e-4)
        for cell, key in zip(row[4:], APPROX_KEYS, strict=True):
            assert float(cell) == pytest.approx(data["rel_diff"][key], abs=1e-4)


def test_cosine_table_compares_each_approximation_only(run: tuple[str, dict[str, Any]]) -> None:
    stdout, report = run
    header, rows = _cosine_table(stdout)
    # The exact-vs-exact cosine (always 1) is not a column: only the approximations are.
    assert header == ["block", *APPROX_TITLES]
    assert "exact" not in " ".join(header[1:])
    assert [r[0] for r in rows] == BLOCK_NAMES
    for row, data in zip(rows, [*report["blocks"], report["total"]], strict=True):
        for cell, key in zip(row[1:], APPROX_KEYS, strict=True):
            value = float(cell)
            assert -1.0 <= value <= 1.0
            assert value == pytest.approx(data["cosine"][key], abs=1e-4)


# --------------------------------------------------------------------------- the numbers


def test_json_layout(run: tuple[str, dict[str, Any]]) -> None:
    _, report = run
    assert report["N"] == NUM_DATA and report["P"] == 310
    assert report["mc_samples"] == list(MC_SAMPLES)
    assert report["seed"] == SEED and report["damping"] == DAMPING
    assert report["approximations"] == APPROX_KEYS
    stops = [0] + [b["stop"] for b in report["blocks"]]
    assert [b["start"] for b in report["blocks"]] == stops[:-1], "blocks are contiguous"
    assert stops[-1] == report["P"]
    assert [b["P"] for b in report["blocks"]] == [64 * HIDDEN + HIDDEN, HIDDEN * 10 + 10]


def test_mc_error_decreases_with_samples(run: tuple[str, dict[str, Any]]) -> None:
    # The MC Fisher with S samples is an average of S independent unbiased estimates of F, so
    # E‖F_S − F‖²_F = σ²/S: the error scales as 1/√S, here 1/√32 ≈ 0.18 of the one-sample
    # error. ‖F_S − F‖²_F is a sum over N = 64 independent images of many squared terms, so it
    # concentrates near its mean, and a reversal of a ratio √32 ≈ 5.7 in the error would need a
    # fluctuation far outside its spread: it holds with high probability for any seed (and
    # the seed is fixed, so the test is deterministic).
    _, report = run
    for row in [*report["blocks"], report["total"]]:
        errors = [row["rel_diff"][f"mc_{s}"] for s in MC_SAMPLES]
        assert errors[-1] < errors[0], row["name"]
        assert 0 < errors[-1] < 1
    cosines = [report["total"]["cosine"][f"mc_{s}"] for s in MC_SAMPLES]
    assert cosines[-1] > cosines[0]


def test_exact_numbers_match_the_oracle(
    run: tuple[str, dict[str, Any]],
    problem: tuple[torch.nn.Module, torch.Tensor, torch.Tensor],
    exact: torch.Tensor,
) -> None:
    _, report = run
    model, _, _ = problem
    blocks = cli.layer_blocks(model)
    assert [b.name for b in blocks] == BLOCK_NAMES[:-1]
    for block, row in zip(blocks, report["blocks"], strict=True):
        f = exact[block.start : block.stop, block.start : block.stop]
        assert row["trace_exact"] == pytest.approx(torch.trace(f).item(), rel=1e-10)
        assert row["frobenius_exact"] == pytest.approx(torch.linalg.norm(f).item(), rel=1e-10)
    # Each Linear block is the oracle's weight block and bias block together.
    per_tensor = oracles.blocks(exact, model)
    traces = [torch.trace(b).item() for b in per_tensor]
    assert report["blocks"][0]["trace_exact"] == pytest.approx(traces[0] + traces[1], rel=1e-10)
    assert report["blocks"][1]["trace_exact"] == pytest.approx(traces[2] + traces[3], rel=1e-10)
    assert report["total"]["trace_exact"] == pytest.approx(torch.trace(exact).item(), rel=1e-10)
    assert report["total"]["frobenius_exact"] == pytest.approx(
        torch.linalg.norm(exact).item(), rel=1e-10
    )


def test_total_trace_is_the_sum_of_block_traces(run: tuple[str, dict[str, Any]]) -> None:
    _, report = run
    total = sum(b["trace_exact"] for b in report["blocks"])
    assert report["total"]["trace_exact"] == pytest.approx(total, rel=1e-10)
    # The Frobenius norm of the whole matrix also counts the off-diagonal blocks.
    squares = sum(b["frobenius_exact"] ** 2 for b in report["blocks"])
    assert report["total"]["frobenius_exact"] >= math.sqrt(squares) * (1 - 1e-12)


def test_approximations_match_the_oracles(
    run: tuple[str, dict[str, Any]],
    problem: tuple[torch.nn.Module, torch.Tensor, torch.Tensor],
    exact: torch.Tensor,
) -> None:
    _, report = run
    model, inputs, labels = problem
    empirical = oracles.empirical_fisher(model, "categorical", inputs, labels)
    generator = torch.Generator().manual_seed(SEED)  # each S has its own generator from --seed
    mc1 = oracles.mc_fisher(model, "categorical", inputs, 1, generator=generator)
    grad = oracles.gradient(model, "categorical", inputs, labels)
    for block, row in zip(cli.layer_blocks(model), report["blocks"], strict=True):
        cut = slice(block.start, block.stop)
        f, g = exact[cut, cut], grad[cut]
        direction = oracles.natural_gradient(f, g, DAMPING)
        for key, matrix in (("empirical", empirical), ("mc_1", mc1)):
            a = matrix[cut, cut]
            assert row["rel_diff"][key] == pytest.approx(relative_error(a, f), rel=1e-10)
            cosine = cosine_similarity(oracles.natural_gradient(a, g, DAMPING), direction)
            assert row["cosine"][key] == pytest.approx(cosine, rel=1e-8)
    assert report["total"]["rel_diff"]["empirical"] == pytest.approx(
        relative_error(empirical, exact), rel=1e-10
    )


# --------------------------------------------------------------------------- model and errors


def test_build_mlp_is_seeded_glorot_with_zero_biases() -> None:
    model = cli.build_mlp([64, 16, 10], seed=0)
    again = cli.build_mlp([64, 16, 10], seed=0)
    other = cli.build_mlp([64, 16, 10], seed=1)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [type(m).__name__ for m in model] == ["Linear", "Tanh", "Linear"]
    for layer in linears:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.dtype == torch.float64
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    for a, b, c in zip(model.parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert a.abs().sum() == 0 or not torch.equal(a, c)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--mc-samples", "0", "positive integer"),
        ("--mc-samples", "1,x", "positive integers"),
        ("--mc-samples", "4,4", "distinct"),
        ("--num-data", "-3", "positive integer"),
        ("--num-data", "5000", "at most 1797"),
        ("--hidden", "16,0", "positive integer"),
        ("--hidden", "500,500", "at most"),
        ("--damping", "0", "positive"),
        ("--damping", "nan", "positive"),
    ],
)
def test_bad_flag_values_exit_with_an_argparse_error(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["fisher", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: curvlib fisher" in err
    assert message in err
    if flag in ("--mc-samples", "--hidden") and value != "500,500":
        assert flag in err


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_missing_sklearn_says_how_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["fisher", "--num-data", "2"]) == 1
    captured = capsys.readouterr()
    assert 'pip install -e ".[bench]"' in captured.err
    assert captured.out == ""


# --------------------------------------------------------------------------- plugins


def test_plugins_lists_the_builtin_likelihoods(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("likelihood (")))
    entries = {}
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        name, origin = line.split()
        entries[name] = origin
    for name in ("categorical", "bernoulli", "gaussian"):
        assert entries[name] == "curvlib"
    for kind in ("likelihood", "layer", "source", "structure", "solver", "damping"):
        assert any(line.startswith(f"{kind} (") for line in lines)
    assert "@curvlib.register(" in out
    assert '[project.entry-points."curvlib.plugins"]' in out


def test_python_dash_m_runs_the_command() -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "curvlib", "--version"],
        capture_output=True, text=True, cwd=root, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("curvlib ")
