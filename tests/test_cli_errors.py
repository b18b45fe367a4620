"""Every CLI failure is one line on stderr and exit 2; output paths are checked before any work."""

from __future__ import annotations

import pytest

from nrfx.cli import main


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of model factories in the working directory; ``built`` marks that one ran."""
    (tmp_path / "cli_factories.py").write_text(
        "import pathlib, torch\n"
        "def broken():\n    raise ValueError('no weights here')\n"
        "def small():\n"
        "    pathlib.Path('built').write_text('yes')\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["report", "cli_factories:broken"], "raised ValueError: no weights here"),
    (["report", "cli_factories:small", "--input-size", "3", "100000", "100000"], "smaller size"),
    (["report", "cli_factories:small", "--input-size", "3", "8", "8", "--width", "0"], "too narrow"),
    (["report", "cli_factories:small", "--input-size", "3", "8"], "--input-size C H W"),
    (["report", "cli_factories:small", "--input-size", "3", "8", "8", "--json", "."], "is a folder"),
    (["rejuvenate", "cli_factories:small", "--input-size", "3", "8", "8", "--out", "."], "is a folder"),
    (["rejuvenate", "cli_factories:small", "--input-size", "3", "8", "8", "--out", "no/such/x.pt"], "does not exist"),
    (["rejuvenate", "cli_factories:small", "--input-size", "3", "8", "8", "--budget", "params=inf", "--out", "x.pt"],
     "not a finite number"),
    (["report"], "required"),
])
def test_failures_are_one_line_and_exit_2(factories, capsys, args, says):
    assert _exit_code(args) == 2
    line = _one_error_line(capsys)
    assert says in line and line.startswith("nrfx")
    if "--out" in args or "--json" in args:
        assert not (factories / "built").exists()  # the path was refused before the model was built


def _exit_code(args: list[str]) -> int:
    """main's exit status, whether returned or raised by argparse (usage errors)."""
    try:
        return main(args)
    except SystemExit as exited:
        return exited.code
