"""Every ```python block in docs/*.md runs (the pages promise runnable examples).

Each page's blocks are concatenated in order and run as one script, the way a reader who
copies them into a file would run it: in a fresh interpreter (``sys.executable``), from an
empty working directory, and with neither ``CURVLIB_HYPOTHESIS_PROFILE`` nor ``CI`` in the
environment, so no curvlib hypothesis profile is loaded unless the page loads one itself.
"""

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PAGES = sorted(DOCS.glob("*.md"))
TIMEOUT_S = 900  # per page; the slowest page takes seconds, this only stops a hung script
TAIL = 4000  # characters of stderr / stdout shown on failure
WORKERS = max(1, min(4, (os.cpu_count() or 1)))  # page scripts running at once


def test_the_promised_pages_exist():
    names = {p.name for p in PAGES}
    assert {"index.md", "conventions.md", "testing.md"} <= names


def _script(page: pathlib.Path, blocks: list[str]) -> tuple[str, list[int]]:
    """The page's blocks as one script, and the first script line of each block."""
    lines: list[str] = []
    starts: list[int] = []
    for i, block in enumerate(blocks):
        lines.append(f"# ---- docs/{page.name}, block {i} ----")
        starts.append(len(lines) + 1)
        lines.extend(block.rstrip("\n").split("\n"))
    return "\n".join(lines) + "\n", starts


def _failing_block(stderr: str, script: pathlib.Path, starts: list[int]) -> str:
    """The block that was running: the one holding the outermost traceback line in the script."""
    hits = re.findall(rf'File "{re.escape(str(script))}", line (\d+)', stderr)
    if not hits:
        return "unknown block"
    line = int(hits[0])
    block = max(i for i, start in enumerate(starts) if start <= line or i == 0)
    return f"block {block} (its line {line - starts[block] + 1})"


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CURVLIB_HYPOTHESIS_PROFILE", "CI")}
    # The checkout under test, even if another curvlib is installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(page: pathlib.Path, workdir: pathlib.Path) -> dict:
    """Run the page's blocks as one script in ``workdir``; the outcome as a dict."""
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    if not blocks:
        return {"blocks": 0}
    source, starts = _script(page, blocks)
    script = workdir / f"docs_{page.stem}.py"
    script.write_text(source, encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=workdir, env=_environment(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        if isinstance(err, bytes):  # TimeoutExpired may keep bytes even with text=True
            err = err.decode(errors="replace")
        return {"blocks": len(blocks), "timeout": True, "stderr": err}
    return {"blocks": len(blocks), "timeout": False, "returncode": proc.returncode,
            "stderr": proc.stderr, "stdout": proc.stdout, "script": script, "starts": starts}


_runs: dict[pathlib.Path, concurrent.futures.Future] = {}


def _outcome(page: pathlib.Path, request, tmp_path_factory) -> dict:
    """The page's outcome. The first call starts every selected page's script, a few at a
    time (one subprocess per page, in its own empty directory), so that they overlap."""
    if not _runs:
        name = test_python_blocks_run_as_one_script.__name__
        selected = [item.callspec.params["page"] for item in request.session.items
                    if getattr(item, "originalname", None) == name]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
        for p in selected or [page]:
            _runs[p] = pool.submit(_run, p, tmp_path_factory.mktemp(f"docs_{p.stem}"))
        pool.shutdown(wait=False)
    if page not in _runs:
        _runs[page] = concurrent.futures.Future()
        _runs[page].set_result(_run(page, tmp_path_factory.mktemp(f"docs_{page.stem}")))
    return _runs[page].result()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run_as_one_script(page, request, tmp_path_factory):
    out = _outcome(page, request, tmp_path_factory)
    if not out["blocks"]:
        pytest.skip(f"{page.name} has no python blocks")
    if out["timeout"]:
        pytest.fail(f"docs/{page.name}: its {out['blocks']} python blocks, run as one script, "
                    f"did not finish in {TIMEOUT_S} s\n--- stderr tail ---\n"
                    f"{out['stderr'][-TAIL:]}", pytrace=False)
    if out["returncode"] != 0:
        pytest.fail(
            f"docs/{page.name}: run as one script, it failed while running "
            f"{_failing_block(out['stderr'], out['script'], out['starts'])} of {out['blocks']} "
            f"(exit status {out['returncode']})\n"
            f"--- stderr tail ---\n{out['stderr'][-TAIL:]}\n"
            f"--- stdout tail ---\n{out['stdout'][-TAIL:]}",
            pytrace=False)
