"""The output-directory policy, in one place for the command line and every trainer: what a run
may start in, which checkpoint a resume continues from, what `--overwrite_output_dir` removes, and
what a failed run leaves.

- A directory holding files is refused unless the run resumes it or overwrites it.
- Overwriting removes only what earlier runs of this package recorded writing (`run_files.py`);
  a directory holding anything else (a `.git`, a user's file, a link) is refused, naming it.
- A resume continues from the newest complete checkpoint (`checkpoints.py`), naming the newer
  ones it skipped and why.
- Nothing a run wrote is removed when it fails.
"""

from __future__ import annotations

import os

from . import lock, run_files
from .checkpoints import checkpoint_problem, complete_checkpoints, newest_complete_checkpoint


class OutputDirectoryRefused(lock.OutputDirectoryError, ValueError):
    """The output directory, or the checkpoint to resume from, cannot be used as asked."""


# How the command line and the Python API spell the same request, for the messages.
SPELLINGS = {
    "cli": {
        "newest": "--resume",
        "path": "--resume_from_checkpoint",
        "output_dir": "--output_dir",
        "overwrite": "--overwrite_output_dir",
    },
    "api": {
        "newest": "resume_from_checkpoint=True",
        "path": "resume_from_checkpoint",
        "output_dir": "output_dir",
        "overwrite": "overwrite_output_dir",
    },
}


def process_requirements() -> dict:
    """What a checkpoint must hold for this process, read from the launcher's environment (torchrun
    sets WORLD_SIZE and RANK): its own RNG state file among those of every rank."""
    return dict(
        num_processes=int(os.environ.get("WORLD_SIZE", "1") or 1), process_index=int(os.environ.get("RANK", "0") or 0)
    )


def resume_checkpoint(
    output_dir: str, resume_from_checkpoint, spelling: str = "api", skipped_log=None, **requirements
) -> str | None:
    """The checkpoint a run resumes from: None when it does not resume; for `True`, the newest
    complete one of `output_dir` (each newer one skipped goes to `skipped_log(name, why)`); a path
    only if it is complete. `requirements` go to `checkpoint_problem`.

    Raises:
        OutputDirectoryRefused: nothing complete to resume from, naming each checkpoint and why.
    """
    words = SPELLINGS[spelling]
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoint, skipped = newest_complete_checkpoint(output_dir, **requirements)
        for name, why in skipped if skipped_log is not None else ():
            skipped_log(name, why)
        if checkpoint is None:
            found = "; ".join(f"{name}: {why}" for name, why in skipped) or "no checkpoint-<step> directory"
            raise OutputDirectoryRefused(
                f"{words['newest']}: {words['output_dir']} {output_dir!r} holds no complete checkpoint to resume from "
                f"({found}); start a new run without {words['newest']}, or pass a checkpoint directory as "
                f"{words['path']}."
            )
        return checkpoint
    checkpoint = str(resume_from_checkpoint)
    if not os.path.isdir(checkpoint):
        raise OutputDirectoryRefused(
            f"{words['path']} {checkpoint!r} is not a directory; pass a checkpoint-<step> directory, or "
            f"{words['newest']} for the newest complete checkpoint of {words['output_dir']}."
        )
    problem = checkpoint_problem(checkpoint, **requirements)
    if problem:
        raise OutputDirectoryRefused(
            f"{words['path']} {checkpoint!r} cannot be resumed from exactly: {problem}. Pass {words['newest']} for "
            f"the newest complete checkpoint of {words['output_dir']}."
        )
    return checkpoint


def check_output_dir(
    output_dir: str,
    resume_from_checkpoint=None,
    overwrite: bool = False,
    spelling: str = "cli",
    main_process: bool = True,
) -> bool:
    """Before any work: refuse an output directory another live run holds, one whose lock path is
    planted (a link, a folder), one holding another run's files (unless resumed or overwritten),
    one holding anything no run of ours wrote when it would be overwritten, and a resume with
    nothing to resume from. Returns whether `output_dir` exists already."""
    words = SPELLINGS[spelling]
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirectoryRefused(
            f"{words['output_dir']} {output_dir!r} is a file, not a directory; choose another {words['output_dir']}."
        )
    parent = _existing_parent(output_dir)
    if parent is not None and not os.path.isdir(parent):
        raise OutputDirectoryRefused(
            f"{words['output_dir']} {output_dir!r} lies under {parent!r}, which is a file; "
            f"choose another {words['output_dir']}."
        )
    if parent is not None and not os.access(parent, os.W_OK):
        raise OutputDirectoryRefused(
            f"{words['output_dir']} {output_dir!r} cannot be written ({parent!r} is "
            f"read-only for this user); choose another {words['output_dir']}."
        )
    if not os.path.isdir(output_dir):
        resume_checkpoint(output_dir, resume_from_checkpoint, spelling, **process_requirements())
        return False
    if not os.access(output_dir, os.W_OK):
        raise OutputDirectoryRefused(
            f"{words['output_dir']} {output_dir!r} cannot be written (read-only for this user "
            f"or on a read-only filesystem); choose another {words['output_dir']}."
        )
    if main_process:
        lock.check_lock_path(output_dir)
        holder = lock.lock_holder(output_dir)
        if holder is not None:
            raise lock.OutputDirectoryInUse(
                f"{words['output_dir']} {output_dir!r} is in use by another run ({holder}); wait for it to finish, or "
                f"choose another {words['output_dir']}."
            )
    resume_checkpoint(output_dir, resume_from_checkpoint, spelling, **process_requirements())
    if not holds_files(output_dir) or resume_from_checkpoint:
        return True
    if not overwrite:
        has_checkpoints = any(name.startswith("checkpoint-") for name in os.listdir(output_dir))
        raise OutputDirectoryRefused(
            f"{words['output_dir']} {output_dir!r} already holds files from another run; "
            + (
                f"pass {words['newest']} to continue it from its newest complete checkpoint, "
                if has_checkpoints
                else ""
            )
            + f"pass {words['overwrite']} to replace them, or choose another {words['output_dir']}."
        )
    check_overwritable(output_dir, spelling)
    return True


def _existing_parent(path: str) -> str | None:
    """The nearest existing ancestor of a path that does not exist (None if `path` exists)."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def holds_files(output_dir: str) -> bool:
    """Whether `output_dir` holds anything beyond the package's bookkeeping (lock, run record)."""
    return os.path.isdir(output_dir) and bool(set(os.listdir(output_dir)) - {lock.LOCK_NAME, run_files.RUN_FILES_NAME})


def check_overwritable(output_dir: str, spelling: str = "cli") -> None:
    """Refuse to overwrite a directory holding anything no run of this package recorded writing."""
    foreign = run_files.foreign_entries(output_dir)
    if foreign:
        words = SPELLINGS[spelling]
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise OutputDirectoryRefused(
            f"{words['overwrite']} replaces only what earlier hf_deelbo runs wrote, but {words['output_dir']} "
            f"{output_dir!r} also holds {shown}, which no run wrote; nothing was removed. Move those away, or choose "
            f"another {words['output_dir']}."
        )


def clear_previous_run(output_dir: str, spelling: str = "cli") -> int:
    """`--overwrite_output_dir`, under the lock: remove what earlier runs recorded writing (checked
    again: the directory may have changed since the check before any work); returns how many files."""
    check_overwritable(output_dir, spelling)
    return run_files.remove_recorded(output_dir)


def kept(output_dir: str) -> str:
    """What a failed run leaves, in one sentence."""
    if not holds_files(output_dir):
        return "Nothing was written."
    complete = complete_checkpoints(output_dir)
    if complete:
        return (
            f"Everything written is kept in {output_dir}, with the complete checkpoints {', '.join(complete)}; "
            "continue with the same command and --resume."
        )
    return f"Everything written is kept in {output_dir} (no complete checkpoint)."
