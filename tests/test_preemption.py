"""Preemption: SIGTERM (and SIGUSR1) finish the step, write a complete checkpoint, release the output
directory and stop with a documented status; resuming continues bitwise. Real signals, real
processes: the command line, the Python API, and torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_failures import _train_argv, material  # noqa: F401 - the module's shared material fixture

from hf_deelbo.cli import main
from hf_deelbo.core.checkpoints import MANIFEST_NAME, checkpoint_problem
from hf_deelbo.core.lock import LOCK_NAME

BIN = os.path.dirname(sys.executable)
SCRIPT = Path(__file__).parent / "scripts" / "preempted_training.py"
TORCHRUN = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _same_weights(a: Path, b: Path) -> None:
    first, second = (safetensors.torch.load_file(d / "model.safetensors") for d in (a, b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (
        json.loads((a / "config.json").read_text())["deelbo"] == json.loads((b / "config.json").read_text())["deelbo"]
    )


def _signal_when(process: subprocess.Popen, marker: Path, number: int) -> None:
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    assert marker.exists(), "the run never wrote its second checkpoint"
    process.send_signal(number)


def _newest_checkpoint(out: Path) -> Path:
    return max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_command_line_preempted_then_resumed_is_bitwise_exact(number, material, tmp_path):  # noqa: F811
    """A real `hf-deelbo train` process sent SIGTERM (SIGUSR1) once checkpoint-2 is complete: it
    ends with 128 + the signal's number and one line, a complete checkpoint of the step it
    stopped after, no lock; the same command with --resume ends as a run never stopped."""
    flags = ("--max_steps", "40", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "5")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(_train_argv(material, straight, *flags)) == 0
    run = subprocess.Popen(
        [os.path.join(BIN, "hf-deelbo"), *_train_argv(material, stopped, *flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    _signal_when(run, stopped / "checkpoint-2" / MANIFEST_NAME, number)
    out, err = run.communicate(timeout=240)
    assert run.returncode == 128 + number, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("hf-deelbo train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    name = signal.Signals(number).name
    newest = _newest_checkpoint(stopped)
    assert f"stopped by {name} after step {newest.name.split('-')[1]}." in lines[0], lines[0]
    assert "continue with the same command and --resume" in lines[0]
    assert checkpoint_problem(str(newest), callback_names=("DEELBoCallback",)) is None
    assert not (stopped / LOCK_NAME).exists() and not (stopped / "checkpoint-40").exists()
    assert main(_train_argv(material, stopped, *flags, "--resume")) == 0  # the advice, followed
    _same_weights(straight, stopped)


def _script(out: Path, mode: str, launcher: list[str]) -> list[dict]:
    result = subprocess.run(
        [*launcher, str(SCRIPT), str(out), mode], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_python_api_preempted_then_resumed_is_bitwise_exact(processes, tmp_path):
    """`trainer.train()` receiving a real SIGTERM in its main process at step 5 (with 2 processes,
    only rank 0 receives it): every rank stops after the same step with `TrainingPreempted` naming a
    complete checkpoint, although the run saves no checkpoints on its own; train(resume_from_checkpoint=True)
    ends as a run never stopped, on every rank."""
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    straight = _script(tmp_path / "straight", "straight", launcher)
    stopped = _script(tmp_path / "stopped", "signalled", launcher)
    assert len(stopped) == processes and all(r["ended"] == "preempted" for r in stopped), stopped
    assert [r["step"] for r in stopped] == [5] * processes  # the step the signal came in, on every rank
    checkpoint = Path(stopped[0]["checkpoint"])
    assert checkpoint.name == f"checkpoint-{stopped[0]['step']}" and "stopped by SIGTERM" in stopped[0]["message"]
    assert checkpoint_problem(str(checkpoint), callback_names=("DEELBoCallback",), num_processes=processes) is None
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()
    resumed = _script(tmp_path / "stopped", "resume", launcher)
    assert [r["ended"] for r in resumed] == ["finished"] * processes
    assert [(r["step"], r["weights_sha"], r["sigma"]) for r in resumed] == [
        (r["step"], r["weights_sha"], r["sigma"]) for r in straight
    ]


@pytest.mark.slow
def test_torchrun_command_line_preempted_then_resumed_from_the_command_line(material, tmp_path):  # noqa: F811
    """`torchrun --nproc_per_node 2 ... hf-deelbo train`, sent SIGTERM (torchrun passes it to both
    ranks) once checkpoint-2 is complete: both ranks stop after the same step with a complete
    checkpoint (rng_state_0.pth and rng_state_1.pth); the same torchrun command with --resume ends
    as a run never stopped."""
    flags = (
        "--max_steps",
        "40",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--logging_steps",
        "5",
        "--use_cpu",
        "true",
        "--ddp_find_unused_parameters",
        "false",
        "--per_device_train_batch_size",
        "2",
    )
    command = [*TORCHRUN, "-m", "hf_deelbo.cli.main"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def launch(out, *extra):
        return subprocess.Popen(
            [*command, *_train_argv(material, out, *flags, *extra)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            start_new_session=True,
        )

    first = launch(straight)
    assert first.wait(timeout=400) == 0, first.stderr.read()[-3000:]
    run = launch(stopped)
    _signal_when(run, stopped / "checkpoint-2" / MANIFEST_NAME, signal.SIGTERM)
    _, err = run.communicate(timeout=240)
    assert run.returncode != 0 and "stopped by SIGTERM after step" in err, err[-3000:]
    newest = _newest_checkpoint(stopped)
    assert {p.name for p in newest.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert checkpoint_problem(str(newest), callback_names=("DEELBoCallback",), num_processes=2) is None
    assert not (stopped / LOCK_NAME).exists()
    resumed = launch(stopped, "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.stderr.read()[-3000:]
    _same_weights(straight, stopped)
