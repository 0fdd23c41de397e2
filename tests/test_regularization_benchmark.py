"""The regularization benchmark's smoke run writes every output it promises."""

import json

import pytest
from conftest import run_benchmark, with_benchmark_backbone


@pytest.mark.slow
def test_regularization_benchmark_quick_mode_writes_its_outputs(tmp_path, benchmark_backbone):
    with_benchmark_backbone(tmp_path, benchmark_backbone)
    run_benchmark("regularization.py", "--quick", "--workers", 1, "--output-dir", tmp_path)
    saved = json.loads((tmp_path / "regularization.json").read_text())
    kinds = {(r["task"], r["kind"]) for r in saved["records"]}
    assert {
        ("digits", "plain, lr by validation"),
        ("digits", "plain, lr by training loss"),
        ("digits", "α-curve"),
        ("noise-20", "α-curve"),
        ("noise-20", "DE ELBO"),
    } <= kinds
    assert {r["alpha"] for r in saved["records"] if r["kind"] == "α-curve"} == {0.0, 1e-2}
    # the baselines, on both tasks: one 3-trial study read as 2 and 3 trials, Laplace, IVON
    baselines = ("L2-SP + BO, 2 trials", "L2-SP + BO, 3 trials", "Laplace LA-LML", "IVON")
    assert {(task, kind) for task in ("digits", "noise-20") for kind in baselines} <= kinds
    studies = [r for r in saved["records"] if r["kind"].startswith("L2-SP + BO")]
    for record in studies:
        assert len(record["runs"]) == int(record["kind"].split(", ")[1].split()[0]) == record["num_runs"] - 1
        assert record["learning_rate"] == record["chosen"]["learning_rate"]
        assert 1e-6 <= record["chosen"]["alpha"] <= 1e-2 and 1e-4 <= record["learning_rate"] <= 1e-1
    # the extended grid: the chosen task only, α beyond the paper's 1e-2, 9 α × 2 lr + the retrain
    grids = [r for r in saved["records"] if r["kind"] == "L2-SP grid, α to 10"]
    assert [r["task"] for r in grids] == ["noise-20"]
    assert {run["alpha"] for run in grids[0]["runs"]} == {0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0}
    assert len(grids[0]["runs"]) == grids[0]["num_runs"] - 1 == 18
    assert grids[0]["learning_rate"] == grids[0]["chosen"]["learning_rate"]
    assert min(grids[0]["runs"], key=lambda run: run["validation_nll"])["alpha"] == grids[0]["chosen"]["alpha"]
    variants = ("DE ELBO, layer-wise λ", "DE ELBO, diagonal σ", "DE ELBO, layer-wise λ, diagonal σ")
    assert {(task, kind) for task in ("digits", "noise-20") for kind in variants} <= kinds
    for record in (r for r in saved["records"] if r["kind"] in variants):
        assert ("backbone_prior_variances" in record) == ("layer-wise" in record["kind"])
    for task in ("digits", "noise-20"):
        assert (tmp_path / f"layer-lambda-{task}.png").is_file()
    # LoRA rows: DE ELBO's backbone group is the adapter weights only, far fewer than the backbone's
    lora = ("DE ELBO, LoRA", "plain LoRA, lr by training loss")
    assert {(task, kind) for task in ("digits", "noise-20") for kind in lora} <= kinds
    for task in ("digits", "noise-20"):
        full, adapters = (
            [r for r in saved["records"] if r["task"] == task and r["kind"] == kind][0]
            for kind in ("DE ELBO", "DE ELBO, LoRA")
        )
        assert 0 < adapters["num_backbone_params"] < full["num_backbone_params"] / 5
    laplace = [r for r in saved["records"] if r["kind"] == "Laplace LA-LML"]
    assert all(r["alpha"] != 1e-4 and r["num_hyper_updates"] > 0 for r in laplace)
    for record in saved["records"]:
        assert 0 <= record["accuracy"] <= 1 and record["seconds"] > 0
    assert saved["screen"][0]["task"] == "noise-20" and saved["choice"]["task"] == "noise-20"
    assert saved["summary"]["digits"]["alpha_curve"][0]["points"]
    for task in ("digits", "noise-20"):
        assert (tmp_path / f"alpha-curve-{task}.png").is_file()
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- regularization:start -->" in docs and "### The screen and the choice" in docs
