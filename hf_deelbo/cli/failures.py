"""How `hf-deelbo train` reports a run that failed after it started: one line with the exit status
the error calls for, and what the output directory kept (`run_failure`)."""

from __future__ import annotations

import os
import pickle
import shutil
import sys

import PIL

from ..core import output_dir as output_dir_policy
from .common import RunFailed, UsageError


def run_failure(error: BaseException, output_dir: str) -> Exception | None:
    """The one-line report of a run that failed after it started, or None for an unexpected error
    (raised as it is, with its traceback, after saying what was kept)."""
    from ..core.lock import OutputDirectoryError
    from ..core.preemption import TrainingPreempted, signal_name
    from ..hub.push import HubPushError

    kept = output_dir_policy.kept(output_dir)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        return RunFailed(f"interrupted. {kept}", 130)
    if isinstance(error, TrainingPreempted):
        where = f" after step {os.path.basename(error.checkpoint).split('-')[-1]}" if error.checkpoint else ""
        return RunFailed(f"stopped by {signal_name(error.signal_number)}{where}. {kept}", error.exit_status)
    if isinstance(error, PIL.UnidentifiedImageError):  # data found invalid mid-run
        return RunFailed(f"{not_an_image(error)} {kept}", 2)
    if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a checkpoint file
        return RunFailed(
            f"{_unpickled_file(error)} holds more than tensors, which is never unpickled "
            f"({first_line[:200]}); resume from another checkpoint. {kept}"
        )
    if isinstance(error, (UsageError, OutputDirectoryError)):
        return UsageError(f"{first_line} {kept}")
    if isinstance(error, ValueError):  # data found invalid mid-run
        return RunFailed(f"{first_line} {kept}", 2)
    if isinstance(error, (FloatingPointError, HubPushError)):
        return RunFailed(f"{first_line} {kept}")
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return RunFailed(f"{type(error).__name__}: {error.strerror or first_line}{where}. {kept}")
    if isinstance(error, RuntimeError) and _torch_file(error, "save") is not None:  # torch.save's writer failed
        free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else 0
        cause = "No space left on device" if free < 1 << 20 else f"the write failed ({first_line[:120]})"
        return RunFailed(f"{cause} while writing {_torch_file(error, 'save')} ({free:,} bytes free). {kept}")
    if "No space left on device" in str(error) or "StorageFull" in str(error):  # safetensors' own error type
        return RunFailed(f"No space left on device ({type(error).__name__}). {kept}")
    print(f"hf-deelbo train: {kept}", file=sys.stderr)
    return None


def not_an_image(error: Exception) -> str:
    return f"{str(error).splitlines()[0]}: the training data holds a file that is not an image; remove or replace it."


def _torch_file(error: BaseException, function: str) -> str | None:
    """The name of the file whose `torch.<function>` (load or save) raised `error` or the error it
    was raised while handling, read from the traceback's frames; None if torch did not raise it."""
    name, seen = None, set()
    while error is not None and id(error) not in seen and name is None:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == function and code.co_filename.endswith("serialization.py"):
                name = os.path.basename(str(tb.tb_frame.f_locals.get("f", ""))) or name
            tb = tb.tb_next
        error = error.__context__
    return name


def _unpickled_file(error: BaseException) -> str:
    """The name of the file whose `torch.load` raised `error`."""
    return _torch_file(error, "load") or "A checkpoint file"
