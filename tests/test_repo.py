"""The repository's promises about itself: CI runs exactly README's test command, README's example runs,
the package declares ranges (exact pins live in constraints.txt) and full metadata."""

from __future__ import annotations

import contextlib
import io
import re
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_lines(text: str) -> list[str]:
    """Lines that create the venv and run something."""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3.11 -m venv .venv")]


def test_ci_runs_readme_test_command():
    readme = _command_lines((ROOT / "README.md").read_text())
    ci = _command_lines((ROOT / ".ci/run").read_text())
    assert len(readme) == 2, "README keeps exactly two start commands: main job and tests"
    assert ci == [readme[1]], "the test command in README.md and .ci/run must be the same"
    assert "nrfx report resnet50" in readme[0]
    assert all(" -c constraints.txt " in line for line in readme), "README's installs use the pinned versions"


def _fenced(text: str, language: str) -> list[str]:
    """The fenced blocks of one language in a markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_use_example_runs_and_prints_what_it_shows():
    readme = (ROOT / "README.md").read_text()
    (block,) = _fenced(readme, "python")
    shown = [line for line in _fenced(readme, "text")[-1].splitlines() if line and line != "..."]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md (Use)", "exec"), {"__name__": "readme_use"})
    printed = out.getvalue().splitlines()
    missing = [line for line in shown if line not in printed]
    assert not missing, f"README shows lines its example does not print: {missing}\nprinted:\n{out.getvalue()}"


def test_readme_links_work_on_a_package_index():
    links = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert links and all(link.startswith("https://") for link in links), links


def test_package_declares_ranges_and_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ]", d)[0]: d for d in project["dependencies"]}
    assert not any("==" in d for d in deps.values()), "pins belong in constraints.txt"
    assert re.fullmatch(r"torch>=2\.\d+,<2\.\d+", deps["torch"]) and "<0." in deps["torchvision"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert {"Homepage", "Documentation", "Issues"} <= project["urls"].keys()
    assert project["authors"] and project["keywords"] and "Typing :: Typed" in project["classifiers"]
    assert "tqdm" in project["optional-dependencies"]["progress"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text and "the nrfx authors" in license_text
    assert (ROOT / "src" / "nrfx" / "py.typed").exists()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["nrfx"]


def test_constraints_pin_this_machines_torch():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "nrfx" not in pins


def test_ruff_clean():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "examples"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_test_modules_share_helpers_only_through_support():
    """Helpers live in tests/support.py (and the random architectures in tests/models.py): no test module imports
    another, and no second module of helpers grows beside them."""
    tests = ROOT / "tests"
    crossing = [f"{path.name}: {line.strip()}" for path in tests.glob("test_*.py")
                for line in path.read_text().splitlines()
                if (re.match(r"\s*(from|import) test_\w+", line) and f"import {path.stem}" not in line
                    and f"from {path.stem} " not in line) or re.match(r"\s*(from|import) tests\b", line)]
    assert not crossing, crossing
    helpers = {p.name for p in tests.glob("*.py") if not p.name.startswith("test_")}
    assert helpers == {"support.py", "models.py", "conftest.py"}, helpers
