"""One run per output directory.

A run holds an exclusive `flock` on `<output_dir>/_hf_deelbo.lock` (which holds its pid, host and
start time) while it trains, saves and pushes. The kernel releases the lock when the process dies,
so a lock file left by a killed run is stale, detected and taken over. The name starts with `_`,
which every push to the Hub ignores (Trainer's and `hf-deelbo push`'s ignore patterns). A process
may lock the same directory again (the command line locks it, then `Trainer.train` does).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket

logger = logging.getLogger(__name__)

LOCK_NAME = "_hf_deelbo.lock"

# realpath of output_dir -> [file descriptor, depth, whether this process created output_dir]
_held: dict[str, list] = {}


class OutputDirectoryInUse(RuntimeError):
    """Another live run holds the output directory."""


def _describe(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that left no details"


def lock_holder(output_dir: str) -> str | None:
    """A description of the live run holding `output_dir` (other than this process), or None."""
    path = os.path.join(output_dir, LOCK_NAME)
    if os.path.realpath(output_dir) in _held or not os.path.isfile(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(fd)
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


def acquire(output_dir: str) -> None:
    """Lock `output_dir` (created if missing) for this process.

    Raises:
        OutputDirectoryInUse: another live run holds it.
    """
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        return
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(fd)
        os.close(fd)
        raise OutputDirectoryInUse(
            f"output_dir {output_dir!r} is in use by another run ({holder}); wait for it to finish, or choose "
            "another output_dir."
        ) from None
    if os.fstat(fd).st_size:
        logger.warning(f"Taking over the lock of {output_dir} left by a run that is gone ({_describe(fd)}).")
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = [fd, 1, created]


def release(output_dir: str) -> None:
    """Undo one `acquire`; the last one removes the lock file (and `output_dir`, if this process
    created it and nothing else was written to it)."""
    key = os.path.realpath(output_dir)
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    fd, _, created = _held.pop(key)
    try:
        os.unlink(os.path.join(output_dir, LOCK_NAME))
    except OSError:
        pass
    os.close(fd)
    if created:
        try:
            os.rmdir(output_dir)  # only if empty
        except OSError:
            pass


class output_dir_lock:
    """Context manager around `acquire` / `release`."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def __enter__(self):
        acquire(self.output_dir)
        return self

    def __exit__(self, *exc):
        release(self.output_dir)
        return False
