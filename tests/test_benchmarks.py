"""The benchmark scripts keep running and their built-in correctness checks keep passing.

Timings are not asserted here (they live in benchmarks/README.md); a smoke run with few
repeats exits non-zero when any of the script's correctness checks fails.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_sources_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sources.py"), "--repeats", "3",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Gram: materialise / contract" in result.stdout
    assert out.exists()


def _smoke(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_micro_tnt_smoke_run(tmp_path):
    """The TNT micro-benchmarks run and their equivalence checks pass."""
    _smoke("micro_tnt.py", "--rounds", "3", "--json", str(tmp_path / "micro.json"))
    assert (tmp_path / "micro.json").exists()


def test_digits_autoencoder_smoke_run(tmp_path):
    """The TNT / SGD-m / Adam comparison runs end to end (two epochs, one seed)."""
    _smoke("digits_autoencoder.py", "--epochs", "2", "--seeds", "1", "--out",
           str(tmp_path / "dae"))
    assert list(tmp_path.glob("dae*"))


def test_bench_fngd_smoke_run(tmp_path):
    """The FNGD step-time benchmark runs (3 rounds) and its correctness checks pass:
    refresh and shared directions against per-sample gradients from an explicit loop."""
    out = tmp_path / "fngd.json"
    result = _smoke("bench_fngd.py", "--quick", "--json", str(out))
    assert "FNGD shared (per-layer) / SGD" in result.stdout
    assert "A CORRECTNESS CHECK FAILED" not in result.stderr
    assert out.exists()


def test_digits_fngd_smoke_run(tmp_path):
    """The SGD-m / EF-NGD / FNGD digits comparison runs end to end (two epochs, one seed)
    and writes its JSON and PNG under the given prefix."""
    result = _smoke("digits_fngd.py", "--epochs", "2", "--seeds", "1", "--out",
                    str(tmp_path / "dfngd"))
    assert "FNGD − EF-NGD final test accuracy" in result.stdout
    assert (tmp_path / "dfngd.json").exists()
    assert (tmp_path / "dfngd.png").exists()


def test_bench_baselines_smoke_run(tmp_path):
    """The KFAC / Shampoo / TNT / ASDL step-time benchmark runs on its tiny quick network and
    its checks pass: KFAC factors equal ASDL's (same draw), Shampoo's newton roots equal eigh's,
    each timed cycle holds T2/T1 statistics steps, losses stay finite."""
    out = tmp_path / "baselines.json"
    result = _smoke("bench_baselines.py", "--quick", "--json", str(out))
    assert "| method | T1/T2 | step ms | × SGD-m | × TNT |" in result.stdout
    assert "A CORRECTNESS CHECK FAILED" not in result.stderr
    assert out.exists()
