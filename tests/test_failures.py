"""Failures of every kind, in one table: bad arguments, bad data, files on disk, Hub faults,
signals. Each case names the message it must produce, and every file present before the failure
(the run directories, models and data it works on) must still be there, byte for byte.

The runs are real: the command line in-process on a tiny ViT and an image folder, the trainers on
datasets' `Dataset`, the local Hub server, real signals, a real tmpfs where one can be mounted."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import NUM_LABELS, build_model, image_dataset, training_args
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer
from hf_deelbo.cli import main
from hf_deelbo.core.checkpoints import MANIFEST_NAME, checkpoint_problem
from hf_deelbo.core.lock import LOCK_NAME

BIN = os.path.dirname(sys.executable)


# ---- shared, read-only material -------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A tiny ViT saved like a Hub model, an image folder of 3 classes, and one finished CLI run
    with checkpoints after steps 1, 2 and 3 (copied by the cases that need a run)."""
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("material")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    ViTForImageClassification(config).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    digits = load_digits()
    for name in ("5", "6", "7"):
        (root / "images" / name).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == int(name)][:4]):
            Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB").save(
                root / "images" / name / f"{i}.png"
            )
    return {"VIT": str(root / "vit"), "IMAGES": str(root / "images"), "root": root}


def _train_argv(material, out, *extra):
    return [
        "train",
        "--model_name_or_path",
        material["VIT"],
        "--train_dir",
        material["IMAGES"],
        "--ignore_mismatched_sizes",
        "true",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(out),
        *extra,
    ]


@dataclass
class Workspace:
    root: Path
    material: dict
    hub: object
    capsys: object
    log: io.StringIO
    state: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "run"

    def train(self, *extra, out=None) -> list[str]:
        return _train_argv(self.material, out or self.out, *extra)

    def finished_run(self) -> Path:
        """The module's finished run (built on first use)."""
        if "RUN" not in self.material:
            run = self.material["root"] / "run"
            argv = _train_argv(self.material, run, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
            assert main(argv) == 0
            self.capsys.readouterr()
            self.log.truncate(0)
            self.log.seek(0)
            self.material["RUN"] = run
        return self.material["RUN"]

    def copy_run(self) -> Path:
        shutil.copytree(self.finished_run(), self.out)
        return self.out


@pytest.fixture
def ws(tmp_path, material, hub, capsys):
    # A user's files beside every case's run: a sentinel, a repository, a link to the sentinel. The
    # table's snapshot covers them: no case may touch them.
    outside = tmp_path / "users-project"
    (outside / ".git").mkdir(parents=True)
    (outside / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (outside / "sentinel.txt").write_text("a user's file")
    (outside / "link-to-sentinel").symlink_to(outside / "sentinel.txt")
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    loggers = [logging.getLogger(name) for name in ("hf_deelbo", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield Workspace(tmp_path, material, hub, capsys, log)
    for logger in loggers:
        logger.removeHandler(handler)


def _snapshot(*roots: Path) -> dict[str, str]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != LOCK_NAME:
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


# ---- how a case runs ------------------------------------------------------------------------


def cli(*argv) -> Callable:
    """The command line, in-process: (exit status, stderr + stdout + logs)."""

    def run(ws: Workspace):
        status = main(list(argv))
        captured = ws.capsys.readouterr()
        return status, captured.err + captured.out + ws.log.getvalue()

    return run


def api(function: Callable) -> Callable:
    """A Python call: (the exception type or 0, its message + logs)."""

    def run(ws: Workspace):
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - the table says which
            return type(error), str(error) + ws.log.getvalue()
        return 0, ws.log.getvalue()

    return run


@dataclass
class Case:
    id: str
    prepare: Callable  # Workspace -> the action (cli(...) / api(...))
    status: object  # exit status of the CLI, or the exception type of an API call (0: success)
    message: str
    then: Callable | None = None  # further checks, given the Workspace
    may_change: tuple[str, ...] = ()  # globs (relative to the workspace) a successful resume rewrites
    may_remove: tuple[str, ...] = ()  # globs (relative to the workspace) a successful overwrite removes
    marks: tuple = ()


def _complete(ws: Workspace, *names):
    for name in names:
        assert checkpoint_problem(str(ws.out / name), callback_names=("DEELBoCallback",)) is None, name


# ---- arguments ------------------------------------------------------------------------------


def bad_flag(*flags):
    return lambda ws: cli(*ws.train("--max_steps", "1", *flags))


def _no_output(ws):
    assert not ws.out.exists()


def args_file(values: dict, *flags):
    """`hf-deelbo train --config_file FILE` with `values` in FILE (JSON)."""

    def prepare(ws):
        path = ws.root / "args.json"
        path.write_text(json.dumps(values))
        return cli(*ws.train("--max_steps", "1", "--config_file", str(path), *flags))

    return prepare


def api_args(**values):
    """DEELBoTrainingArguments built from Python with `values`."""
    from hf_deelbo import DEELBoTrainingArguments

    return lambda ws: api(
        lambda: DEELBoTrainingArguments(output_dir=str(ws.out), use_cpu=True, report_to="none", **values)
    )


def _under_a_file(ws):
    (ws.root / "a-file").write_text("not a folder")
    return cli(*ws.train("--max_steps", "1", out=ws.root / "a-file" / "run"))


def _read_only(ws):
    """An output directory on a read-only filesystem (a read-only tmpfs, where one can be mounted)."""
    disk = ws.root / "read-only"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("no read-only filesystem can be mounted here")
    ws.state["mounted"] = disk
    return cli(*ws.train("--max_steps", "1", out=disk))


def _unmount(ws):
    if "mounted" in ws.state:
        subprocess.run(["umount", str(ws.state["mounted"])], check=True)


ARGUMENT_CASES = [
    Case("lr-zero", bad_flag("--learning_rate", "0"), 2, "learning_rate must be a finite number > 0", _no_output),
    Case("lr-negative", bad_flag("--learning_rate", "-0.1"), 2, "0.001, 0.0001); got -0.1", _no_output),
    Case("lr-nan", bad_flag("--learning_rate", "nan"), 2, "0.001, 0.0001); got nan", _no_output),
    Case(
        "max-grad-norm-nan",
        bad_flag("--max_grad_norm", "nan"),
        2,
        "max_grad_norm must be a finite number >= 0 (0 turns clipping off",
        _no_output,
    ),
    Case(
        "max-grad-norm-negative",
        bad_flag("--max_grad_norm", "-1"),
        2,
        "max_grad_norm must be a finite number >= 0",
        _no_output,
    ),
    Case("fp16-on-cpu", bad_flag("--fp16", "true"), 2, "fp16=True needs a GPU", _no_output),
    Case(
        "max-train-samples-zero",
        bad_flag("--max_train_samples", "0"),
        2,
        "--max_train_samples must be an int >= 1 (omit it to keep every example); got 0",
        _no_output,
    ),
    Case(
        "max-train-samples-negative",
        bad_flag("--max_train_samples", "-3"),
        2,
        "--max_train_samples must be an int >= 1",
        _no_output,
    ),
    Case(
        "max-eval-samples-zero",
        bad_flag("--max_eval_samples", "0"),
        2,
        "--max_eval_samples must be an int >= 1",
        _no_output,
    ),
    Case(
        "train-val-split", bad_flag("--train_val_split", "1.5"), 2, "--train_val_split must be in [0, 1)", _no_output
    ),
    Case(
        "sigma-init-huge",
        bad_flag("--sigma_init", "1000"),
        2,
        "sigma_init=1000 is larger than the backbone's weights themselves",
        _no_output,
    ),
    Case(
        "batch-size-zero", bad_flag("--per_device_train_batch_size", "0"), 2, "per_device_train_batch_size", _no_output
    ),
    Case(
        "learning-rates-negative",
        bad_flag("--learning_rates", "0.1", "-1"),
        2,
        "--learning_rates must all be > 0",
        _no_output,
    ),
    Case("resume-nothing", bad_flag("--resume"), 2, "holds no complete checkpoint to resume from", _no_output),
    Case(
        "resume-from-missing-dir",
        lambda ws: cli(*ws.train("--resume_from_checkpoint", str(ws.root / "nope"))),
        2,
        "is not a directory; pass a checkpoint-<step> directory",
        _no_output,
    ),
    Case(
        "args-file-max-steps-fractional",
        args_file({"max_steps": 10.5}),
        2,
        "sets 'max_steps' to 10.5, but --max_steps takes an int; write the value as on the command line",
        _no_output,
    ),
    Case(
        "args-file-kappa-a-list",
        args_file({"kappa": [1, 2]}),
        2,
        "sets 'kappa' to [1, 2], but --kappa takes a number",
        _no_output,
    ),
    Case(
        "args-file-bma-samples-fractional",
        args_file({"bma_samples": 2.7}),
        2,
        "sets 'bma_samples' to 2.7, but --bma_samples takes an int",
        _no_output,
    ),
    Case(
        "args-file-max-steps-a-bool",
        args_file({"max_steps": True}),
        2,
        "sets 'max_steps' to True, but --max_steps takes an int",
        _no_output,
    ),
    Case(
        "args-file-learning-rate-a-word",
        args_file({"learning_rate": "fast"}),
        2,
        "sets 'learning_rate' to 'fast', but --learning_rate takes a number",
        _no_output,
    ),
    Case(
        "args-file-learning-rates-not-numbers",
        args_file({"learning_rates": [0.1, "x"]}),
        2,
        "--learning_rates takes a number (or a list of them)",
        _no_output,
    ),
    Case(
        "args-file-choice-outside-the-choices",
        args_file({"posterior_covariance": "bogus"}),
        2,
        "posterior_covariance must be 'isotropic' (one σ for every weight) or 'diagonal'",
        _no_output,
    ),
    Case(
        "gradient-accumulation-zero",
        bad_flag("--gradient_accumulation_steps", "0"),
        2,
        "gradient_accumulation_steps must be an int >= 1 (1 takes an optimizer step after every batch); got 0",
        _no_output,
    ),
    Case(
        "sigma-init-negative-exponent",
        bad_flag("--sigma_init", "-1e-4"),
        2,
        "sigma_init must be a finite number > 0 (the paper uses 1e-4); got -0.0001",
        _no_output,
    ),
    Case(
        "learning-rates-negative-exponent",
        bad_flag("--learning_rates", "0.1", "-1e-3"),
        2,
        "--learning_rates must all be > 0; got [0.1, -0.001]",
        _no_output,
    ),
    Case(
        "do-train-and-do-eval-false",
        bad_flag("--do_train", "false", "--do_eval", "false"),
        2,
        "--do_train and --do_eval are both false, so the run would do nothing",
        _no_output,
    ),
    Case("fp16-advice-works-on-cpu", bad_flag("--fp16", "true"), 2, "--bf16 true --use_cpu true", _no_output),
    Case(
        "embedded-task-fewer-examples-than-classes",
        lambda ws: cli("train", "--max_train_samples", "1", "--output_dir", str(ws.out)),
        2,
        "--max_train_samples 1 is fewer than the embedded task's 5 classes (digits 5-9)",
        _no_output,
    ),
    Case("output-dir-under-a-file", _under_a_file, 2, "/a-file', which is a file; choose another --output_dir"),
    Case(
        "output-dir-read-only",
        _read_only,
        2,
        "cannot be written (read-only for this user or on a read-only filesystem)",
        _unmount,
    ),
    Case("api-kappa-a-string", api_args(kappa="3"), ValueError, "kappa must be a number; got '3' (str)"),
    Case(
        "api-num-train-examples-fractional",
        api_args(num_train_examples=0.5),
        ValueError,
        "num_train_examples must be an int; got 0.5 (float)",
    ),
    Case("api-bma-samples-fractional", api_args(bma_samples=2.5), ValueError, "bma_samples must be an int; got 2.5"),
    Case("api-max-steps-fractional", api_args(max_steps=10.5), ValueError, "max_steps must be an int; got 10.5"),
]


# ---- files on disk --------------------------------------------------------------------------


def _previous_run(ws):
    ws.out.mkdir()
    (ws.out / "model.safetensors").write_bytes(b"weights of an earlier run")
    return cli(*ws.train("--max_steps", "1"))


def _killed_run(ws):
    ws.copy_run()
    return cli(*ws.train("--max_steps", "1"))


def _output_is_a_file(ws):
    ws.out.write_text("not a directory")
    return cli(*ws.train("--max_steps", "1"))


def _truncate(ws, name, size=100):
    path = ws.out / name
    os.truncate(path, size)


def _resume_with(breakage, *flags):
    """The copied run with its newest checkpoint broken, resumed for one more step."""

    def prepare(ws):
        ws.copy_run()
        breakage(ws)
        return cli(*ws.train("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1", "--resume", *flags))

    return prepare


def _resumed_from(name):
    def check(ws):
        state = json.loads((ws.out / "trainer_state.json").read_text())
        assert state["global_step"] == 4
        _complete(ws, "checkpoint-4")
        text = ws.log.getvalue()
        assert f"Resuming from {ws.out / name}" in text

    return check


RESUME_REWRITES = ("run/*.*", "run/checkpoint-4/*")


def _remove(ws, name):
    path = ws.out / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _empty_last_checkpoint(ws):
    for path in (ws.out / "checkpoint-3").iterdir():
        path.unlink()


def _pickle_only(ws):
    _remove(ws, "checkpoint-3/model.safetensors")
    ws.state["marker"] = ws.root / "payload-ran"
    torch.save({"weight": Payload(str(ws.state["marker"]))}, ws.out / "checkpoint-3" / "pytorch_model.bin")
    _remove(ws, f"checkpoint-3/{MANIFEST_NAME}")


def _no_callback_state(ws):
    path = ws.out / "checkpoint-3" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"]["DEELBoCallback"]
    path.write_text(json.dumps(state))
    _remove(ws, f"checkpoint-3/{MANIFEST_NAME}")


def _explicit(breakage):
    def prepare(ws):
        ws.copy_run()
        breakage(ws)
        return cli(*ws.train("--max_steps", "4", "--resume_from_checkpoint", str(ws.out / "checkpoint-3")))

    return prepare


class Payload:
    """Unpickling this creates a file: a planted payload that must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _planted(name):
    """Every checkpoint's `name` replaced by a torch archive whose pickle would run code; resumed
    explicitly from the newest."""

    def prepare(ws):
        ws.copy_run()
        ws.state["marker"] = ws.root / "payload-ran"
        for step in (1, 2, 3):
            torch.save({"state": Payload(str(ws.state["marker"]))}, ws.out / f"checkpoint-{step}" / name)
            _remove(ws, f"checkpoint-{step}/{MANIFEST_NAME}")
        return cli(*ws.train("--max_steps", "4", "--resume_from_checkpoint", str(ws.out / "checkpoint-3")))

    return prepare


def _payload_never_ran(ws):
    assert not ws.state["marker"].exists()


def _all_broken(ws):
    for step in (1, 2, 3):
        _truncate(ws, f"checkpoint-{step}/optimizer.pt")


def _live_lock(ws):
    """A second process that holds the lock of output_dir (as a live run does)."""
    ws.copy_run()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hf_deelbo.core import lock; lock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)",
            str(ws.out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    ws.state["holder"] = holder
    return cli(*ws.train("--max_steps", "4", "--resume"))


def _stop_holder(ws):
    ws.state["holder"].kill()
    ws.state["holder"].wait()


def _stale_lock(ws):
    ws.out.mkdir()
    (ws.out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 17, "host": socket.gethostname(), "started": "then"}))
    return cli(*ws.train("--max_steps", "1"))


def _lock_taken_over(ws):
    assert (ws.out / "model.safetensors").is_file() and not (ws.out / LOCK_NAME).exists()


def _victim(ws) -> Path:
    """A user's file outside the run, which no case may touch."""
    victim = ws.root / "victim.txt"
    victim.write_text("a user's thesis, not the run's")
    return victim


def _planted_lock(plant):
    """An output directory whose lock path holds what `plant(lock path, victim)` put there."""

    def prepare(ws):
        ws.out.mkdir()
        plant(ws.out / LOCK_NAME, _victim(ws))
        return cli(*ws.train("--max_steps", "1"))

    return prepare


def _lock_path_untouched(kind):
    def check(ws):
        path = ws.out / LOCK_NAME
        assert {"link": path.is_symlink, "folder": path.is_dir, "hard": lambda: path.stat().st_nlink == 2}[kind]()
        assert (ws.root / "victim.txt").read_text() == "a user's thesis, not the run's"
        assert not (ws.out / "model.safetensors").exists()

    return check


def _project_folder(ws):
    """`--overwrite_output_dir` pointed at a folder a user works in."""
    ws.out.mkdir()
    (ws.out / ".git").mkdir()
    (ws.out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (ws.out / "thesis.tex").write_text("\\documentclass{article}")
    (ws.out / "data").mkdir()
    (ws.out / "data" / "x.csv").write_text("1,2")
    return cli(*ws.train("--max_steps", "1", "--overwrite_output_dir", "true"))


def _run_with(change):
    """The copied run, changed by `change`, overwritten."""

    def prepare(ws):
        ws.copy_run()
        change(ws)
        return cli(*ws.train("--max_steps", "1", "--overwrite_output_dir", "true"))

    return prepare


def _user_note(ws):
    (ws.out / "checkpoint-2" / "notes.txt").write_text("mine")


def _recorded_file_now_a_link(ws):
    """A file the run recorded writing, replaced by a link to a user's file outside the run."""
    target = ws.out / "checkpoint-1" / "optimizer.pt"
    target.unlink()
    target.symlink_to(_victim(ws))


def _record_names_outside(ws):
    """The run's record tampered with to list files outside the output directory."""
    from hf_deelbo.core.run_files import RUN_FILES_NAME

    _victim(ws)
    record = ws.out / RUN_FILES_NAME
    files = json.loads(record.read_text())["files"]
    record.write_text(json.dumps({"files": files + ["../victim.txt", str(ws.root / "victim.txt")]}))


def _overwritten(ws):
    assert (ws.root / "victim.txt").read_text() == "a user's thesis, not the run's"
    assert (ws.out / "model.safetensors").is_file() and not (ws.out / "checkpoint-3").exists()


def _per_rank_rng_files(ws):
    """checkpoint-3 as a 2-process run writes it (rng_state_0.pth, rng_state_1.pth)."""
    checkpoint = ws.out / "checkpoint-3"
    shutil.copy(checkpoint / "rng_state.pth", checkpoint / "rng_state_1.pth")
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")
    _remove(ws, f"checkpoint-3/{MANIFEST_NAME}")


def _flip_a_byte(ws):
    """One byte of checkpoint-3's weights flipped (past the header): same size, another file."""
    path = ws.out / "checkpoint-3" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def _nan_weights(ws, keep_manifest=False):
    """checkpoint-3's weights with one NaN, written as a valid safetensors file."""
    import safetensors.torch

    path = ws.out / "checkpoint-3" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = float("nan")
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    if not keep_manifest:
        _remove(ws, f"checkpoint-3/{MANIFEST_NAME}")


def _callback_state(value):
    def change(ws):
        path = ws.out / "checkpoint-3" / "trainer_state.json"
        state = json.loads(path.read_text())
        state["stateful_callbacks"]["DEELBoCallback"]["attributes"]["posterior_rho"] = value
        path.write_text(json.dumps(state))
        _remove(ws, f"checkpoint-3/{MANIFEST_NAME}")

    return change


FILE_CASES = [
    Case(
        "output-dir-holds-another-run",
        _previous_run,
        2,
        "already holds files from another run; pass --overwrite_output_dir",
    ),
    Case("output-dir-holds-a-killed-run", _killed_run, 2, "pass --resume to continue it from its newest complete"),
    Case("output-dir-is-a-file", _output_is_a_file, 2, "is a file, not a directory"),
    Case(
        "resume-truncated-weights",
        _resume_with(lambda ws: _truncate(ws, "checkpoint-3/model.safetensors")),
        0,
        "Not resuming from checkpoint-3: model.safetensors",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-missing-trainer-state",
        _resume_with(lambda ws: _remove(ws, "checkpoint-3/trainer_state.json")),
        0,
        "Not resuming from checkpoint-3: trainer_state.json is missing",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-empty-checkpoint",
        _resume_with(_empty_last_checkpoint),
        0,
        "Not resuming from checkpoint-3: model.safetensors is missing",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-missing-optimizer",
        _resume_with(lambda ws: _remove(ws, "checkpoint-3/optimizer.pt")),
        0,
        "Not resuming from checkpoint-3: optimizer.pt is missing",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-missing-rng-state",
        _resume_with(lambda ws: _remove(ws, "checkpoint-3/rng_state.pth")),
        0,
        "Not resuming from checkpoint-3: rng_state.pth is missing",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-missing-scheduler-no-manifest",
        _resume_with(
            lambda ws: (_remove(ws, "checkpoint-3/scheduler.pt"), _remove(ws, f"checkpoint-3/{MANIFEST_NAME}"))
        ),
        0,
        "Not resuming from checkpoint-3: scheduler.pt is missing",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-two-broken",
        _resume_with(
            lambda ws: (_truncate(ws, "checkpoint-3/optimizer.pt"), _remove(ws, "checkpoint-2/rng_state.pth"))
        ),
        0,
        "Not resuming from checkpoint-2: rng_state.pth is missing",
        _resumed_from("checkpoint-1"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-pickle-only",
        _resume_with(_pickle_only),
        0,
        "pytorch_model.bin (a pickle, which is never loaded)",
        lambda ws: (_resumed_from("checkpoint-2")(ws), _payload_never_ran(ws)),
        RESUME_REWRITES,
    ),
    *[
        Case(f"pickle-payload-in-{name}", _planted(name), 1, f"{name} holds more than tensors", _payload_never_ran)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth")
    ],
    Case(
        "resume-no-callback-state",
        _resume_with(_no_callback_state),
        0,
        "trainer_state.json holds no state of DEELBoCallback",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-every-checkpoint-broken",
        _resume_with(_all_broken),
        2,
        "holds no complete checkpoint to resume from (checkpoint-3: optimizer.pt is truncated or corrupt",
    ),
    Case(
        "resume-explicit-truncated",
        _explicit(lambda ws: _truncate(ws, "checkpoint-3/model.safetensors")),
        2,
        "checkpoint-3' cannot be resumed from exactly: model.safetensors is truncated or corrupt",
    ),
    Case(
        "resume-explicit-missing-rng",
        _explicit(lambda ws: _remove(ws, "checkpoint-3/rng_state.pth")),
        2,
        "cannot be resumed from exactly: rng_state.pth is missing",
    ),
    Case("output-dir-locked-by-a-live-run", _live_lock, 2, "is in use by another run (pid", _stop_holder),
    Case("stale-lock-taken-over", _stale_lock, 0, "Taking over the lock", _lock_taken_over),
    Case(
        "lock-is-a-link-to-a-users-file",
        _planted_lock(lambda lock, victim: lock.symlink_to(victim)),
        2,
        "_hf_deelbo.lock is a symbolic link, not the lock file hf_deelbo writes there",
        _lock_path_untouched("link"),
    ),
    Case(
        "lock-is-a-dangling-link",
        _planted_lock(lambda lock, victim: lock.symlink_to(victim.parent / "new.txt")),
        2,
        "_hf_deelbo.lock is a symbolic link",
        lambda ws: not (ws.root / "new.txt").exists() or pytest.fail(),
    ),
    Case(
        "lock-is-a-hard-link-to-a-users-file",
        _planted_lock(lambda lock, victim: os.link(victim, lock)),
        2,
        "_hf_deelbo.lock is a hard link (2 names for one file)",
        _lock_path_untouched("hard"),
    ),
    Case(
        "lock-is-a-folder",
        _planted_lock(lambda lock, victim: (lock.mkdir(), (lock / "kept").write_text("x"))),
        2,
        "_hf_deelbo.lock is a folder, not the lock file",
        _lock_path_untouched("folder"),
    ),
    Case(
        "overwrite-refuses-a-project-folder",
        _project_folder,
        2,
        "also holds .git/, data/, thesis.tex, which no run wrote; nothing was removed",
    ),
    Case(
        "overwrite-refuses-a-users-file-in-a-run",
        _run_with(_user_note),
        2,
        "also holds checkpoint-2/, which no run wrote; nothing was removed",
    ),
    Case(
        "overwrite-replaces-an-earlier-run",
        _run_with(lambda ws: _victim(ws)),
        0,
        "Model, config.json",
        _overwritten,
        ("run/*",),
        ("run/*",),
    ),
    Case(
        "overwrite-removes-a-link-not-its-target",
        _run_with(_recorded_file_now_a_link),
        0,
        "Model, config.json",
        _overwritten,
        ("run/*",),
        ("run/*",),
    ),
    Case(
        "overwrite-never-reaches-outside",
        _run_with(_record_names_outside),
        0,
        "Model, config.json",
        _overwritten,
        ("run/*",),
        ("run/*",),
    ),
    Case(
        "resume-a-flipped-byte-in-the-weights",
        _resume_with(_flip_a_byte),
        0,
        "Not resuming from checkpoint-3: model.safetensors is not what was saved (its SHA-256 differs",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-nan-weights",
        _resume_with(_nan_weights),
        0,
        "Not resuming from checkpoint-3: model.safetensors holds non-finite values",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-nan-weights-with-their-manifest",
        _resume_with(lambda ws: _nan_weights(ws, keep_manifest=True)),
        0,
        "Not resuming from checkpoint-3: model.safetensors",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-nan-rho",
        _resume_with(_callback_state(float("nan"))),
        0,
        "Not resuming from checkpoint-3: trainer_state.json holds DEELBoCallback.posterior_rho = 'nan', not finite",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-rho-a-string",
        _resume_with(_callback_state("-9.2")),
        0,
        "Not resuming from checkpoint-3: trainer_state.json holds DEELBoCallback.posterior_rho = '-9.2', not finite",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-explicit-nan-weights",
        _explicit(_nan_weights),
        2,
        "checkpoint-3' cannot be resumed from exactly: model.safetensors holds non-finite values",
    ),
    Case(
        "lock-is-a-pipe",
        _planted_lock(lambda lock, victim: os.mkfifo(lock)),
        2,
        "_hf_deelbo.lock is not a regular file, not the lock file hf_deelbo writes there",
    ),
    Case(
        "resume-explicit-rho-a-string",
        _explicit(_callback_state("-9.2")),
        2,
        "cannot be resumed from exactly: trainer_state.json holds DEELBoCallback.posterior_rho = '-9.2'",
    ),
    Case(
        "resume-manifest-not-a-mapping",
        _resume_with(
            lambda ws: (ws.out / "checkpoint-3" / MANIFEST_NAME).write_text('{"files": ["model.safetensors"]}')
        ),
        0,
        "Not resuming from checkpoint-3: checkpoint_complete.json is unreadable ('files' is not a mapping)",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
    Case(
        "resume-per-rank-rng-files-with-one-process",
        _resume_with(_per_rank_rng_files),
        0,
        "Not resuming from checkpoint-3: rng_state.pth is missing (it was written by 2 processes and is resumed by 1: "
        "resume with as many, e.g. torchrun --nproc_per_node 2)",
        _resumed_from("checkpoint-2"),
        RESUME_REWRITES,
    ),
]


# ---- config.deelbo on read --------------------------------------------------------------------


def _saved_model_with(entry_change):
    """The copied run's final model with its config.json's `deelbo` changed."""

    def prepare(ws, command):
        ws.copy_run()
        config_file = ws.out / "config.json"
        config = json.loads(config_file.read_text())
        entry_change(config)
        config_file.write_text(json.dumps(config) if isinstance(config, dict) else config)
        if command == "show":
            return cli("show", str(ws.out))
        return cli(
            "evaluate",
            "--model_name_or_path",
            str(ws.out),
            "--validation_dir",
            ws.material["IMAGES"],
            "--bma_samples",
            "2",
        )

    return prepare


def _set(key, value):
    def change(config):
        if value is _DELETE:
            del config["deelbo"][key]
        else:
            config["deelbo"][key] = value

    return change


_DELETE = object()


def _entry(value):
    def change(config):
        config["deelbo"] = value

    return change


CONFIG_VARIANTS = [
    ("string", _entry("lambda=1"), "'deelbo' must be a JSON object of hyperparameters; got 'lambda=1'"),
    ("list", _entry([1.0, 2.0]), "'deelbo' must be a JSON object of hyperparameters; got [1.0, 2.0]"),
    ("empty", _entry({}), "'deelbo' has no 'lambda' (keys: [])"),
    ("sigma-missing", _set("sigma", _DELETE), "'deelbo' has no 'sigma'"),
    ("sigma-negative", _set("sigma", -0.1), "deelbo.sigma must be a finite number > 0; got -0.1"),
    ("sigma-nan", _set("sigma", float("nan")), "deelbo.sigma must be a finite number > 0; got nan"),
    ("lambda-string", _set("lambda", "big"), "deelbo.lambda must be a finite number > 0; got 'big'"),
    ("count-float", _set("num_train_examples", 2.5), "deelbo.num_train_examples must be an int >= 0; got 2.5"),
    ("format-version-newer", _set("format_version", 99), "deelbo.format_version is newer than this hf_deelbo reads"),
    ("null", _entry(None), "'deelbo' is null, not a JSON object of hyperparameters"),
    (
        "posterior-covariance-bogus",
        _set("posterior_covariance", "bogus"),
        "deelbo.posterior_covariance must be one of ['isotropic', 'diagonal']; got 'bogus'",
    ),
    (
        "layer-without-variances",
        _set("prior_variance_grouping", "layer"),
        "deelbo.prior_variance_grouping is 'layer', which needs deelbo.backbone_prior_variances, and it is missing",
    ),
]
CONFIG_CASES = [
    Case(
        f"{command}-config-{name}", lambda ws, c=change, command=command: _saved_model_with(c)(ws, command), 2, message
    )
    for name, change, message in CONFIG_VARIANTS
    for command in ("show", "evaluate")
    if command == "show"
    or name in ("string", "sigma-nan", "empty", "format-version-newer", "null", "posterior-covariance-bogus")
]


def _not_json(ws):
    ws.copy_run()
    (ws.out / "config.json").write_text("{broken")
    return cli("show", str(ws.out))


def _posterior_from_bad_config(ws):
    from hf_deelbo import posterior_from_config

    model, _ = build_model("resnet")
    model.config.deelbo = {
        "lambda": 1.0,
        "tau": 1.0,
        "sigma": float("nan"),
        "kappa": 1.0,
        "num_train_examples": 1,
        "num_backbone_params": 1,
        "num_head_params": 1,
    }
    return api(lambda: posterior_from_config(model))


def _split_record(text):
    """The copied run with `text` as its data_split.json, evaluated."""

    def prepare(ws):
        ws.copy_run()
        (ws.out / "data_split.json").write_text(text)
        return cli("evaluate", "--model_name_or_path", str(ws.out))

    return prepare


def _pickled_weights(ws):
    """A model directory whose weights are a pickle that would run code when loaded."""
    model = ws.root / "planted"
    model.mkdir()
    shutil.copy(Path(ws.material["VIT"]) / "config.json", model / "config.json")
    ws.state["marker"] = ws.root / "payload-ran"
    torch.save({"weight": Payload(str(ws.state["marker"]))}, model / "pytorch_model.bin")
    return cli("evaluate", "--model_name_or_path", str(model), "--validation_dir", ws.material["IMAGES"])


_EMBEDDED_RECORD = json.dumps({"source": "embedded digits", "seed": 1, "test_fraction": 0.3})
BAD_RECORD = "is no valid record of the run's data"
CONFIG_CASES += [
    Case("data-split-not-json", _split_record("{broken"), 2, f"data_split.json {BAD_RECORD} (not readable JSON"),
    Case("data-split-a-list", _split_record("[1, 2]"), 2, f"{BAD_RECORD} (it holds list, not a JSON object)"),
    Case(
        "data-split-unknown-source",
        _split_record(json.dumps({"source": "the moon", "seed": 1, "test_fraction": 0.3})),
        2,
        f"{BAD_RECORD} (source is 'the moon'",
    ),
    Case(
        "data-split-seed-a-word",
        _split_record(json.dumps({"source": "embedded digits", "seed": "x", "test_fraction": 0.3})),
        2,
        f"{BAD_RECORD} (seed is 'x')",
    ),
    Case(
        "data-split-fraction-above-one",
        _split_record(json.dumps({"source": "image folder", "seed": 1, "test_fraction": 2})),
        2,
        f"{BAD_RECORD} (test_fraction is 2)",
    ),
    Case(
        "data-split-no-columns",
        _split_record(json.dumps({"source": "image folder", "seed": 1, "test_fraction": 0.2, "train_dir": "x"})),
        2,
        f"{BAD_RECORD} (image_column_name or label_column_name is missing)",
    ),
    Case(
        "evaluate-split-without-data",
        lambda ws: (
            _split_record(_EMBEDDED_RECORD)(ws),
            cli("evaluate", "--model_name_or_path", str(ws.out), "--split", "test"),
        )[1],
        2,
        "--split 'test' names a split of --dataset_name or --validation_dir data, and none is given",
    ),
    Case(
        "evaluate-pickled-weights",
        _pickled_weights,
        2,
        "holds pickled weights with more than tensors, which are never unpickled",
        _payload_never_ran,
    ),
    Case("show-config-not-json", _not_json, 2, "config.json is not valid JSON"),
    Case(
        "posterior-from-config-sigma-nan",
        _posterior_from_bad_config,
        ValueError,
        "deelbo.sigma must be a finite number > 0; got nan",
    ),
]


# ---- data -----------------------------------------------------------------------------------


def _trainer(ws, dataset, kind="resnet", model=None, callbacks=None, **overrides):
    model = model if model is not None else build_model(kind)[0]
    values = dict(max_steps=4, remove_unused_columns=False, output_dir=str(ws.out))
    return DEELBoTrainer(
        model=model, args=training_args(ws.root, **{**values, **overrides}), train_dataset=dataset, callbacks=callbacks
    )


def _images(n=8, labels=None, nan_at=None):
    pixel_values = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if nan_at is not None:
        pixel_values[nan_at, 0, 0, 0] = float("nan")
    labels = (
        torch.randint(0, NUM_LABELS, (n,), generator=torch.Generator().manual_seed(1)) if labels is None else labels
    )
    return Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": torch.as_tensor(labels).numpy()})


class TorchImages(torch.utils.data.Dataset):
    """A map-style dataset that is not Arrow: its labels can only be seen batch by batch."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)),
            "labels": torch.tensor(self.labels[i]),
        }


class BatchNormNet(torch.nn.Module):
    """BatchNorm over one value per channel: a batch of one example cannot be normalised."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8), torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Linear(8, NUM_LABELS)

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values))


def _data_case(make_trainer):
    def prepare(ws):
        return api(lambda: make_trainer(ws).train())

    return prepare


def _late_nan(ws):
    # example 13 is NaN: the first batches are clean, shuffling decides when it is met
    return _trainer(ws, _images(16, nan_at=13).with_format("torch"), max_steps=8)


def _folder_with_a_non_image(ws, where: str):
    """The material's image folder with one file that is no image ("late"), or with none that is
    one ("every")."""
    folder = ws.root / "images"
    shutil.copytree(ws.material["IMAGES"], folder)
    if where == "every":
        for path in folder.rglob("*.png"):
            path.write_text("not an image")
    else:
        (folder / "7" / "zz-broken.png").write_text("not an image")
    return folder


def _non_image(where: str, *flags):
    def prepare(ws):
        folder = _folder_with_a_non_image(ws, where)
        return cli(
            "train",
            "--model_name_or_path",
            ws.material["VIT"],
            "--train_dir",
            str(folder),
            "--ignore_mismatched_sizes",
            "true",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(ws.out),
            *flags,
        )

    return prepare


DATA_CASES = [
    Case(
        "labels-whole-number-floats",
        _data_case(
            lambda ws: _trainer(ws, _images(labels=[0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0]).with_format("torch"))
        ),
        ValueError,
        "holds whole numbers stored as float",
    ),
    Case(
        "labels-fractional",
        _data_case(lambda ws: _trainer(ws, _images(labels=[0.5] * 8).with_format("torch"))),
        ValueError,
        "labels must be integer class ids 0..C-1",
    ),
    Case(
        "labels-out-of-range-late-arrow",
        _data_case(lambda ws: _trainer(ws, _images(16, labels=[0] * 15 + [9]).with_format("torch"))),
        ValueError,
        "has label 9 at example 15, outside 0..4",
    ),
    Case(
        "labels-out-of-range-late-torch-dataset",
        _data_case(lambda ws: _trainer(ws, TorchImages([0, 1, 2, 3, 4, 0, 1, 7]), per_device_train_batch_size=4)),
        ValueError,
        "has label 7, outside 0..4: the model predicts 5 classes",
    ),
    Case(
        "missing-pixel-values",
        _data_case(lambda ws: _trainer(ws, _images().rename_column("pixel_values", "image").with_format("torch"))),
        ValueError,
        "train_dataset has no 'pixel_values' column, the model's input",
    ),
    Case(
        "batch-norm-batch-of-one",
        _data_case(
            lambda ws: _trainer(
                ws,
                _images(9).with_format("torch"),
                model=BatchNormNet(),
                head_modules=["head"],
                per_device_train_batch_size=4,
            )
        ),
        ValueError,
        "BatchNorm layers cannot train on a batch of 1 example",
    ),
    Case(
        "image-folder-no-image-at-all",
        _non_image("every", "--max_steps", "1"),
        2,
        ".png': the training data holds a file that is not an image; remove or replace it.",
        _no_output,
    ),
    Case(
        "image-folder-non-image-mid-run",
        _non_image("late", "--max_steps", "12", "--train_val_split", "0"),
        2,
        "zz-broken.png': the training data holds a file that is not an image; remove or replace it. Nothing was "
        "written.",
        _no_output,
    ),
    Case(
        "late-nan-in-the-data",
        _data_case(_late_nan),
        FloatingPointError,
        "the training data holds non-finite values (NaN or inf in pixel_values",
    ),
]


# ---- Hub faults -----------------------------------------------------------------------------


def _final_push_500(ws):
    ws.hub.state.refuse_commits = 500
    return cli(
        *ws.train(
            "--max_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "tester/final-500",
            "--hub_strategy",
            "end",
        )
    )


def _run_kept_and_resumable(ws):
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (ws.out / name).is_file(), name
    _complete(ws, "checkpoint-1", "checkpoint-2")


def _checkpoint_pushes_fail(ws):
    """Every checkpoint push fails (503) during training; the pushes after training succeed."""
    ws.hub.state.refuse_commits = 503

    def heal():
        deadline = time.time() + 120
        while "push(es) of checkpoints to the Hub repo" not in ws.log.getvalue() and time.time() < deadline:
            time.sleep(0.01)
        ws.hub.state.refuse_commits = None

    threading.Thread(target=heal, daemon=True).start()
    return cli(
        *ws.train(
            "--max_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "tester/every-save-503",
        )
    )


def _push_401(ws):
    ws.copy_run()
    ws.hub.state.refuse_writes = 401
    return cli("push", str(ws.out), "--repo_id", "tester/refused")


def _push_hangs(ws):
    ws.copy_run()
    ws.hub.state.hang_commits = 8
    os.environ["HF_DEELBO_HUB_TIMEOUT"] = "1"
    ws.state["restore_timeout"] = True
    return cli("push", str(ws.out), "--repo_id", "tester/hanging")


def _restore_timeout(ws):
    from hf_deelbo.hub import set_hub_timeout

    os.environ.pop("HF_DEELBO_HUB_TIMEOUT", None)
    set_hub_timeout()


def _push_bounded(ws):
    """Every commit hangs for 8 s, longer than HF_DEELBO_HUB_TIMEOUT=2: the whole push, retries
    included, must end within the timeout and one of huggingface_hub's back-off pauses (8 s)."""
    ws.copy_run()
    ws.hub.state.hang_commits = 8
    os.environ["HF_DEELBO_HUB_TIMEOUT"] = "2"
    ws.state["restore_timeout"] = True
    run = cli("push", str(ws.out), "--repo_id", "tester/bounded")

    def timed(ws):
        start = time.monotonic()
        result = run(ws)
        ws.state["seconds"] = time.monotonic() - start
        return result

    return timed


def _within_the_bound(ws):
    _restore_timeout(ws)
    ws.hub.state.hang_commits = None
    assert ws.state["seconds"] < 2 + 8 + 5, ws.state["seconds"]


def _repo_creation_refused(ws):
    ws.hub.state.refuse_writes = 500
    return cli(*ws.train("--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "tester/never-created"))


HUB_CASES = [
    # huggingface_hub retries 5xx answers and timeouts with backoff (about 25 s): slow
    Case(
        "final-push-500",
        _final_push_500,
        1,
        "the Hub answered 500",
        _run_kept_and_resumable,
        marks=(pytest.mark.slow,),
    ),
    Case(
        "checkpoint-pushes-fail",
        _checkpoint_pushes_fail,
        1,
        "checkpoint push(es) to the Hub failed",
        lambda ws: _complete(ws, "checkpoint-1", "checkpoint-2"),
        marks=(pytest.mark.slow,),
    ),
    Case("push-401-names-the-token", _push_401, 2, "the Hub refused the token (401): log in with `hf auth login`"),
    Case(
        "push-that-never-answers-times-out",
        _push_hangs,
        2,
        "the Hub did not answer within the timeout",
        _restore_timeout,
        marks=(pytest.mark.slow,),
    ),
    Case("repo-creation-refused", _repo_creation_refused, 1, "Nothing was trained or written yet", _no_output),
    Case(
        "hub-timeout-bounds-the-whole-push",
        _push_bounded,
        2,
        "the Hub did not answer within the timeout (HF_DEELBO_HUB_TIMEOUT=2 s for the whole call, retries included)",
        _within_the_bound,
    ),
]


# ---- signals and faults mid-run -----------------------------------------------------------------


def _sigint_after_two_checkpoints(ws):
    """A real SIGINT, sent once checkpoint-2 is complete, to a run of 300 steps saving every step."""
    marker = ws.out / "checkpoint-2" / MANIFEST_NAME

    def watch():
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.005)
        ws.state["at_signal"] = _snapshot(ws.out / "checkpoint-1", ws.out / "checkpoint-2")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return cli(*ws.train("--max_steps", "300", "--save_strategy", "steps", "--save_steps", "1"))


def _both_checkpoints_remain(ws):
    assert _snapshot(ws.out / "checkpoint-1", ws.out / "checkpoint-2") == ws.state["at_signal"]
    _complete(ws, "checkpoint-1", "checkpoint-2")


class SigintOnSave(TrainerCallback):
    def __init__(self, after: int):
        self.after = after

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.after:
            os.kill(os.getpid(), signal.SIGINT)


def _api_sigint(ws):
    trainer = _trainer(
        ws, image_dataset(16), max_steps=8, save_strategy="steps", save_steps=1, callbacks=[SigintOnSave(2)]
    )
    return api(trainer.train)


class PoisonWeights(TrainerCallback):
    """Makes the weights infinite before the first step this trainer takes."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))


def _diverge_after_resume(ws):
    """A run resumed from checkpoint-2 that diverges at once: the message names that checkpoint."""
    first = _trainer(ws, image_dataset(16), max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    resumed = _trainer(
        ws, image_dataset(16), max_steps=4, save_strategy="steps", save_steps=1, callbacks=[PoisonWeights()]
    )
    run = api(lambda: resumed.train(resume_from_checkpoint=True))

    def named(ws):
        status, text = run(ws)
        return status, text.replace(str(ws.out), "OUT")

    return named


def _diverge_after_a_checkpoint(ws):
    # warmup: the first step has learning rate 0 and is saved; the second has 1e30
    return cli(
        *ws.train(
            "--max_steps",
            "4",
            "--learning_rate",
            "1e30",
            "--lr_scheduler_type",
            "constant_with_warmup",
            "--warmup_steps",
            "1",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--optim",
            "sgd",
        )
    )


def _first_checkpoint_loads(ws):
    from transformers import AutoModelForImageClassification

    _complete(ws, "checkpoint-1")
    model = AutoModelForImageClassification.from_pretrained(ws.out / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (ws.out / "checkpoint-2").exists()


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def _disk_full(ws):
    """A disk with room for the first two checkpoints only: a tmpfs sized from the copied run's
    checkpoints where one can be mounted, else `torch.save` failing with ENOSPC from the third."""
    used = sum(p.stat().st_size for p in (ws.finished_run() / "checkpoint-1").rglob("*") if p.is_file())
    disk = ws.root / "disk"
    if _mount_tmpfs(disk, size_kb=(2 * used + used // 2) // 1024 + 8):
        ws.state["mounted"] = disk
    else:
        disk.mkdir(exist_ok=True)
        real_save, calls = torch.save, []

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and "checkpoint-3" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            calls.append(f)
            return real_save(obj, f, *args, **kwargs)

        ws.state["monkeypatch"] = pytest.MonkeyPatch()
        ws.state["monkeypatch"].setattr(torch, "save", save)
    return cli(*ws.train("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "1", out=disk / "run"))


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


def _disk_full_at_the_optimizer(ws):
    """A real tmpfs with room for two checkpoints and the third one's weights, not its optimizer.pt:
    torch.save fails in its C++ writer (two chained RuntimeErrors)."""
    checkpoint = ws.finished_run() / "checkpoint-1"
    one = sum(_pages(p) for p in checkpoint.iterdir())
    small = sum(
        _pages(p)
        for p in checkpoint.iterdir()
        if p.name not in ("optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json")
    )
    disk = ws.root / "disk"
    if not _mount_tmpfs(disk, size_kb=(2 * one + small) // 1024 + 16):
        pytest.skip("no tmpfs can be mounted here")
    ws.state["mounted"] = disk
    return cli(*ws.train("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "1", out=disk / "run"))


def _full_disk_kept_two(ws):
    out = ws.root / "disk" / "run"
    try:
        assert checkpoint_problem(str(out / "checkpoint-1")) is None
        assert checkpoint_problem(str(out / "checkpoint-2")) is None
        assert (out / "checkpoint-3" / "model.safetensors").is_file()
    finally:
        _unmount(ws)


def _disk_full_then(ws):
    if "monkeypatch" in ws.state:
        ws.state["monkeypatch"].undo()
    out = ws.root / "disk" / "run"
    try:
        assert checkpoint_problem(str(out / "checkpoint-1")) is None
        assert checkpoint_problem(str(out / "checkpoint-2")) is None
        assert checkpoint_problem(str(out / "checkpoint-3")) is not None  # the partial one is not complete
    finally:
        if "mounted" in ws.state:
            copy = ws.root / "copied"
            shutil.copytree(out, copy)
            subprocess.run(["umount", str(ws.state["mounted"])], check=True)
            out = copy
    # the newest complete checkpoint is what a resume picks
    from hf_deelbo.core.checkpoints import newest_complete_checkpoint

    assert Path(newest_complete_checkpoint(str(out))[0]).name == "checkpoint-2"


def _concurrent_runs(ws):
    """A real second `hf-deelbo train` process into the same directory, stopped (SIGSTOP, so its
    files hold still) while this one tries."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [os.path.join(BIN, "hf-deelbo"), *ws.train("--max_steps", "100000")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    ws.state["holder"] = first
    deadline = time.time() + 120
    while not (ws.out / LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    first.send_signal(signal.SIGSTOP)
    return cli(*ws.train("--max_steps", "2", "--overwrite_output_dir", "true"))


def _kill_first(ws):
    first = ws.state["holder"]
    first.kill()
    first.wait()


def _unsynchronised_ranks(ws):
    """torchrun with 2 ranks on a CPU machine, without use_cpu=True (each rank would train alone)."""
    script = Path(__file__).parent / "scripts" / "unsynchronised_ranks.py"

    def run(ws):
        result = subprocess.run(
            [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(ws.out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        return (1 if result.returncode else 0), result.stdout + result.stderr

    return run


def _grid_search_with_a_diverging_run(ws):
    from hf_deelbo import L2SPTrainingArguments
    from hf_deelbo.search import l2sp_grid_search

    dataset = _images(20, labels=[i % 2 for i in range(20)]).with_format("torch")
    args = L2SPTrainingArguments(
        output_dir=str(ws.out),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        optim="sgd",
    )

    def run(ws):
        result = l2sp_grid_search(
            lambda: build_model("resnet")[0],
            dataset,
            [i % 2 for i in range(20)],
            args,
            alphas=[0.0],
            betas=[0.0],
            learning_rates=[1e30, 0.01],
        )
        ws.state["result"] = result
        scores = {run.settings["learning_rate"]: run.score for run in result.runs}
        return 0, f"scores {scores}; chosen {result.best['learning_rate']}"

    return run


SIGNAL_CASES = [
    Case(
        "sigint-after-two-checkpoints",
        _sigint_after_two_checkpoints,
        130,
        "interrupted. Everything written is kept",
        _both_checkpoints_remain,
    ),
    Case(
        "sigint-api-after-two-checkpoints",
        _api_sigint,
        KeyboardInterrupt,
        "",
        lambda ws: _complete(ws, "checkpoint-1", "checkpoint-2"),
    ),
    Case(
        "divergence-after-a-checkpoint", _diverge_after_a_checkpoint, 1, "diverged at step 2", _first_checkpoint_loads
    ),
    Case(
        "divergence-after-resume-names-the-checkpoint",
        _diverge_after_resume,
        FloatingPointError,
        "This run resumed from OUT/checkpoint-2.",
        lambda ws: _complete(ws, "checkpoint-1", "checkpoint-2"),
    ),
    Case("disk-full-while-writing-the-third-checkpoint", _disk_full, 1, "No space left on device", _disk_full_then),
    Case("two-concurrent-runs", _concurrent_runs, 2, "is in use by another run (pid", _kill_first),
    Case(
        "disk-full-while-torch-saves-the-optimizer",
        _disk_full_at_the_optimizer,
        1,
        "No space left on device while writing optimizer.pt",
        _full_disk_kept_two,
    ),
    Case(
        "distributed-but-not-synchronised",
        _unsynchronised_ranks,
        1,
        "This process is one of 2 ranks (WORLD_SIZE=2), but the Trainer trains as 1 process",
        None,
        marks=(pytest.mark.slow,),
    ),
    Case(
        "no-better-than-uniform-warns",
        lambda ws: cli(*ws.train("--max_steps", "2", "--learning_rate", "1e-12", "--logging_steps", "1")),
        0,
        "is no better than predicting every class equally (log C = 1.099, C = 3)",
        lambda ws: (ws.out / "model.safetensors").is_file() or pytest.fail(),
    ),
    Case(
        "grid-search-survives-a-diverging-run",
        _grid_search_with_a_diverging_run,
        0,
        "scores {1e+30: inf, 0.01: ",
        lambda ws: ws.state["result"].best["learning_rate"] == 0.01 or pytest.fail(),
    ),
]

CASES = ARGUMENT_CASES + FILE_CASES + CONFIG_CASES + DATA_CASES + HUB_CASES + SIGNAL_CASES


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(case, marks=case.marks, id=case.id) for case in CASES])
def test_failure_keeps_every_file(case, ws):
    action = case.prepare(ws)
    before = _snapshot(ws.root, ws.material["root"])
    try:
        status, text = action(ws)
        assert status == case.status, text
        assert case.message in text, text
        if isinstance(case.status, int) and case.status and "hf-deelbo" in text:
            assert "Traceback" not in text
        after = _snapshot(ws.root, ws.material["root"])
        rewritable = [
            p for p in before if any(fnmatch.fnmatch(os.path.relpath(p, ws.root), g) for g in case.may_change)
        ]
        removable = [
            p for p in before if any(fnmatch.fnmatch(os.path.relpath(p, ws.root), g) for g in case.may_remove)
        ]
        lost = [p for p in before if p not in after and p not in removable]
        changed = [p for p in before if p in after and after[p] != before[p] and p not in rewritable]
        assert not lost, lost
        assert not changed, changed
    finally:
        if case.then is not None:
            case.then(ws)


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_exact(ws):
    """A real `hf-deelbo train` process killed with SIGKILL after its third checkpoint, resumed with
    --resume (taking over its stale lock): the same weights and config.deelbo as a run never killed."""
    import safetensors.torch

    flags = ("--max_steps", "30", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "5")
    straight = ws.root / "straight"
    assert main(ws.train(*flags, out=straight)) == 0
    killed = ws.out
    run = subprocess.Popen(
        [os.path.join(BIN, "hf-deelbo"), *ws.train(*flags, out=killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 180
    while not (killed / "checkpoint-3" / MANIFEST_NAME).exists() and time.time() < deadline:
        time.sleep(0.005)
    run.kill()
    run.wait()
    assert not (killed / "checkpoint-30").exists() and (killed / LOCK_NAME).exists()
    ws.capsys.readouterr()
    assert main(ws.train(*flags, "--resume", out=killed)) == 0
    assert "Taking over the lock" in ws.log.getvalue()
    a = safetensors.torch.load_file(straight / "model.safetensors")
    b = safetensors.torch.load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    deelbo = [json.loads((d / "config.json").read_text())["deelbo"] for d in (straight, killed)]
    assert deelbo[0] == deelbo[1]


def test_a_label_column_of_another_name_is_checked_and_trains(ws):
    """--label_column_name other than label/labels: the whole column is checked under the name
    `labels` and the run trains (it was refused as having no label column)."""
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    images = [Image.open(p).convert("RGB") for p in sorted(Path(ws.material["IMAGES"]).rglob("*.png"))]
    data = ws.root / "klass"
    data.mkdir()
    features = Features({"img": ImageFeature(), "klass": ClassLabel(names=["a", "b", "c"])})
    Dataset.from_dict({"img": images, "klass": [i % 3 for i in range(len(images))]}, features=features).to_parquet(
        data / "train.parquet"
    )
    argv = [
        "train",
        "--model_name_or_path",
        ws.material["VIT"],
        "--dataset_name",
        str(data),
        "--image_column_name",
        "img",
        "--label_column_name",
        "klass",
        "--ignore_mismatched_sizes",
        "true",
        "--output_dir",
        str(ws.out),
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    assert main(argv) == 0, ws.capsys.readouterr().err[-1500:]
    assert json.loads((ws.out / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}
