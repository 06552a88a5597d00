"""Tests of ``curvlib fisher-check`` (:mod:`curvlib.fisher_check`).

* the subcommand runs end to end as a subprocess on tiny settings and writes its JSON (with
  the documented keys) and its PNG; bad options fail with a clear message and exit code 2;
* on a tiny float64 instance, one iteration's directions are recomputed independently: the
  block-Fisher direction as ``(F_b + λI)⁻¹ m_b`` from :mod:`curvlib.testing.oracles` (per-sample
  gradients at the same sampled labels, the warm start and the EMA written out), TNT, KFAC,
  Shampoo and Adam by the dense references of :mod:`curvlib.testing.reference`, SGD-m as ``m``;
  and the cosines and the step follow from them.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvlib import cli, fisher_check
from curvlib.structures import KFAC, Diagonal, Shampoo, TensorNormal
from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close, cosine_similarity
from curvlib.testing.reference import ReferenceStatistics, reference_for, split

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64


def _curvlib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curvlib", *args],
        capture_output=True, text=True, cwd=cwd, check=False, timeout=300,
    )  # fmt: skip


# --------------------------------------------------------------------------- end to end


def test_subcommand_writes_json_and_png(tmp_path: Path) -> None:
    path = tmp_path / "check.json"
    png = tmp_path / "curves.png"
    result = _curvlib("fisher-check", "--iters", "2", "--num-data", "64", "--batch-size", "32",
                      "--damping", "1e-2", "--seed", "1", "--json", str(path), "--out",
                      str(png), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "TNT" in result.stdout and "mean 2-5" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(path.read_text())
    for method in fisher_check.METHODS:
        values = report[method]
        assert len(values) == 4 and all(abs(v) <= 1 + 1e-12 for v in values), method
        assert len(report["first_50"][method]) == 4
        assert set(report["per_layer"][method]) == {"1", "2", "3", "4", "5", "6"}
        assert all(len(c) == 2 for c in report["curves"][method].values())
    assert report["block Fisher"] == pytest.approx([1.0] * 4, abs=1e-12)
    assert report["reported_layers"] == [2, 3, 4, 5]
    proto = report["protocol"]
    assert proto["damping"] == 1e-2 and proto["iters"] == 2 and proto["seed"] == 1
    assert proto["lr"] == 0.005 and proto["first_layer"] == "exact"
    assert "bilinear" in proto["data"] and "align_corners=False" in proto["data"]
    assert len(report["loss"]) == 2


def test_negative_damping_fails_clearly(tmp_path: Path) -> None:
    result = _curvlib("fisher-check", "--damping", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --damping: expected a positive finite number, got '-1'" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--iters", "0"], "argument --iters: expected a positive integer, got 0"),
    (["--damping", "0"], "argument --damping: expected a positive finite number"),
    (["--lr", "nan"], "argument --lr: expected a finite number >= 0"),
    (["--num-data", "5000"], "--num-data must be at most 1797"),
    (["--num-data", "100"], "--num-data 100 is smaller than --batch-size 256"),
    (["--first-layer", "dense"], "argument --first-layer: invalid choice: 'dense'"),
    (["--json", "/no/such/dir/x.json"], "the directory of '/no/such/dir/x.json' does not exist"),
])  # fmt: skip
def test_bad_options_fail_clearly(args: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fisher-check", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_upsampled_digits() -> None:
    inputs, labels = fisher_check.load_digits_16(20)
    small, same = cli.load_digits_data(20)
    assert inputs.shape == (20, 256) and inputs.dtype == F64
    assert torch.equal(labels, same)
    assert 0 <= inputs.min() and inputs.max() <= 1
    # bilinear 2x upsampling with align_corners=False keeps every image's mean pixel
    assert_close(inputs.mean(1), small.mean(1), rtol=1e-12, atol=1e-15, what="image means")


# --------------------------------------------------------------------------- one iteration


def _flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


@pytest.mark.parametrize("first_layer", ["exact", "kfac"])
def test_one_iteration_matches_independent_computations(first_layer: str) -> None:
    """Warm start over one batch, then one iteration, on a tiny float64 MLP: every direction
    against an independent dense computation."""
    damping, lr, ema, n = 0.05, 0.3, 0.9, 24
    model = cli.build_mlp([5, 4, 4, 3], seed=2)
    initial = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(n, 5, generator=generator, dtype=F64)
    labels = torch.randint(3, (n,), generator=generator)
    check = fisher_check.FisherCheck(model, inputs, labels, damping=damping, lr=lr, seed=4,
                                     batch_size=n, first_layer=first_layer)
    [(warm_index, warm_sampled)] = check.warm_start()
    record = check.step()
    lik = "categorical"
    names = [name for name, _ in initial.named_parameters()]
    batches = [(inputs[warm_index], labels[warm_index], warm_sampled),
               (inputs[record.batch], labels[record.batch], record.sampled)]

    # m: the warm-start gradient, then one EMA step (both at the initial point)
    grads = [oracles.gradient(initial, lik, x, y) for x, y, _ in batches]
    m = ema * grads[0] + (1 - ema) * grads[1]
    assert_close(_flat(record.momentum, names), m, rtol=1e-12, atol=1e-15, what="m")

    # block Fisher: F = EMA of the per-sample outer products at the sampled labels
    def mc(x: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        g = oracles.per_sample_grads(initial, lik, x, sampled)
        return g.T @ g / g.shape[0]

    fisher = ema * mc(batches[0][0], batches[0][2]) + (1 - ema) * mc(batches[1][0],
                                                                     batches[1][2])
    layers = cli.layer_blocks(initial)
    got = _flat(record.directions["block Fisher"], names)
    kfac_got = _flat(record.directions["KFAC"], names)
    for i, block in enumerate(layers):
        expected = oracles.natural_gradient(block.of_matrix(fisher), block.of_vector(m), damping)
        if i == 0 and first_layer == "kfac":
            expected = block.of_vector(kfac_got)  # the trajectory's first layer is KFAC's
        assert_close(block.of_vector(got), expected, rtol=1e-10, atol=1e-14, what=block.name)

    # TNT, KFAC (sampled labels); Shampoo, Adam (data labels): the dense references
    vectors = split(m, names, {name: p.shape for name, p in initial.named_parameters()})
    for method, structure, sampled in (("TNT", TensorNormal(), True), ("KFAC", KFAC(), True),
                                       ("Shampoo", Shampoo(), False),
                                       ("Adam", Diagonal(statistics="batch", power=0.5), False)):
        ref = reference_for(structure.name)(structure, copy.deepcopy(initial), names)
        for x, y, drawn in batches:
            ref.update(ReferenceStatistics(initial, lik, x, [drawn if sampled else y], sampled),
                       ema)
        ref.refresh(damping)
        expected = ref.direction(vectors)
        for name in names:
            assert_close(record.directions[method][name], expected[name], rtol=1e-9,
                         atol=1e-14, what=f"{method} {name}")
    for name in names:
        assert torch.equal(record.directions["SGD-m"][name], record.momentum[name])

    # cosines per layer (weight and bias together) against the block-Fisher direction
    compared = [2, 3] if first_layer == "kfac" else [1, 2, 3]
    for method, cosines in record.cosines.items():
        assert sorted(cosines) == compared, method
        for layer in compared:
            block = layers[layer - 1]
            d = block.of_vector(_flat(record.directions[method], names))
            expected = cosine_similarity(d, block.of_vector(got))
            assert cosines[layer] == pytest.approx(expected, abs=1e-12), (method, layer)
    assert all(c == pytest.approx(1.0) for c in record.cosines["block Fisher"].values())

    # the step moved the parameters along the block-Fisher direction
    moved = _flat(dict(model.named_parameters()), names).detach()
    start = _flat(dict(initial.named_parameters()), names).detach()
    assert_close(moved, start - lr * got, rtol=1e-12, atol=1e-15, what="step")


def test_batches_reshuffle_every_epoch_and_drop_the_remainder() -> None:
    model = cli.build_mlp([3, 2], seed=0)
    inputs, labels = torch.randn(10, 3, dtype=F64), torch.zeros(10, dtype=torch.int64)
    check = fisher_check.FisherCheck(model, inputs, labels, damping=0.1, lr=0.0, seed=0,
                                     batch_size=4)
    assert [b.tolist() for b in check.warm_start_batches()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    epochs = [[check.next_batch() for _ in range(2)] for _ in range(3)]
    for epoch in epochs:
        seen = torch.cat(epoch)
        assert len(seen) == 8 and len(set(seen.tolist())) == 8  # two full batches, no repeat
    assert any(not torch.equal(epochs[0][0], e[0]) for e in epochs[1:])  # reshuffled
    again = fisher_check.FisherCheck(model, inputs, labels, damping=0.1, lr=0.0, seed=0,
                                     batch_size=4)
    assert torch.equal(again.next_batch(), epochs[0][0])  # seeded


def test_library_function_reports_the_documented_layout() -> None:
    report = fisher_check.fisher_check(1e-2, 2, 0.005, 0, num_data=64, batch_size=32,
                                       first_layer="kfac")
    assert set(fisher_check.METHODS) <= set(report)
    for method in fisher_check.METHODS:
        per = report["per_layer"][method]
        assert report[method] == [per[str(layer)]["all"] for layer in (2, 3, 4, 5)]
        mean = sum(report[method]) / 4
        assert report["headline"][method]["all"] == pytest.approx(mean)
    json.dumps(report)  # JSON-ready
    assert "SGD-m" in fisher_check.format_summary(report)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        fisher_check.fisher_check(iters=0)


def test_reproduction_script_smoke_run(tmp_path: Path) -> None:
    """benchmarks/fisher_check.py (reproduction 2(a)) runs end to end: 5 iterations, seed 0,
    the three dampings; it writes its summary JSON and its plot."""
    out = tmp_path / "fc.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fisher_check.py"), "--quick",
         "--first-layer", "kfac", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"0.0001", "0.001", "0.01"}
    assert summary["0.001"]["all"]["block Fisher"]["mean"] == pytest.approx(1.0)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
