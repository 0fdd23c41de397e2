"""One run per output directory.

A run holds an exclusive `flock` on `<output_dir>/_hf_deelbo.lock` (which holds its pid, host and
start time) while it trains, saves and pushes. The kernel releases the lock when the process dies,
so a lock file left by a killed run is stale, detected and taken over. The name starts with `_`,
which every push to the Hub ignores (Trainer's and `hf-deelbo push`'s ignore patterns). A process
may lock the same directory again (the command line locks it, then `Trainer.train` does).

The lock file is opened without following a link, and must be a regular file with one name: a
symbolic link, a hard link to another file, a folder or a pipe planted under its name is refused
(`OutputDirectoryUnusable`), so that nothing outside the run is ever written through it. While a
run holds the directory, what it writes is recorded (`run_files.py`), for `--overwrite_output_dir`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import stat

from . import run_files

logger = logging.getLogger(__name__)

LOCK_NAME = "_hf_deelbo.lock"

# realpath of output_dir -> [file descriptor, depth, whether this process created output_dir, its listing then]
_held: dict[str, list] = {}


class OutputDirectoryError(RuntimeError):
    """The output directory cannot be used by this run (reported as one line)."""


class OutputDirectoryInUse(OutputDirectoryError):
    """Another live run holds the output directory."""


class OutputDirectoryUnusable(OutputDirectoryError):
    """The lock's path holds something this package does not write through (a link, a folder)."""


def _unusable(path: str, what: str) -> OutputDirectoryUnusable:
    return OutputDirectoryUnusable(
        f"{path} is {what}, not the lock file hf_deelbo writes there; it never writes through it. Remove it "
        f"(rm {'-r ' if what == 'a folder' else ''}{path!r}) or choose another output_dir."
    )


def check_lock_path(output_dir: str) -> None:
    """Refuse a lock path holding anything but a regular file with one name (before any work)."""
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:  # e.g. output_dir is a file
        raise _unusable(path, f"unreachable ({error.strerror})") from None
    _check_lock_stat(path, info)


def _check_lock_stat(path: str, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise _unusable(path, "a symbolic link")
    if stat.S_ISDIR(info.st_mode):
        raise _unusable(path, "a folder")
    if not stat.S_ISREG(info.st_mode):
        raise _unusable(path, "not a regular file")
    if info.st_nlink > 1:
        raise _unusable(path, f"a hard link ({info.st_nlink} names for one file)")


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
    if os.path.realpath(output_dir) in _held or os.path.islink(path) or not os.path.isfile(path):
        return None
    fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
    try:
        _lock_without_waiting(fd)
    except BlockingIOError:
        return _describe(fd)
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


def _lock_without_waiting(fd: int) -> None:
    """An exclusive lock on the open file `fd`, released by the kernel when the process ends;
    BlockingIOError when another process holds it. POSIX: `flock`; Windows: `msvcrt.locking` of
    the first byte. (filelock is not used: the lock file must be opened without following a link,
    checked to be a regular file and hold the holder's details, which its API does not expose.)"""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError("locked by another process") from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# O_NOFOLLOW: a link planted under the lock's name fails to open; O_NONBLOCK: so does a pipe, at once.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _open_lock(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644)
    except OSError as error:
        check_lock_path(os.path.dirname(path))  # names a link or a folder
        raise OutputDirectoryUnusable(
            f"{path} cannot be created ({error.strerror}); choose another output_dir."
        ) from None
    try:
        _check_lock_stat(path, os.fstat(fd))
    except OutputDirectoryUnusable:
        os.close(fd)
        raise
    return fd


def acquire(output_dir: str, created: bool | None = None) -> None:
    """Lock `output_dir` (created if missing) for this process. `created`: whether this run created
    the directory (default: whether it is missing now); the last `release` removes a directory the
    run created and wrote nothing to.

    Raises:
        OutputDirectoryInUse: another live run holds it.
        OutputDirectoryUnusable: its lock path holds a link, a folder or another non-file.
    """
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        return
    created = not os.path.isdir(output_dir) if created is None else created
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = _open_lock(path)
    try:
        _lock_without_waiting(fd)
    except BlockingIOError:
        holder = _describe(fd)
        os.close(fd)
        raise OutputDirectoryInUse(
            f"output_dir {output_dir!r} is in use by another run ({holder}); wait for it to finish, or choose "
            "another output_dir."
        ) from None
    if os.fstat(fd).st_size:
        logger.warning(f"Taking over the lock of {output_dir} left by a run that is gone ({_describe(fd)}).")
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = [fd, 1, created, run_files.listing(output_dir)]


def record_writes(output_dir: str) -> None:
    """Record what this process wrote into `output_dir` since it acquired it (`run_files.py`)."""
    held = _held.get(os.path.realpath(output_dir))
    if held is not None:
        run_files.record(output_dir, held[3])


def release(output_dir: str, remove_if_created: bool = True) -> None:
    """Undo one `acquire`; the last one removes the lock file (and `output_dir`, if this process
    created it, nothing else was written to it and `remove_if_created`)."""
    key = os.path.realpath(output_dir)
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    fd, _, created, before = _held.pop(key)
    try:
        run_files.record(output_dir, before)
    except OSError as error:  # a full disk: the files stay, unrecorded (an overwrite will name them)
        logger.warning(f"Could not record the files this run wrote in {output_dir} ({error}).")
    try:
        os.unlink(os.path.join(output_dir, LOCK_NAME))
    except OSError:
        pass
    os.close(fd)
    if created and remove_if_created:
        try:
            os.rmdir(output_dir)  # only if empty
        except OSError:
            pass


class holding:
    """Context manager around `acquire` / `release`; `enabled=False` does nothing (other ranks)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir, self.enabled = output_dir, enabled

    def __enter__(self):
        if self.enabled:
            acquire(self.output_dir)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            release(self.output_dir)
        return False
