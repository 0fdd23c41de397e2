"""The benchmark suite's harness (benchmarks/harness.py) and protocol v2's modules: the paired
interval against scipy's t interval, the convergence rule on hand-made records, the resumable
store, and both modules end to end on a smoke run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    command = [
        sys.executable,
        "-m",
        "benchmarks.comparison",
        "--quick",
        "--workers",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    records = json.load(open(tmp_path / "comparison.json"))["records"]
    assert {r["method"] for r in records} == {"plain, lr by training loss", "DE ELBO", "DE ELBO, halving"}
    assert len(records) == 6
    for r in records:
        assert r["protocol"] == "v2" and len(r["backbone_sha256"]) == 64 and r["code_commit"]
    deelbo = next(r for r in records if r["method"] == "DE ELBO")
    assert {"model_average", "batch_norm_recomputed"} <= set(deelbo)
    assert "| noise-40 | timm-resnet | 50 | DE ELBO (16-draw average) |" in first.stdout
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "0 of 6 jobs to run" in again.stdout


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
