"""The repository's promises about itself: CI runs exactly README's test command."""

from __future__ import annotations

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


def test_ruff_clean():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "nrfx", "tests", "benchmarks", "examples"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
