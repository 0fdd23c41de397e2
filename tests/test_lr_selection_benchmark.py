"""The learning-rate selection benchmark's smoke run: both selections, the grid's units, the ratios."""

import json

import pytest
from conftest import run_benchmark, with_benchmark_backbone

from hf_deelbo.search import halving_budget


@pytest.mark.slow
def test_lr_selection_benchmark_quick_mode_writes_its_outputs(tmp_path, benchmark_backbone):
    with_benchmark_backbone(tmp_path, benchmark_backbone)
    run_benchmark("lr_selection.py", "--quick", "--workers", 1, "--output-dir", tmp_path)
    saved = json.loads((tmp_path / "lr_selection.json").read_text())
    (record,) = saved["records"]
    halving, full = record["halving"], record["full"]
    assert [r["learning_rate"] for r in halving["runs"]] == [0.1, 0.01]
    assert halving["total_steps"] == halving_budget(2, 16) == 20  # 2·2 + 14 + a 1-step cool-down each
    assert sorted(r["steps"] for r in halving["runs"]) == [3, 17]
    chosen = next(r for r in halving["runs"] if r["eliminated_at"] is None)
    assert chosen["learning_rate"] == halving["learning_rate"] and chosen["steps"] == 17
    # the full selection: the regularization benchmark's DE ELBO record of the same pair
    (deelbo,) = json.loads((tmp_path / "regularization" / "regularization.json").read_text())["records"]
    assert full["learning_rate"] == deelbo["learning_rate"] and full["accuracy"] == deelbo["accuracy"]
    assert record["agrees"] == (full["learning_rate"] == halving["learning_rate"])
    if record["agrees"]:  # exact resume: the same learning rate gives the same model
        assert record["identical_model"]
    # the ratios are those of the pair's own measured times
    assert record["halving_over_deelbo_run"] == pytest.approx(halving["seconds"] / record["deelbo_run_seconds"])
    grid = 144 * record["grid"]["tuning_run_seconds"] + record["grid"]["retrain_seconds"]
    assert record["grid_over_halving"] == pytest.approx(grid / halving["seconds"])
    assert 0 <= halving["accuracy"] <= 1 and halving["seconds"] > 0
    assert saved["summary"][0]["agreements"] == int(record["agrees"])
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- lr_selection:start -->" in docs and "| noise-40 | timm-resnet | 50 |" in docs
