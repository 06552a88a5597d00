"""Tests of ``curvlib compare`` (:mod:`curvlib.compare`).

The command runs as a subprocess (``python -m curvlib compare``) on tiny settings: one epoch,
200 training images, few recipes. The library layer (``train``, ``compare``, ``load_config``)
is checked in-process where a subprocess would only add start-up time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from curvlib import cli
from curvlib import compare as cmp

TINY = ["--epochs", "1", "--max-train", "200", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process runs use one thread, as the command does (tiny layers: a second thread
    only adds synchronisation, and much waiting on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require_bench() -> None:
    """Fail (never skip): the test command installs the bench extra."""
    for module in ("sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f'curvlib compare needs {module}: pip install -e ".[bench]"')


def _compare(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    _require_bench()
    return subprocess.run([sys.executable, "-m", "curvlib", "compare", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def _rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by run name (cells are separated by two or more spaces)."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run  "))
    assert set(lines[start + 1]) <= {"-", " "}
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r" {2,}", line.strip())
        rows[cells[0]] = cells
    return rows


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("compare") / "out"
    result = _compare("--recipes", "sgd,kfac,fngd", "--seeds", "0,1", "--out", str(out), *TINY)
    return result, out


def test_prints_the_table(default_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _ = default_run
    assert result.returncode == 0, result.stdout + result.stderr
    header = result.stdout.splitlines()
    assert any("time/epoch x SGD-m" in line and "test acc %" in line for line in header)
    rows = _rows(result.stdout)
    assert list(rows) == ["SGD-m", "KFAC", "FNGD"]
    assert rows["SGD-m"][-1].startswith("1.00")  # the reference's own ratio
    assert "lr=0.1" in rows["SGD-m"][1]
    for cells in rows.values():
        assert " ± " in cells[3], "two seeds: mean ± std of the final train loss"
    # no progress bars when stderr is not a terminal (and --no-progress)
    assert "\r" not in result.stderr and "epoch/s" not in result.stderr


def test_writes_plots_and_json(default_run: tuple[subprocess.CompletedProcess[str], Path]
                               ) -> None:
    result, out = default_run
    assert result.returncode == 0, result.stderr
    for name in ("loss_vs_epoch.png", "loss_vs_time.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["config"]["epochs"] == 1 and data["config"]["seeds"] == [0, 1]
    assert data["config"]["max_train"] == 200
    assert data["task"]["name"] == "digits-mlp"
    assert data["versions"]["torch"] == torch.__version__
    assert "compare" in data["command"] and "--recipes" in data["argv"]
    assert data["reference"] == "SGD-m"
    kfac = data["runs"]["KFAC"]
    assert kfac["recipe"] == "kfac" and kfac["hyper"] == cmp.DEFAULTS["digits-mlp"]["kfac"]
    rec = kfac["seeds"]["1"]
    assert len(rec["train_loss"]) == 2 and len(rec["time"]) == 2  # epochs 0 and 1
    assert len(rec["epoch_time"]) == 1 and rec["epoch_time"][0] > 0
    assert 0 <= rec["test_accuracy"][1] <= 100
    s = data["summary"]["FNGD"]
    assert s["time_ratio"]["mean"] > 0 and len(s["time_ratio"]["values"]) == 2
    assert data["summary"]["SGD-m"]["time_ratio"]["mean"] == 1.0


def test_toml_defines_a_new_assembly(tmp_path: Path) -> None:
    config = tmp_path / "runs.toml"
    config.write_text(
        'task = "digits-mlp"\n'
        'recipes = ["sgd"]\n'
        "[hyper.sgd]\n"
        "lr = 0.05\n"
        "[[run]]\n"
        'name = "Shampoo-TF-Newton"\n'
        'source = "true_fisher"\n'
        'structure = "shampoo"\n'
        'solver = "newton"\n'
        "lr = 0.003\n"
        "damping = 0.01\n"
        "[run.structure_options]\n"
        "root = 2\n"
        "[[run]]\n"
        'name = "KFAC-strong"\n'
        'recipe = "kfac"\n'
        "damping = 0.3\n", encoding="utf-8")
    out = tmp_path / "out"
    result = _compare("--config", str(config), "--out", str(out), *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(result.stdout)
    assert list(rows) == ["SGD-m", "Shampoo-TF-Newton", "KFAC-strong"]
    assert "lr=0.05" in rows["SGD-m"][1]
    assert "true_fisher+shampoo+newton" in rows["Shampoo-TF-Newton"][1]
    assert "root=2" in rows["Shampoo-TF-Newton"][1]
    assert "damping=0.3" in rows["KFAC-strong"][1]
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    run = data["runs"]["Shampoo-TF-Newton"]
    assert run["recipe"] is None
    assert run["components"]["structure_options"] == {"root": 2}
    assert run["hyper"] == {"lr": 0.003, "damping": 0.01}
    assert data["runs"]["KFAC-strong"]["hyper"]["lr"] == cmp.DEFAULTS["digits-mlp"]["kfac"]["lr"]
    assert math.isfinite(run["seeds"]["0"]["train_loss"][-1])
    assert data["config"]["config_text"] == config.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message, known", [
    (("--recipes", "sgd,lbfgs"), "unknown recipe 'lbfgs'", cmp.RECIPES),
    (("--task", "mnist"), "unknown task 'mnist'", cmp.TASKS),
])
def test_an_unknown_recipe_or_task_lists_what_exists(tmp_path: Path, args, message,
                                                     known) -> None:
    result = _compare(*args, "--out", str(tmp_path), *TINY)
    assert result.returncode == 2
    assert message in result.stderr
    for name in known:
        assert name in result.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("epoch = 3\n", "'epoch'"),
        ('[hyper.kfac]\nlearning_rate = 0.1\n', "'learning_rate'"),
        ('[[run]]\nname = "x"\nsource = "empirical"\nstructure = "kfac"\nlr = 0.1\n'
         "damping = 0.1\nmomentun = 0.5\n", "'momentun'"),
    ],
)
def test_bad_toml_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('recipes = ["sgd", "kfac"]\n' + text, encoding="utf-8")
    result = _compare("--config", str(config), "--out", str(tmp_path / "o"), *TINY)
    assert result.returncode == 2
    assert "unknown key" in result.stderr and named in result.stderr
    assert "the keys there are" in result.stderr


def test_incompatible_assembly_surfaces_the_compatibility_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('recipes = ["sgd"]\n[[run]]\nname = "KFAC-batch"\n'
                      'source = "true_fisher"\nstructure = "kfac"\nlr = 0.01\n'
                      "damping = 0.01\n", encoding="utf-8")
    result = _compare("--config", str(config), "--out", str(tmp_path / "o"), *TINY)
    assert result.returncode == 2
    assert "run 'KFAC-batch': CompatibilityError" in result.stderr
    assert "needs ['kfac_factors']" in result.stderr
    assert "TrueFisher(per_sample=True)" in result.stderr  # the registry's hint


# --------------------------------------------------------------------------- the library


def test_unknown_component_and_option_are_named(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[run]]\nname = "x"\nsource = "empirical"\nstructure = "kronecker"\n'
                      "lr = 0.1\ndamping = 0.1\n", encoding="utf-8")
    specs = cmp.specs_from_config("digits-mlp", ["sgd"], cmp.load_config(config))
    model = cmp.digits_mlp(torch.Generator().manual_seed(0))
    with pytest.raises(cmp.CompareError, match=r"no structure named 'kronecker'.*'kfac'"):
        specs[1].build(model, "categorical", steps_per_epoch=1,
                       generator=torch.Generator())
    bad = cmp.RunSpec("y", None, {"lr": 0.1, "damping": 0.1},
                      {"source": "empirical", "structure": "shampoo",
                       "structure_options": {"rooot": 2}, "solver": "eigh"})
    with pytest.raises(cmp.CompareError, match=r"no option 'rooot'.*root"):
        bad.build(model, "categorical", steps_per_epoch=1, generator=torch.Generator())
    with pytest.raises(cmp.CompareError, match="needs lr"):
        cmp.specs_from_config("digits-mlp", ["sgd"], cmp.Config(runs=[
            {"name": "z", "source": "empirical", "structure": "kfac", "damping": 0.1}]))
    with pytest.raises(cmp.CompareError, match=r"\[hyper.tnt\].*not among the recipes"):
        cmp.specs_from_config("digits-mlp", ["sgd"], cmp.Config(hyper={"tnt": {"lr": 1.0}}))


def test_divergence_is_reported_not_raised() -> None:
    data = cmp.load_task("digits-mlp", max_train=128)
    specs = [cmp.RunSpec("SGD-m", "sgd", {"lr": 0.1}),
             cmp.RunSpec("SGD-huge", "sgd", {"lr": 1e12}),
             cmp.RunSpec("TNT-huge", "tnt", {"lr": 1e6, "damping": 1e-6})]
    recs = cmp.train("digits-mlp", specs, epochs=3, seed=0, data=data)
    assert recs["SGD-m"]["diverged_at"] is None
    for name in ("SGD-huge", "TNT-huge"):
        rec = recs[name]
        assert rec["diverged_at"] is not None and rec["failed"] is None
        assert len(rec["train_loss"]) == 4 and rec["train_loss"][-1] == math.inf
        assert len(rec["epoch_time"]) == 3
    results = {"task": {"kind": "classification"}, "reference": "SGD-m",
               "config": {"seeds": [0]},
               "runs": {n: {"hyper": s.hyper, "describe": s.describe(), "seeds": {0: recs[n]}}
                        for n, s in zip(recs, specs, strict=True)}}
    results["summary"] = cmp.summarise(results)
    assert results["summary"]["SGD-huge"]["diverged"] == {0: recs["SGD-huge"]["diverged_at"]}
    table = cmp.format_table(results)
    assert "diverged (epoch" in table and "not finite" in table


def test_seeded_runs_repeat_and_share_the_initial_point() -> None:
    data = cmp.load_task("digits-mlp", max_train=128)
    specs = [cmp.RunSpec("SGD-m", "sgd", {"lr": 0.1}),
             cmp.RunSpec("TNT", "tnt", {"lr": 1e-3, "damping": 0.1})]
    a = cmp.train("digits-mlp", specs, epochs=2, seed=3, data=data)
    b = cmp.train("digits-mlp", specs, epochs=2, seed=3, data=data)
    c = cmp.train("digits-mlp", specs, epochs=2, seed=4, data=data)
    for name in ("SGD-m", "TNT"):
        assert a[name]["train_loss"] == b[name]["train_loss"]
        assert a[name]["train_loss"] != c[name]["train_loss"]
    assert a["SGD-m"]["train_loss"][0] == a["TNT"]["train_loss"][0]  # the same initial weights


@pytest.mark.parametrize("task", ["digits-cnn", "digits-autoencoder"])
def test_other_tasks_train(task: str) -> None:
    specs = cmp.default_specs(task, ["sgd", "fngd"])
    results = cmp.compare(task, specs, epochs=1, seeds=[0], max_train=100)
    s = results["summary"]
    assert set(s) == {"SGD-m", "FNGD"}
    for entry in s.values():
        assert entry["final_train_loss"]["mean"] is not None
    if task == "digits-autoencoder":
        assert "final_test_accuracy" not in s["FNGD"]
        assert "test loss" in cmp.format_table(results)
    else:
        assert s["FNGD"]["final_test_accuracy"]["mean"] is not None


def test_split_and_data() -> None:
    cls = cmp.load_task("digits-mlp")
    assert cls.x_train.shape == (1438, 1, 8, 8) and cls.x_test.shape == (359, 1, 8, 8)
    assert abs(float(cls.x_train.mean())) < 1e-5
    val = cmp.load_task("digits-mlp", validation=True)
    assert val.x_train.shape[0] == 1150 and val.x_test.shape[0] == 288
    ae = cmp.load_task("digits-autoencoder")
    assert ae.x_train.shape == (1438, 64) and 0 <= float(ae.x_train.min())
    assert float(ae.x_train.max()) <= 1 and torch.equal(ae.y_train, ae.x_train)
    with pytest.raises(cmp.CompareError, match=r"unknown task 'x'.*digits-cnn"):
        cmp.load_task("x")


def test_models_do_not_touch_the_global_generator() -> None:
    state = torch.random.get_rng_state()
    a = cmp.digits_cnn(torch.Generator().manual_seed(1))
    b = cmp.digits_cnn(torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def _tiny_results() -> dict[str, Any]:
    specs = cmp.default_specs("digits-mlp", ["sgd", "adam"])
    return cmp.compare("digits-mlp", specs, epochs=1, seeds=[0], max_train=64)


def test_json_has_no_nonfinite_numbers(tmp_path: Path) -> None:
    results = _tiny_results()
    results["runs"]["Adam"]["seeds"][0]["train_loss"][-1] = math.inf
    path = cmp.write_results(results, tmp_path)
    text = path.read_text(encoding="utf-8")
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["runs"]["Adam"]["seeds"]["0"]["train_loss"][-1] is None


ROOT = Path(__file__).resolve().parent.parent


def test_table3_config_and_tuning_script(tmp_path: Path) -> None:
    """``benchmarks/fngd_table3.toml`` reads and builds; ``compare_tune.py`` runs a tiny grid."""
    cfg = cmp.load_config(ROOT / "benchmarks" / "fngd_table3.toml")
    assert cfg.recipes == ["sgd", "kfac", "shampoo", "fngd"] and cfg.lr_decay
    for task in ("digits-mlp", "digits-cnn"):
        specs = cmp.specs_from_config(task, cfg.recipes, cfg)
        kfac = next(s for s in specs if s.recipe == "kfac")
        assert kfac.hyper["inverse_every"] == 100
        # the config's own lr and damping (stale inverses need more damping than the defaults)
        assert (kfac.hyper["lr"], kfac.hyper["damping"]) == (0.003, 0.03)
        shampoo = next(s for s in specs if s.recipe == "shampoo")
        assert (shampoo.hyper["lr"], shampoo.hyper["damping"]) == (0.003, 0.001)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare_tune
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "tune.json"
    assert compare_tune.main(["--tasks", "digits-mlp", "--recipes", "adam", "--epochs", "1",
                              "--seeds", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["chosen"]["digits-mlp"]) == {"adam"}


# --------------------------------------------------------------------------- refused up front


class _TrainingStarted(Exception):
    pass


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise _TrainingStarted("compare() was called: the input was not refused before training")


def _refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *args: str) -> str:
    """Run ``curvlib compare ARGS`` in-process; assert that it exits with 2 before any
    training (``compare`` is replaced by a function that fails); return its stderr."""
    monkeypatch.setattr(cmp, "compare", _no_training)
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "curvlib compare: error:" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(("text", "entry", "key"), [
    ("[hyper.kfac]\nlr = nan\n", "[hyper.kfac]", "lr = nan"),
    ("[hyper.kfac]\ndamping = inf\n", "[hyper.kfac]", "damping = inf"),
    ("[hyper.kfac]\nema = -inf\n", "[hyper.kfac]", "ema = -inf"),
    ("[hyper.sgd]\nmomentum = nan\n", "[hyper.sgd]", "momentum = nan"),
    ("[hyper.sgd]\nweight_decay = +inf\n", "[hyper.sgd]", "weight_decay = inf"),
    ("[hyper.sgd]\ndampening = -nan\n", "[hyper.sgd]", "dampening = nan"),
    ("[hyper.adam]\neps = inf\n", "[hyper.adam]", "eps = inf"),
    ("[hyper.adam]\nbetas = [0.9, nan]\n", "[hyper.adam]", "betas[1] = nan"),
    ('[[run]]\nname = "KFAC-x"\nrecipe = "kfac"\ndamping = nan\n', "[[run]] 'KFAC-x'",
     "damping = nan"),
    ('[[run]]\nname = "A"\nsource = "empirical"\nstructure = "kfac"\nlr = 0.1\n'
     "damping = 0.1\nmomentum = inf\n", "[[run]] 'A'", "momentum = inf"),
    ('[[run]]\nname = "A"\nsource = "empirical"\nstructure = "kfac"\nlr = -inf\n'
     "damping = 0.1\n", "[[run]] 'A'", "lr = -inf"),
    ('[[run]]\nname = "S"\nsource = "empirical"\nstructure = "shampoo"\nlr = 0.1\n'
     "damping = 0.1\n[run.structure_options]\nroot = nan\n", "[[run]] 'S'",
     "structure_options.root = nan"),
])
def test_nonfinite_config_value_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], text: str,
                                           entry: str, key: str) -> None:
    config = tmp_path / "nonfinite.toml"
    config.write_text('recipes = ["sgd", "adam", "kfac"]\n' + text, encoding="utf-8")
    out = tmp_path / "out"
    err = _refused(monkeypatch, capsys, "--config", str(config), "--out", str(out), *TINY)
    assert repr(str(config)) in err and entry in err and key in err
    assert "not a finite number" in err
    assert not out.exists()  # refused before any state changed
    with pytest.raises(cmp.CompareError, match="not a finite number"):
        cmp.load_config(config)


def test_nonfinite_value_of_a_config_built_in_code_is_refused() -> None:
    with pytest.raises(cmp.CompareError, match=r"\[hyper.kfac\]: lr = nan"):
        cmp.specs_from_config("digits-mlp", ["sgd", "kfac"],
                              cmp.Config(hyper={"kfac": {"lr": math.nan}}))
    with pytest.raises(cmp.CompareError, match=r"\[\[run\]\] 'z': damping = inf"):
        cmp.specs_from_config("digits-mlp", ["sgd"], cmp.Config(runs=[
            {"name": "z", "source": "empirical", "structure": "kfac", "lr": 0.1,
             "damping": math.inf}]))
    with pytest.raises(cmp.CompareError, match="lr = nan"):
        cmp.default_specs("digits-mlp", ["kfac"], lr=math.nan)


@pytest.mark.parametrize("flag", ["--lr", "--damping"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity", "-NaN"])
def test_nonfinite_float_flag_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], flag: str,
                                         value: str) -> None:
    err = _refused(monkeypatch, capsys, f"{flag}={value}", "--out", str(tmp_path / "o"),
                   *TINY)
    assert f"argument {flag}" in err and "finite" in err and repr(value) in err


def test_out_under_a_regular_file_is_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n", encoding="utf-8")
    for out in (blocker / "out", blocker / "deeper" / "out"):
        err = _refused(monkeypatch, capsys, "--out", str(out), *TINY)
        assert repr(str(out)) in err and "cannot create the output directory" in err
    assert blocker.read_text(encoding="utf-8") == "not a folder\n"


def test_out_that_cannot_be_written_is_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only folder (as root, where chmod does not stop writing, an existing regular
    file given as ``--out`` instead)."""
    if os.geteuid() == 0:  # root writes through a read-only mode bit
        out = tmp_path / "results-file"
        out.write_text("{}\n", encoding="utf-8")
        err = _refused(monkeypatch, capsys, "--out", str(out), *TINY)
        assert repr(str(out)) in err and "is an existing file, not a directory" in err
        assert out.read_text(encoding="utf-8") == "{}\n"
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = _refused(monkeypatch, capsys, "--out", str(locked), *TINY)
        assert repr(str(locked)) in err and "not writable" in err
        err = _refused(monkeypatch, capsys, "--out", str(locked / "sub"), *TINY)
        assert repr(str(locked / "sub")) in err and "cannot create" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_is_created_before_training(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "new" / "out"
    seen: list[bool] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append(out.is_dir())
        raise _TrainingStarted

    monkeypatch.setattr(cmp, "compare", record)
    with pytest.raises(_TrainingStarted):
        cli.main(["compare", "--recipes", "sgd", "--out", str(out), *TINY])
    assert seen == [True] and list(out.iterdir()) == []  # the write probe is removed


@pytest.mark.parametrize("case", ["directory", "missing", "not-utf-8"])
def test_unreadable_config_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], case: str) -> None:
    config = tmp_path / "runs.toml"
    if case == "directory":
        config.mkdir()
        expected = "is a directory"
    elif case == "missing":
        expected = "does not exist"
    else:
        config.write_bytes(b"\xff\xfe" + 'recipes = ["sgd"]\n'.encode("utf-16-le"))
        expected = "is not valid UTF-8"
    out = tmp_path / "out"
    err = _refused(monkeypatch, capsys, "--config", str(config), "--out", str(out), *TINY)
    assert f"config file {str(config)!r} {expected}" in err
    assert not out.exists()
    with pytest.raises(cmp.CompareError, match=expected):
        cmp.load_config(config)


# --------------------------------------------------------------------------- atomic writes


def _mode_of_a_new_file() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _leftovers(folder: Path, expected: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - expected


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_results_json_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             error: BaseException) -> None:
    path = cmp.write_results({"run": 1, "loss": [1.0, 0.5]}, tmp_path)
    before = path.read_bytes()
    assert json.loads(before) == {"run": 1, "loss": [1.0, 0.5]}
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == _mode_of_a_new_file()
    real_dump = json.dump

    def failing_dump(obj: Any, handle: Any, **kwargs: Any) -> None:
        handle.write('{"run": 2, "loss": [')  # part of the new file, then the failure
        handle.flush()
        raise error

    monkeypatch.setattr(json, "dump", failing_dump)
    with pytest.raises(type(error)):
        cmp.write_results({"run": 2, "loss": [0.25]}, tmp_path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {"results.json"}) == set()
    monkeypatch.setattr(json, "dump", real_dump)
    cmp.write_results({"run": 3}, tmp_path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"run": 3}
    assert _leftovers(tmp_path, {"results.json"}) == set()


def _plot_results() -> dict[str, Any]:
    """The least that :func:`curvlib.compare.plot` reads: two runs, two seeds, two epochs."""
    def rec(scale: float) -> dict[str, Any]:
        return {"train_loss": [2.3 * scale, 1.0 * scale, 0.5 * scale],
                "time": [0.0, 0.1 * scale, 0.2 * scale]}

    return {"task": {"name": "digits-mlp", "description": "MLP", "data": "64 train / 8 test",
                     "batch_size": 64},
            "config": {"seeds": [0, 1]},
            "runs": {name: {"describe": "lr=0.1", "seeds": {0: rec(s), 1: rec(1.1 * s)}}
                     for name, s in (("SGD-m", 1.0), ("KFAC", 0.5))}}


def test_plots_are_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    _require_bench()
    from matplotlib.figure import Figure

    names = {"loss_vs_epoch.png", "loss_vs_time.png"}
    paths = cmp.plot(_plot_results(), tmp_path)
    assert {p.name for p in paths} == names
    before = {p.name: p.read_bytes() for p in paths}
    assert all(b[:8] == PNG_MAGIC for b in before.values())

    def failing_savefig(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as handle:
                handle.write(PNG_MAGIC)
        else:
            fname.write(PNG_MAGIC)  # the start of a PNG, then the failure
            fname.flush()
        raise RuntimeError("interrupted while saving")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(RuntimeError, match="interrupted while saving"):
        cmp.plot(_plot_results(), tmp_path)
    assert {p.name: p.read_bytes() for p in paths} == before
    assert _leftovers(tmp_path, names) == set()
