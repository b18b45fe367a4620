"""docs/coverage.md's generated table is complete and its numbers are what nrfx computes now.

The table is written by ``python -m benchmarks.coverage_table --write``.  Fast checks: the
section parses, has a row for every torchvision classifier and every model of the timm family
sweep, and a handful of models recomputed give the printed numbers exactly (to one decimal of
a percent).  Every torchvision row is recomputed by the slow per-model sweep
(tests/test_torchvision_zoo.py, from the analysis it shares with the other checks); the whole
table (timm too, ≈ 7 min) is rechecked by rerunning the script.
"""

from __future__ import annotations

import pytest
import torchvision
from benchmarks import coverage_table
from benchmarks.coverage_table import DOC, measure, parse_table

# fast to build, analyse and gate (≈ 3 s together): BN convnets, LayerNorm convnets, ViT, Swin
SPOT_CHECKS = ("resnet18", "mobilenet_v2", "convnext_tiny", "vit_b_16", "swin_t")


def table() -> dict[tuple[str, str], dict[str, str]]:
    """The parsed generated section of docs/coverage.md."""
    return parse_table(DOC.read_text())


def test_table_has_a_row_for_every_torchvision_classifier():
    """Every torchvision classifier has a row, and each row has figures or an error's name."""
    rows = table()
    missing = [n for n in torchvision.models.list_models(module=torchvision.models) if ("torchvision", n) not in rows]
    assert not missing, f"docs/coverage.md lacks {missing}: run python -m benchmarks.coverage_table --write"
    for key, record in rows.items():
        assert record["monitored %"] or record["error"], key


def test_table_has_a_row_for_every_timm_sweep_model():
    """The script's timm list is the family sweep's, and every one has a row."""
    sweep = pytest.importorskip("test_timm_sweep")
    assert set(coverage_table.TIMM_MODELS) == set(sweep.MODELS.values())
    rows = table()
    assert not [n for n in coverage_table.TIMM_MODELS if ("timm", n) not in rows]


def assert_row_recomputes(source: str, name: str) -> None:
    """The row printed for a model equals a fresh measurement's cells."""
    printed = table()[(source, name)]
    fresh = dict(zip(coverage_table.HEADER, measure(source, name).cells(), strict=True))
    assert fresh == printed, "docs/coverage.md is stale: run python -m benchmarks.coverage_table --write"


@pytest.mark.parametrize("name", SPOT_CHECKS)
def test_spot_checked_rows_recompute_exactly(name: str):
    """resnet18, mobilenet_v2, convnext_tiny, vit_b_16 and swin_t: the table's numbers are today's."""
    assert_row_recomputes("torchvision", name)
