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
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),\n"
        "                               torch.nn.Conv2d(8, 4, 1))\n")
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


def test_version_weights_dry_run_and_legend(factories, capsys, tmp_path):
    import torch

    from nrfx.cli import main as cli

    with pytest.raises(SystemExit) as exited:
        cli(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("nrfx ")
    import cli_factories

    model = cli_factories.small()
    with torch.no_grad():
        model[1].weight[:4] = 0  # half the channels dead: the rewrite changes widths
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert cli(["report", "cli_factories:small", "--input-size", "3", "8", "8", "--weights", "w.pt"]) == 0
    text = capsys.readouterr().out
    assert "weights: w.pt" in text and "legend: c(A)" in text and "r(θ)  params 0." in text  # half dead
    assert cli(["report", "cli_factories:small", "--input-size", "3", "8", "8"]) == 0
    assert "random init" in capsys.readouterr().out
    args = ["rejuvenate", "cli_factories:small", "--input-size", "3", "8", "8", "--weights", "w.pt", "--align", "1",
            "--budget", "params=400"]
    assert cli(args) == 0  # no --out: a dry run
    text = capsys.readouterr().out
    assert "dry run (no --out): 4 channels removed" in text and "0: in 3 -> 3, out 8 -> " in text
    assert not list(tmp_path.glob("*.pt"))[1:]  # nothing written but the weights
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    assert cli(["report", "cli_factories:small", "--input-size", "3", "8", "8", "--weights", "bad.pt"]) == 2
    assert "does not load" in _one_error_line(capsys)
