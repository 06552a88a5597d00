"""The promises around the package: the README's two commands, .ci/run, plugin packages, typing
marker."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_COMMANDS = re.compile(r"^    (pip install .+)$", re.M)


def readme_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:10])
    return README_COMMANDS.findall(head)


def test_readme_opens_with_the_main_job_and_the_test_command():
    main_job, tests = readme_commands()
    assert main_job.endswith("curvlib compare") and '".[bench]"' in main_job
    assert "pytest" in tests and '".[test,bench]"' in tests  # bench: the CLI's tests


def test_ci_runs_the_readme_test_command_after_pinning_torch():
    script = (ROOT / ".ci" / "run").read_text()
    tests = readme_commands()[1]
    assert tests in script.splitlines()
    assert script.index('pip install "torch==2.13.0"') < script.index(tests)
    assert "set -euo pipefail" in script


def test_the_test_command_installs_every_plugin_package():
    tests = readme_commands()[1]
    packages = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    assert {"curvlib-poisson", "curvlib-bilinear"} <= set(packages)
    for name in packages:  # each is tested through its entry point, so each must be installed
        assert f"-e plugins/{name} " in tests + " ", f"the test command does not install {name}"
        module = name.replace("-", "_")
        assert (ROOT / "plugins" / name / module / "py.typed").exists()
        assert '[project.entry-points."curvlib.plugins"]' in (
            ROOT / "plugins" / name / "pyproject.toml").read_text()


def test_project_metadata():
    text = (ROOT / "pyproject.toml").read_text()  # plain text: tomllib needs Python 3.11
    assert 'name = "curvlib"' in text and 'requires-python = ">=3.10"' in text
    for dep in ('"torch>=2.3"', '"opt_einsum', '"backpack-for-pytorch'):
        assert dep in text
    assert re.search(r'^test = \["pytest[^"]*", "hypothesis', text, re.M)
    assert re.search(r'^bench = \["scikit-learn[^"]*", "matplotlib[^"]*", "tqdm', text, re.M)
    assert (ROOT / "curvlib" / "py.typed").exists()
