"""What runs wrote into an output directory, so that `--overwrite_output_dir` removes that and
nothing else.

`RUN_FILES_NAME` lists every file (relative path) that runs of this package wrote into the output
directory. The lock (`lock.py`) takes a listing of the directory when a run acquires it and adds
to the record every file that is new or changed when it records (after each checkpoint, and when
the run releases the directory). A file a user puts there, before or after the run, is not in the
record (one created inside the directory while a run holds it is taken for the run's).

Removal never follows a link: a symbolic link is an entry of its own (removed only if recorded,
and then the link, not its target), and nothing outside the output directory is ever reached.
"""

from __future__ import annotations

import json
import os
import stat

RUN_FILES_NAME = "_hf_deelbo_files.json"
# Files of the package's own bookkeeping, never listed, never counted as another's.
_BOOKKEEPING = ("_hf_deelbo.lock", RUN_FILES_NAME, f".{RUN_FILES_NAME}.tmp")


def listing(output_dir: str) -> dict[str, tuple[int, int, int]]:
    """{relative path: (inode, size, mtime in ns)} of every entry under `output_dir` that is not a
    directory (files, symbolic links, anything else); links to directories are entries, not followed."""
    entries = {}
    if not os.path.isdir(output_dir) or os.path.islink(output_dir):
        return entries
    for root, dirs, names in os.walk(output_dir):
        for name in [*names, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, output_dir)
            if relative in _BOOKKEEPING:
                continue
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed while listed
                continue
            entries[relative] = (info.st_ino, info.st_size, info.st_mtime_ns)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return entries


def recorded(output_dir: str) -> set[str]:
    """The files the record lists (empty if there is none, or it is not a regular file or not JSON)."""
    path = os.path.join(output_dir, RUN_FILES_NAME)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return set()
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def record(output_dir: str, before: dict[str, tuple[int, int, int]]) -> None:
    """Add to the record every entry of `output_dir` new or changed since the listing `before`
    (recorded files that are gone leave it then). Written to a temporary file, then renamed."""
    now = listing(output_dir)
    written = {name for name, info in now.items() if before.get(name) != info}
    if not written:  # a run that wrote nothing leaves the record as it was, byte for byte
        return
    files = sorted((recorded(output_dir) & now.keys()) | written)
    temporary = os.path.join(output_dir, f".{RUN_FILES_NAME}.tmp")
    if os.path.lexists(temporary):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"files": files}, f, indent=1)
    os.replace(temporary, os.path.join(output_dir, RUN_FILES_NAME))


def foreign_entries(output_dir: str) -> list[str]:
    """The top-level names of `output_dir` that hold anything no run recorded (files, links, empty
    folders), sorted; a folder is named with a trailing `/`."""
    if not os.path.isdir(output_dir):
        return []
    ours = recorded(output_dir)
    foreign = set()
    for relative in listing(output_dir):
        if relative not in ours:
            foreign.add(_top(output_dir, relative))
    for root, dirs, names in os.walk(output_dir):
        if not dirs and not names and root != output_dir:  # an empty folder nobody's run left
            relative = os.path.relpath(root, output_dir)
            if not any(name.startswith(relative + os.sep) for name in ours):
                foreign.add(_top(output_dir, relative))
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return sorted(foreign)


def _top(output_dir: str, relative: str) -> str:
    top = relative.split(os.sep, 1)[0]
    full = os.path.join(output_dir, top)
    return top + "/" if os.path.isdir(full) and not os.path.islink(full) else top


def remove_recorded(output_dir: str) -> int:
    """Remove every recorded file of `output_dir` (a link itself, never its target), then the
    folders that held them once empty, then the record; returns how many files went. Only
    entries found inside `output_dir` without following a link are touched."""
    ours = recorded(output_dir)
    present = listing(output_dir)
    removed = 0
    for relative in sorted(ours & present.keys()):
        os.unlink(os.path.join(output_dir, relative))
        removed += 1
    folders = {os.path.dirname(relative) for relative in ours & present.keys()} - {""}
    for folder in sorted(folders | {p for f in folders for p in _parents(f)}, key=len, reverse=True):
        path = os.path.join(output_dir, folder)
        if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
            os.rmdir(path)
    if os.path.lexists(os.path.join(output_dir, RUN_FILES_NAME)):
        os.unlink(os.path.join(output_dir, RUN_FILES_NAME))
    return removed


def _parents(relative: str) -> list[str]:
    parts = relative.split(os.sep)
    return [os.sep.join(parts[:i]) for i in range(1, len(parts))]
