"""Checkpoints that can be trusted: what makes one complete, a marker written once it is, and the
newest complete one to resume from.

Trainer writes a checkpoint file by file into `checkpoint-<step>/`; a run killed or out of disk
space halfway leaves a directory that `get_last_checkpoint` would pick. A checkpoint is complete
when every file an exact resume reads is present and readable (without unpickling anything):

- the weights: `model.safetensors` (or its sharded index and every shard; a PEFT model's
  `adapter_model.safetensors`), header and size intact;
- `trainer_state.json`, valid JSON, holding the state of every stateful callback of the trainer;
- `optimizer.pt`, `scheduler.pt` and this process's RNG state (`rng_state.pth`, or
  `rng_state_<rank>.pth` when several processes train), each an intact torch archive (its zip
  directory and CRCs are checked; nothing is loaded).

After the last file, `FineTuningTrainer` writes `MANIFEST_NAME` (each file's size and SHA-256) by
write then rename; where a checkpoint has one, every file must still have its recorded size and,
when a resume chooses it (`verify=True`), its recorded hash: a flipped byte is found. A chosen
checkpoint must also be sound: every floating-point tensor of its safetensors files (the weights,
a diagonal posterior's ρ) and every number of the method's state in `trainer_state.json` finite.
The time the hashes take is logged (about 1 s per GB read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zipfile

from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from .adapters import ADAPTER_SAFE_WEIGHTS_NAME

MANIFEST_NAME = "checkpoint_complete.json"

logger = logging.getLogger(__name__)

# (checkpoint's real path, its manifest's inode and mtime) of the checkpoints whose hashes and
# values were verified in this process: a resume checked by the command line is not read twice.
_verified: set[tuple] = set()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: str) -> None:
    """Mark `checkpoint` complete: the size of every file in it, written to a temporary file
    that is then renamed (a half-written marker never exists under its name)."""
    files = {}
    for root, _, names in os.walk(checkpoint):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, checkpoint)
            if relative != MANIFEST_NAME:
                files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    temporary = os.path.join(checkpoint, f".{MANIFEST_NAME}.tmp")
    with open(temporary, "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(checkpoint, MANIFEST_NAME))


def _torch_archive_problem(path: str, name: str) -> str | None:
    if not os.path.isfile(path):
        return f"{name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return f"{name} is corrupt (a CRC check failed)"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{name} is truncated or corrupt ({error})"
    return None


def _safetensors_problem(path: str, name: str) -> str | None:
    from safetensors import safe_open

    if not os.path.isfile(path):
        return f"{name} is missing"
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for any bad file
        return f"{name} is truncated or corrupt ({str(error).splitlines()[0]})"
    return None


def _weights_problem(checkpoint: str) -> str | None:
    index = os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{SAFE_WEIGHTS_INDEX_NAME} is unreadable ({error})"
        for shard in shards:
            problem = _safetensors_problem(os.path.join(checkpoint, shard), shard)
            if problem:
                return problem
        return None
    if not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)) and os.path.isfile(
        os.path.join(checkpoint, ADAPTER_SAFE_WEIGHTS_NAME)
    ):  # a PEFT model's checkpoint holds its adapter only
        return _safetensors_problem(os.path.join(checkpoint, ADAPTER_SAFE_WEIGHTS_NAME), ADAPTER_SAFE_WEIGHTS_NAME)
    if not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)) and os.path.isfile(
        os.path.join(checkpoint, WEIGHTS_NAME)
    ):
        return f"it holds {WEIGHTS_NAME} (a pickle, which is never loaded) instead of {SAFE_WEIGHTS_NAME}"
    return _safetensors_problem(os.path.join(checkpoint, SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME)


def _manifest_problem(checkpoint: str) -> tuple[dict, str | None]:
    """(the manifest's files, why they do not match the directory's, or None); no manifest: ({}, None)."""
    manifest = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return {}, None
    try:
        with open(manifest) as f:
            recorded = json.load(f)["files"]
        if not isinstance(recorded, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {}, f"{MANIFEST_NAME} is unreadable ({error})"
    for name, entry in recorded.items():
        size = entry.get("size") if isinstance(entry, dict) else entry  # older manifests: sizes only
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return recorded, f"{name} is missing"
        if os.path.getsize(path) != size:
            return (
                recorded,
                f"{name} has {os.path.getsize(path)} bytes, {size} when it was saved (truncated or overwritten)",
            )
    return recorded, None


def checkpoint_problem(
    checkpoint: str,
    callback_names: tuple[str, ...] = (),
    num_processes: int = 1,
    process_index: int = 0,
    verify: bool = True,
) -> str | None:
    """Why `checkpoint` cannot be resumed from exactly (naming the missing or corrupt file), or
    None when it is complete. `callback_names`: the stateful callbacks whose state it must hold;
    `num_processes`: how many processes resume it (each needs its RNG state; every rank checks all
    of them, so that all ranks pick the same checkpoint). `process_index` is accepted and unused.
    `verify`: also compare the files' hashes with the manifest's and check that the checkpoint's
    tensors and the callbacks' numbers are finite (reads every file; without it, sizes only)."""
    if not os.path.isdir(checkpoint):
        return "it is not a directory"
    problem = _weights_problem(checkpoint)
    if problem:
        return problem
    state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(state_file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("no global_step")
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} is truncated or corrupt ({str(error).splitlines()[0]})"
    saved_callbacks = state.get("stateful_callbacks") or {}
    for name in callback_names:
        if name not in saved_callbacks:
            return f"{TRAINER_STATE_NAME} holds no state of {name}"
    rng_names = [rng_state_name(num_processes, rank) for rank in range(max(num_processes, 1))]
    for name in (OPTIMIZER_NAME, SCHEDULER_NAME, *rng_names):
        problem = _torch_archive_problem(os.path.join(checkpoint, name), name)
        if problem and name in rng_names and not os.path.isfile(os.path.join(checkpoint, name)):
            return problem + _written_by(checkpoint, num_processes)
        if problem:
            return problem
    recorded, problem = _manifest_problem(checkpoint)
    if problem:
        return problem
    if not verify:
        return None
    key = _verification_key(checkpoint)
    if key in _verified:
        return None
    problem = _hash_problem(checkpoint, recorded) or _nonfinite_problem(checkpoint, saved_callbacks, callback_names)
    if problem is None and key is not None:
        _verified.add(key)
    return problem


def _verification_key(checkpoint: str) -> tuple | None:
    try:
        info = os.stat(os.path.join(checkpoint, MANIFEST_NAME))
    except OSError:
        return None  # without a manifest, verified at every resume
    return os.path.realpath(checkpoint), info.st_ino, info.st_mtime_ns


def _hash_problem(checkpoint: str, recorded: dict) -> str | None:
    """The first file whose SHA-256 differs from the manifest's; the time taken is logged."""
    start, read = time.perf_counter(), 0
    for name, entry in recorded.items():
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        path = os.path.join(checkpoint, name)
        read += os.path.getsize(path)
        if _sha256(path) != entry["sha256"]:
            return f"{name} is not what was saved (its SHA-256 differs from {MANIFEST_NAME}'s: changed or corrupted on disk)"
    if read:
        logger.info(
            f"{os.path.basename(checkpoint)}: {len(recorded)} files ({read / 1e6:.1f} MB) match their recorded "
            f"SHA-256 (checked in {time.perf_counter() - start:.2f} s)."
        )
    return None


def _nonfinite_problem(checkpoint: str, saved_callbacks: dict, callback_names: tuple[str, ...]) -> str | None:
    """The first non-finite tensor of the checkpoint's safetensors files, or non-number or
    non-finite value of the callbacks' state."""
    import torch
    from safetensors import safe_open

    for name in sorted(n for n in os.listdir(checkpoint) if n.endswith(".safetensors")):
        with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"{name} holds non-finite values ({key}): it cannot be resumed from"
    for callback in callback_names:
        attributes = (saved_callbacks.get(callback) or {}).get("attributes") or {}
        for attribute, value in attributes.items():
            if isinstance(value, str) or not _all_finite(value):
                return f"{TRAINER_STATE_NAME} holds {callback}.{attribute} = {str(value)[:60]!r}, not finite numbers"
    return None


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


def rng_state_name(num_processes: int, rank: int) -> str:
    """Trainer's RNG state file of `rank` in a run of `num_processes` processes."""
    return "rng_state.pth" if num_processes <= 1 else f"rng_state_{rank}.pth"


def _saved_by(checkpoint: str) -> int:
    """How many processes wrote `checkpoint`, read from its RNG state files (0: none found)."""
    names = os.listdir(checkpoint)
    ranks = [n for n in names if n.startswith("rng_state_") and n.endswith(".pth")]
    return len(ranks) if ranks else int("rng_state.pth" in names)


def _written_by(checkpoint: str, num_processes: int) -> str:
    saved = _saved_by(checkpoint)
    if saved and saved != max(num_processes, 1):
        return (
            f" (it was written by {saved} process{'es' if saved > 1 else ''} and is resumed by "
            f"{max(num_processes, 1)}: resume with as many, e.g. torchrun --nproc_per_node {saved})"
        )
    return ""


def newest_complete_checkpoint(output_dir: str, **requirements) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete `checkpoint-<step>` in `output_dir` or None, [(skipped name, why)])
    newest first. `requirements` go to `checkpoint_problem`."""
    if not os.path.isdir(output_dir):
        return None, []
    skipped = []
    for checkpoint in reversed(sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR)):
        problem = checkpoint_problem(checkpoint, **requirements)
        if problem is None:
            return checkpoint, skipped
        skipped.append((os.path.basename(checkpoint), problem))
    return None, skipped


def complete_checkpoints(output_dir: str) -> list[str]:
    """Names of the checkpoints in `output_dir` that look complete (weights and trainer state
    readable, optimizer, scheduler, RNG state intact), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    return [
        os.path.basename(c)
        for c in sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR)
        if os.path.isdir(c) and checkpoint_problem(c, num_processes=max(_saved_by(c), 1), verify=False) is None
    ]
