"""The benchmark suite's harness (benchmarks/harness.py) and protocol v2's modules: the paired
interval against scipy's t interval, the convergence rule on hand-made records, the resumable
store, the κ and learning-rate checks' tables on hand-made records, and every module end to end on
a smoke run."""

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from conftest import run_benchmark
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import convergence, harness  # noqa: E402


def test_paired_interval_treats_the_replicate_as_the_unit():
    # Replicate means 1, 2, 6 (seeds averaged first), whatever the seeds' spread.
    pairs = [(0, 0.0), (0, 2.0), (1, 2.0), (2, 5.0), (2, 7.0), (2, 6.0)]
    interval = harness.paired_interval(pairs)
    means = [1.0, 2.0, 6.0]
    low, high = stats.t.interval(0.95, len(means) - 1, loc=sum(means) / 3, scale=stats.sem(means))
    assert interval["mean"] == pytest.approx(3.0)
    assert (interval["low"], interval["high"]) == (pytest.approx(low), pytest.approx(high))
    assert (interval["replicates"], interval["pairs"]) == (3, 6)
    assert harness.reading(interval) == "ties"
    assert harness.reading(harness.paired_interval([(0, 1.0), (1, 1.1), (2, 0.9)])) == "wins"
    one = harness.paired_interval([(0, 1.0), (0, 3.0)])
    assert one["mean"] == 2.0 and math.isnan(one["low"]) and harness.reading(one) == "n/a"


def _record(method, steps, **values):
    return {"task": "digits", "backbone": "vit", "n": 50, "method": method, "steps": steps, **values}


def test_convergence_rule_takes_the_smallest_steps_both_methods_pass():
    plain = [
        _record("plain", s, training_loss=v)
        for s, v in ((250, 1.0), (500, 0.5), (1000, 0.495), (2000, 0.494), (4000, 0.494))
    ]
    # DE ELBO's objective settles at 500, its σ only at 1000: the cell's steps are 1000.
    deelbo = [
        _record("DE ELBO", s, objective=o, sigma=g)
        for s, o, g in (
            (250, 2.0, 0.01),
            (500, 1.0, 0.02),
            (1000, 1.01, 0.030),
            (2000, 1.01, 0.0303),
            (4000, 1.01, 0.0305),
        )
    ]
    result = convergence.cell_steps(plain + deelbo, ("digits", "vit", 50), [250, 500, 1000, 2000], 4000)
    assert result["steps"] == 1000 and result["converged"] and result["complete"]
    assert result["changes"]["DE ELBO"][500] == pytest.approx(1 / 3)  # σ moved 0.02 → 0.03
    # σ still growing everywhere: not converged, the largest candidate, marked.
    growing = [_record("DE ELBO", s, objective=1.0, sigma=s / 1000) for s in (250, 500, 1000, 2000, 4000)]
    result = convergence.cell_steps(plain + growing, ("digits", "vit", 50), [250, 500, 1000, 2000], 4000)
    assert result["steps"] == 2000 and not result["converged"]


def test_store_merges_what_another_pass_wrote(tmp_path):
    path = str(tmp_path / "records.json")

    def key(r):
        return (r["id"],)

    first, second = harness.RecordStore(path, key), harness.RecordStore(path, key)
    first.add([{"id": 1}])
    second.add([{"id": 2}, {"id": 1}])
    assert sorted(r["id"] for r in json.load(open(path))["records"]) == [1, 2]
    assert harness.RecordStore(path, key).done == {(1,), (2,)}


@pytest.mark.slow
def test_comparison_smoke_run_is_resumable(tmp_path):
    """The main comparison's smoke run writes records with provenance; run again, it trains nothing."""
    arguments = ("--quick", "--workers", 1, "--output-dir", tmp_path)
    first = run_benchmark("comparison", *arguments)
    records = json.load(open(tmp_path / "comparison.json"))["records"]
    assert {r["method"] for r in records} == {"plain, lr by training loss", "DE ELBO", "DE ELBO, halving"}
    assert len(records) == 6
    for r in records:
        assert r["protocol"] == "v2" and len(r["backbone_sha256"]) == 64 and r["code_commit"]
    deelbo = next(r for r in records if r["method"] == "DE ELBO")
    assert {"model_average", "batch_norm_recomputed"} <= set(deelbo)
    assert "| noise-40 | timm-resnet | 50 | DE ELBO (16-draw average) |" in first.stdout
    again = run_benchmark("comparison", *arguments)
    assert "0 of 6 jobs to run" in again.stdout


def test_the_committed_report_is_what_the_committed_records_give():
    """docs/benchmarks.md's and its protocol v2 appendix's tables are regenerated from
    benchmarks/results/v2 byte for byte."""
    from benchmarks import report

    pages = report.rendered_pages()
    assert set(pages) == set(report.PAGES.values())
    for page, (text, rendered) in pages.items():
        assert rendered == text, page


def test_report_sections_fill_only_their_markers(tmp_path):
    from benchmarks import report

    page = "intro\n" + "\n".join(f"{start}\nold\n{end}" for start, end in report.SECTIONS.values()) + "\noutro\n"
    rendered = report.render(
        page, {name: f"{start}\nnew {name}\n{end}" for name, (start, end) in report.SECTIONS.items()}
    )
    assert rendered.startswith("intro\n") and rendered.endswith("\noutro\n") and "old" not in rendered
    with pytest.raises(ValueError, match="marker"):
        report.render("no markers", report.sections())


def _kappa_record(backbone, n, factor, seed, accuracy):
    return {
        "task": "noise-40",
        "backbone": backbone,
        "n": n,
        "factor": factor,
        "seed": seed,
        "accuracy": accuracy,
        "nll": 1.0,
        "sigma": 0.01,
    }


def test_kappa_rows_pair_each_factor_with_the_default_by_seed():
    from benchmarks import kappa_sweep

    records = [
        _kappa_record("vit", 100, factor, seed, accuracy)
        for factor, accuracies in ((1.0, (0.60, 0.70, 0.80)), (10.0, (0.50, 0.65, 0.60)))
        for seed, accuracy in enumerate(accuracies)
    ]
    table = {e["factor"]: e for e in kappa_sweep.rows(records)}
    assert set(table) == {1.0, 10.0} and "vs_default" not in table[1.0]
    differences = [-0.10, -0.05, -0.20]  # 10× κ minus κ = D/N, seed by seed
    interval = table[10.0]["vs_default"]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    assert interval["mean"] == pytest.approx(statistics.mean(differences))
    assert interval["high"] == pytest.approx(statistics.mean(differences) + half)
    assert table[10.0]["accuracy"] == pytest.approx((0.50 + 0.65 + 0.60) / 3)
    assert "| vit | 100 | 10 | 3 | 0.583 | -11.7 [" in kappa_sweep.markdown(kappa_sweep.rows(records))


def test_lr_check_scores_each_selection_against_the_oracle_lr():
    from benchmarks import lr_check

    # accuracy, selection score per (lr, seed): plain's score prefers 1e-2, where accuracy is worst.
    accuracy = {1e-2: (0.50, 0.40), 1e-3: (0.90, 0.80), 1e-4: (0.70, 0.70), 1e-5: (0.30, 0.30)}
    score = {1e-2: (0.1, 0.1), 1e-3: (0.5, 0.05), 1e-4: (0.9, 0.9), 1e-5: (2.0, 2.0)}
    records = [
        {
            "method": "plain",
            "learning_rate": lr,
            "seed": seed,
            "accuracy": accuracy[lr][seed],
            "selection_score": score[lr][seed],
        }
        for lr in lr_check.LEARNING_RATES
        for seed in (0, 1)
    ]
    (entry,) = lr_check.rows(records)
    assert entry["oracle"] == 1e-3 and entry["chosen"] == {0: 1e-2, 1: 1e-3}
    assert entry["regret"] == pytest.approx([0.90 - 0.50, 0.0])
    assert entry["regret_interval"]["mean"] == pytest.approx(0.20)
    (short,) = lr_check.rows(records[:-1])  # seed 1 lacks its lr 1e-5 run: it is left out
    assert short["seeds"] == 1 and short["chosen"] == {0: 1e-2} and short["regret"] == pytest.approx([0.40])


@pytest.mark.slow
@pytest.mark.parametrize("module, backbone, runs", [("kappa_sweep", "timm-resnet", 4), ("lr_check", "vit", 8)])
def test_claims_checks_smoke_run_is_resumable(module, backbone, runs, tmp_path):
    """Each check's smoke run (the committed replicate 0, copied: nothing is pretrained) writes
    records with provenance and its table; run again, it trains nothing."""
    shutil.copytree(
        ROOT / "benchmarks" / "results" / "v2" / "pretrained" / f"{backbone}-r0",
        tmp_path / "pretrained" / f"{backbone}-r0",
    )
    arguments = ("--quick", "--workers", 1, "--output-dir", tmp_path)
    first = run_benchmark(module, *arguments)
    records = json.load(open(tmp_path / ("kappa.json" if module == "kappa_sweep" else "lr_check.json")))["records"]
    assert len(records) == runs
    for r in records:
        assert r["protocol"] == "v2" and len(r["backbone_sha256"]) == 64 and r["code_commit"]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert (
        "| timm-resnet | 100 | 0.1 | 1 |" in first.stdout
        if module == "kappa_sweep"
        else "| DE ELBO | 1 |" in first.stdout
    )
    again = run_benchmark(module, *arguments)
    assert f"0 of {runs} jobs to run" in again.stdout


@pytest.mark.slow
def test_tier_3_procedures_choose_without_the_test_set_and_score_on_it(tmp_path, monkeypatch):
    """BO (3 trials here, 36 in the protocol), Laplace LA-LML and IVON (both hess_init values) run
    end to end on the committed replicate 0, 4 steps per run, through `benchmarks.procedures`."""
    from benchmarks import procedures, task

    monkeypatch.setattr(procedures, "BO_TRIALS", 3)
    path = str(ROOT / "benchmarks" / "results" / "v2" / "pretrained" / "timm-resnet-r0")
    train, test = task.training_data("noise-40", 50, 0)
    init = task.model_init("timm-resnet", path, 0)
    args = {**task.training_settings(4, 0), "output_dir": str(tmp_path / "runs")}
    bo = procedures._bayesian_optimization(init, train, test, args)
    assert bo["num_runs"] == 4 and len(bo["trials"]) == 3 and set(bo["chosen"]) == {"alpha", "beta", "learning_rate"}
    laplace = procedures._laplace(init, train, test, {**args, "output_dir": str(tmp_path / "laplace")})
    assert laplace["num_runs"] == 4 and laplace["alpha"] > 0
    ivon = procedures._ivon(init, train, test, {**args, "output_dir": str(tmp_path / "ivon")})
    assert ivon["num_runs"] == 8 and {r["hess_init"] for r in ivon["runs"]} == {0.1, 1.0}
    assert ivon["ivon_hess_init"] in (0.1, 1.0) and ivon["ivon_ess"] == 50
    for fields in (bo, laplace, ivon):
        assert 0.0 <= fields["accuracy"] <= 1.0 and fields["nll"] > 0
