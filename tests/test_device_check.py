"""benchmarks/device_check.py, the prepared accelerator check, runs end to end on CPU with tiny
models (`--device cpu --quick`): every check is listed, none fails, and the ones a CPU cannot run
(fp16, FSDP) say why."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"
CHECKS = ["gradients", "in_place_restore", "device_vs_cpu", "resume_bitwise", "fp16", "bf16", "speed_memory", "fsdp2"]


def test_device_check_quick_on_cpu_lists_every_check(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "device_check.json").read_text())
    assert list(record["checks"]) == CHECKS
    for name in CHECKS:
        assert f"[{name}] " in result.stdout  # printed as it goes
    verdicts = {name: check["passed"] for name, check in record["checks"].items()}
    assert verdicts["gradients"] and verdicts["in_place_restore"] and verdicts["resume_bitwise"], verdicts
    assert verdicts["bf16"] and verdicts["device_vs_cpu"], record["checks"]
    assert (
        "needs a GPU" in record["checks"]["fp16"]["skipped"] and "needs a GPU" in record["checks"]["fsdp2"]["skipped"]
    )
    assert record["checks"]["gradients"]["relative_error"]["in_place"]["weights"] < 1e-6
    assert {row["mechanism"] for row in record["checks"]["speed_memory"]["rows"]} == {"in_place", "functional_call"}
    assert "| gradients | pass |" in (tmp_path / "device_check.md").read_text()
