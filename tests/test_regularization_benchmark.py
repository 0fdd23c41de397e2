"""The regularization benchmark's smoke run writes every output it promises."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_regularization_benchmark_quick_mode_writes_its_outputs(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "regularization.py")
    result = subprocess.run([sys.executable, script, "--quick", "--workers", "1", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "regularization.json").read_text())
    kinds = {(r["task"], r["kind"]) for r in saved["records"]}
    assert {("digits", "plain, lr by validation"), ("digits", "plain, lr by training loss"), ("digits", "α-curve"),
            ("noise-20", "α-curve"), ("noise-20", "DE ELBO")} <= kinds
    assert {r["alpha"] for r in saved["records"] if r["kind"] == "α-curve"} == {0.0, 1e-2}
    for record in saved["records"]:
        assert 0 <= record["accuracy"] <= 1 and record["seconds"] > 0
    assert saved["screen"][0]["task"] == "noise-20" and saved["choice"]["task"] == "noise-20"
    assert saved["summary"]["digits"]["alpha_curve"][0]["points"]
    for task in ("digits", "noise-20"):
        assert (tmp_path / f"alpha-curve-{task}.png").is_file()
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- regularization:start -->" in docs and "### The screen and the choice" in docs
