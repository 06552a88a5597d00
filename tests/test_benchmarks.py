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
