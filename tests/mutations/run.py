#!/usr/bin/env python
"""The planted-bug harness (issue 14 §6): do the tests catch realistic one-line bugs?

Each entry of ``mutations.toml`` (next to this file) names a file, an exact snippet of one of
its lines, a replacement, a description of the bug, and the tests that must catch it. For
every entry, alone, this script

1. copies the working tree (``git ls-files`` plus untracked files git does not ignore) into a
   scratch directory,
2. applies the one replacement there (the snippet must occur exactly once, else the entry is
   reported ``stale``: the table no longer matches the code and must be updated),
3. runs ``python -m pytest -x -q -p no:cacheprovider <tests>`` in the copy, with
   ``PYTHONPATH`` set to the copy and ``CI=true`` (a pytest plugin written into the copy
   checks that ``curvlib`` is imported from the copy, not from the editable install),
4. reports ``caught`` (with the first failing test), ``SURVIVED`` (every test passed),
   ``stale``, ``INVALID`` (the mutated file does not compile), ``TIMEOUT`` or ``ERROR``.

A caught mutation is confirmed: the first failing test is run again on an unmutated copy of
the same snapshot and must pass there. A test that fails there too says nothing about the
mutation: it is deselected and the mutated run resumes after the tests that already passed,
up to ``--max-deselect`` times; then the entry is reported ``BROKEN`` (fix the tree or that
test first). The table lists what was deselected. ``--no-confirm`` skips the confirmation.

Not part of the test suite (no ``test_*`` names; pytest does not collect it). Run it on
demand::

    python tests/mutations/run.py                 # every mutation, one at a time
    python tests/mutations/run.py --jobs 2        # two at a time
    python tests/mutations/run.py --only kfac-pi-both smw-missing-m
    python tests/mutations/run.py --list          # the table, and which entries are stale

Exit status: 0 when every mutation selected was caught, 1 otherwise (a survivor, a stale
entry, a timeout, an error or a broken confirmation), 2 for a bad table or bad arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TABLE = HERE / "mutations.toml"

#: The pytest plugin written into every copy: refuses to run if curvlib is imported from
#: anywhere but the copy (e.g. the editable install of the main checkout).
GUARD_NAME = "_curvlib_mutation_guard"
GUARD = '''\
import os

import pytest


def pytest_sessionstart(session):
    import curvlib

    root = os.path.realpath(os.environ["CURVLIB_MUTATION_ROOT"])
    where = os.path.realpath(curvlib.__file__)
    if not where.startswith(root + os.sep):
        pytest.exit(f"CURVLIB-MUTATION-GUARD: curvlib was imported from {where}, not from "
                    f"the scratch copy {root}", returncode=3)


def pytest_collection_modifyitems(config, items):
    # a rerun after a deselection leaves out the tests already run (passed or deselected)
    path = os.environ.get("CURVLIB_MUTATION_SKIP")
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        skip = set(fh.read().splitlines())
    dropped = [item for item in items if item.nodeid in skip]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid not in skip]


def pytest_runtest_logreport(report):
    path = os.environ.get("CURVLIB_MUTATION_PASSED")
    if path and (report.when == "call" and report.passed
                 or report.when == "setup" and report.skipped):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(report.nodeid + "\\n")
'''

STATUSES = ("caught", "SURVIVED", "stale", "INVALID", "TIMEOUT", "BROKEN", "ERROR")


@dataclasses.dataclass
class Mutation:
    id: str
    file: str
    original: str
    replacement: str
    description: str
    tests: list[str]
    args: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    mutation: Mutation
    status: str
    seconds: float = 0.0
    first_failure: str = ""
    detail: str = ""
    log: Path | None = None
    deselected: list[str] = dataclasses.field(default_factory=list)


# -- the table ---------------------------------------------------------------------------------


def load_table(path: Path) -> list[Mutation]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            _fail("reading mutations.toml needs Python >= 3.11 (tomllib) or `pip install "
                  "tomli`")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    entries = data.get("mutation", [])
    out, seen, problems = [], set(), []
    required = ("id", "file", "original", "replacement", "description", "tests")
    for i, entry in enumerate(entries):
        missing = [k for k in required if k not in entry]
        unknown = set(entry) - set(required) - {"args"}
        where = f"entry {i} ({entry.get('id', '?')})"
        if missing or unknown:
            problems.append(f"{where}: missing {missing}, unknown {sorted(unknown)}")
            continue
        m = Mutation(**entry)
        if m.id in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(m.id)
        if "\n" in m.original or "\n" in m.replacement:
            problems.append(f"{where}: the snippet and its replacement must lie on one line")
        if m.original == m.replacement:
            problems.append(f"{where}: the replacement equals the original")
        if not m.tests:
            problems.append(f"{where}: no tests")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).is_file():
                problems.append(f"{where}: no test file {t.split('::')[0]}")
        out.append(m)
    if problems:
        _fail("bad mutation table:\n  " + "\n  ".join(problems))
    return out


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def occurrences(root: Path, m: Mutation) -> int:
    path = root / m.file
    if not path.is_file():
        return 0
    return path.read_text(encoding="utf-8").count(m.original)


# -- scratch copies ----------------------------------------------------------------------------


def tree_files(root: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore (those that exist)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def make_copy(files: list[str], source: Path, dest: Path) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / f, target)
    (dest / f"{GUARD_NAME}.py").write_text(GUARD, encoding="utf-8")


def environment(copy: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["CI"] = "true"
    env["CURVLIB_MUTATION_ROOT"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("CURVLIB_HYPOTHESIS_PROFILE", None)  # the derandomized ci profile, always
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    return env


_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S.*?)(?: - (.*))?$")


def first_failure(output: str) -> tuple[str, str]:
    """The first ``FAILED``/``ERROR`` line of pytest's short summary: (node id, message)."""
    for line in output.splitlines():
        match = _SUMMARY.match(line.strip())
        if match:
            return match.group(2).strip(), (match.group(3) or "").strip()
    return "", ""


def pytest_command(tests: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "-p", GUARD_NAME, *args, *tests]


_ACTIVE: set[subprocess.Popen] = set()  # running pytest processes (killed on interrupt)
_ACTIVE_LOCK = threading.Lock()
_STOP = threading.Event()  # set on interrupt: start no further pytest run


def run_pytest(copy: Path, tests: list[str], args: list[str], timeout: float, threads: int,
               log: Path, extra_env: dict[str, str] | None = None
               ) -> tuple[int | None, str, float]:
    """(return code or None on timeout, output, seconds)."""
    if _STOP.is_set():
        raise KeyboardInterrupt
    start = time.monotonic()
    env = environment(copy, threads)
    env.update(extra_env or {})
    with log.open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(pytest_command(tests, args)) + f"\n# cwd {copy}\n")
        fh.flush()
        proc = subprocess.Popen(pytest_command(tests, args), cwd=copy, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc)
    return code, log.read_text(encoding="utf-8", errors="replace"), time.monotonic() - start


def _kill(proc: subprocess.Popen) -> None:
    """Kill the process group of one pytest run (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_active() -> None:
    _STOP.set()
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        _kill(proc)


# -- one mutation ------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, files: list[str], timeout: float, threads: int,
                 confirm: bool, max_deselect: int = 3):
        self.work, self.files = work, files
        self.max_deselect = max_deselect if confirm else 0
        self.timeout, self.threads, self.confirm = timeout, threads, confirm
        self.pristine = work / "pristine"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._confirm_lock = threading.Lock()
        self._confirmed: dict[str, tuple[int | None, str]] = {}

    def run(self, m: Mutation) -> Result:
        count = occurrences(self.pristine, m)
        if count != 1:
            return Result(m, "stale", detail=f"snippet found {count} times in {m.file} "
                                             f"(must be exactly once)")
        copy = Path(tempfile.mkdtemp(prefix=f"{m.id}-", dir=self.work))
        try:
            make_copy(self.files, self.pristine, copy)
            path = copy / m.file
            path.write_text(path.read_text(encoding="utf-8").replace(m.original, m.replacement),
                            encoding="utf-8")
            try:
                py_compile.compile(str(path), doraise=True, cfile=str(copy / "check.pyc"))
            except py_compile.PyCompileError as error:
                return Result(m, "INVALID", detail=f"the mutated file does not compile: {error}")
            deselected: list[str] = []  # tests that fail without the mutation too
            seconds = 0.0
            passed, skip = copy / "passed.txt", copy / "skip.txt"
            env = {"CURVLIB_MUTATION_PASSED": str(passed), "CURVLIB_MUTATION_SKIP": str(skip)}
            attempt = 0
            while True:
                log = self.logs / (f"{m.id}.log" if not attempt else f"{m.id}.{attempt}.log")
                code, output, spent = run_pytest(copy, m.tests, m.args, self.timeout,
                                                 self.threads, log, env)
                seconds += spent
                result = self._judge(m, code, output, seconds, log)
                if result.status != "BROKEN" or len(deselected) >= self.max_deselect \
                        or "::" not in result.first_failure:
                    break
                # a test already failing on the unmutated tree says nothing about this
                # mutation: leave it out, and resume after the tests that already passed
                deselected.append(result.first_failure)
                done = passed.read_text(encoding="utf-8") if passed.exists() else ""
                skip.write_text(done + "".join(n + "\n" for n in deselected), encoding="utf-8")
                attempt += 1
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        result.deselected = deselected
        return result

    def _judge(self, m: Mutation, code: int | None, output: str, seconds: float,
               log: Path) -> Result:
        if "CURVLIB-MUTATION-GUARD" in output:
            return Result(m, "ERROR", seconds, detail="curvlib was not imported from the copy",
                          log=log)
        if code is None:
            return Result(m, "TIMEOUT", seconds, detail=f"over {self.timeout:.0f} s", log=log)
        if code == 0:
            return Result(m, "SURVIVED", seconds, detail="every selected test passed", log=log)
        node, message = first_failure(output)
        if code not in (1, 2) or not node:
            tail = " | ".join(output.strip().splitlines()[-3:])
            return Result(m, "ERROR", seconds, detail=f"pytest exit {code}: {tail}", log=log)
        if self.confirm:
            pristine_code, _ = self.check_pristine(node, m.args)
            if pristine_code != 0:
                return Result(m, "BROKEN", seconds, node,
                              f"{short(node)} fails without the mutation too (exit "
                              f"{pristine_code})", log=log)
        return Result(m, "caught", seconds, node, message, log=log)

    def check_pristine(self, node: str, args: list[str]) -> tuple[int | None, str]:
        key = node + "\0" + "\0".join(args)
        with self._confirm_lock:
            if key in self._confirmed:
                return self._confirmed[key]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", node)[:120]
        code, output, _ = run_pytest(self.pristine, [node], args, self.timeout, self.threads,
                                     self.logs / f"pristine-{safe}.log")
        with self._confirm_lock:
            self._confirmed[key] = (code, output)
        return code, output


# -- reporting ---------------------------------------------------------------------------------


def short(node: str) -> str:
    return node.removeprefix("tests/")


def table(results: list[Result]) -> str:
    rows = ["| id | file | description | status | seconds | first failing test |",
            "|---|---|---|---|---|---|"]
    for r in results:
        m = r.mutation
        failing = short(r.first_failure) if r.first_failure else (r.detail or "")
        if r.deselected and r.status != "BROKEN":
            failing += (" (deselected, failing without the mutation too: "
                        + ", ".join(short(n) for n in r.deselected) + ")")
        rows.append(f"| {m.id} | {m.file.removeprefix('curvlib/')} | {m.description} | "
                    f"{r.status} | {r.seconds:.0f} | {failing.replace('|', '/')} |")
    return "\n".join(rows)


def listing(mutations: list[Mutation]) -> str:
    lines = []
    for m in mutations:
        count = occurrences(ROOT, m)
        state = "ok" if count == 1 else f"STALE (found {count}x)"
        lines.append(f"{m.id:28} {m.file:38} {state}\n    {m.description}\n"
                     f"    - {m.original}\n    + {m.replacement}\n"
                     f"    tests: {' '.join(m.args + m.tests)}")
    return "\n".join(lines)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_all(runner: Runner, mutations: list[Mutation], jobs: int,
            results: dict[str, Result]) -> None:
    """Run the mutations, ``jobs`` at a time, printing each result as it comes."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(runner.run, m): m for m in mutations}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            try:
                r = future.result()
            except Exception as error:  # a harness failure: report it, keep going
                r = Result(m, "ERROR", detail=f"{type(error).__name__}: {error}")
            results[m.id] = r
            print(f"[{len(results)}/{len(mutations)}] {m.id}: {r.status} ({r.seconds:.0f} s) "
                  f"{short(r.first_failure) or r.detail}", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds per mutation's test run (default 1200)")
    parser.add_argument("--list", action="store_true",
                        help="list the mutations and whether each snippet is found exactly "
                             "once; run nothing")
    parser.add_argument("--no-confirm", action="store_true",
                        help="do not rerun the first failing test on an unmutated copy")
    parser.add_argument("--max-deselect", type=int, default=3, metavar="K",
                        help="deselect at most K tests that fail without the mutation too "
                             "before giving up with BROKEN (default 3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (logs and the unmutated copy)")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write the markdown table to FILE")
    parser.add_argument("--table", type=Path, default=TABLE, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    mutations = load_table(opts.table)
    if opts.only:
        unknown = sorted(set(opts.only) - {m.id for m in mutations})
        if unknown:
            parser.error(f"unknown mutation id(s) {unknown}; see --list")
        mutations = [m for m in mutations if m.id in set(opts.only)]
    if opts.list:
        print(listing(mutations))
        print(f"\n{len(mutations)} mutation(s)")
        return 0
    if opts.jobs < 1:
        parser.error("--jobs must be at least 1")

    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    work = Path(tempfile.mkdtemp(prefix="curvlib-mutations-"))
    files = tree_files(ROOT)
    make_copy(files, ROOT, work / "pristine")  # one snapshot: every mutation sees this tree
    threads = max(1, (os.cpu_count() or 1) // opts.jobs)
    runner = Runner(work, files, opts.timeout, threads, not opts.no_confirm, opts.max_deselect)
    print(f"{len(mutations)} mutation(s), {opts.jobs} at a time, snapshot of {ROOT} "
          f"({len(files)} files) in {work}", flush=True)

    results: dict[str, Result] = {}
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        run_all(runner, mutations, opts.jobs, results)
    except KeyboardInterrupt:
        kill_active()
        for leftover in work.iterdir():  # the copies; the logs stay
            if leftover.name != "logs":
                shutil.rmtree(leftover, ignore_errors=True)
        print(f"\ninterrupted; logs in {work / 'logs'}", file=sys.stderr)
        return 130

    ordered = [results[m.id] for m in mutations]
    total = time.monotonic() - started
    report = table(ordered)
    counts = {s: sum(r.status == s for r in ordered) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    command = "python tests/mutations/run.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    footer = (f"{stamp}, `{command.strip()}`: {summary}; total {total / 60:.1f} min "
              f"(sum of per-mutation runs {sum(r.seconds for r in ordered) / 60:.1f} min)")
    bad = [r for r in ordered if r.status != "caught"]
    unmutated = sorted({n for r in ordered for n in r.deselected}
                       | {r.first_failure for r in ordered if r.status == "BROKEN"})
    if unmutated:
        footer += ("\n\ntests failing on the unmutated tree (fix them; they were deselected "
                   "where another test could judge the mutation): " + ", ".join(
                       short(n) for n in unmutated))
    print("\n" + report + "\n\n" + footer)
    for r in bad:
        left_out = (" (deselected, failing without the mutation too: "
                    + ", ".join(short(n) for n in r.deselected) + ")") if r.deselected else ""
        print(f"\n{r.mutation.id}: {r.status}: {r.detail}{left_out}\n  {r.mutation.file}: "
              f"{r.mutation.original!r} -> {r.mutation.replacement!r}"
              + (f"\n  log: {r.log}" if r.log else ""))
    if opts.report:
        opts.report.write_text(report + "\n\n" + footer + "\n", encoding="utf-8")
    if opts.keep:
        print(f"\nscratch directory kept: {work}")
    elif bad:  # keep the logs of what was not caught
        shutil.rmtree(work / "pristine", ignore_errors=True)
        print(f"\nlogs kept in {work / 'logs'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
