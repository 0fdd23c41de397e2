"""The `hf-deelbo` command.

    hf-deelbo train      fine-tune with DE ELBO (no model/dataset: the embedded digits task, offline)
    hf-deelbo evaluate   accuracy, NLL and ECE of a saved model, at the posterior mean or with --bma_samples
    hf-deelbo push       upload an output directory to the Hub
    hf-deelbo show       print the learned hyperparameters of a local directory or Hub repo
    hf-deelbo --version  print the version

`train` takes the flags of transformers' run_image_classification.py where they overlap
(--model_name_or_path, --dataset_name, --train_dir, --validation_dir, --image_column_name,
--label_column_name, --max_train_samples, --ignore_mismatched_sizes, ...), every
DEELBoTrainingArguments / TrainingArguments flag, and --config_file (JSON or YAML)."""

from __future__ import annotations

import logging
import os
import sys

from . import evaluate, push, show, train
from .common import RunFailed, UsageError

logger = logging.getLogger("hf_deelbo")

COMMANDS = {"train": train.main, "evaluate": evaluate.main, "push": push.main, "show": show.main}


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. A reader that closes the pipe early (`| head`)
    ends it quietly."""
    try:
        status = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's own advice (docs, "Note on SIGPIPE"): point stdout at devnull so that the flush
        # at exit does not raise again, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    return status


def _usage() -> str:
    return __doc__.strip().split("\n\n")[0] + "\n\n" + "\n".join(__doc__.strip().split("\n\n")[1:2])


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"hf-deelbo {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr)
        if argv:
            print(
                f"\nhf-deelbo: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}.",
                file=sys.stderr,
            )
        return 2
    # Other libraries' INFO lines (timm's "Loading pretrained weights from ...") are noise here.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)  # hf_deelbo's logger follows transformers' verbosity (warnings) otherwise
    try:
        return COMMANDS[argv[0]](argv[1:])
    except BaseException as error:  # noqa: BLE001 - what `_reported` does not know is raised again
        reported = _reported(error)
        if reported is None:
            raise
        message, status = reported
        print(f"hf-deelbo {argv[0]}: error: {message}", file=sys.stderr)
        return status


def _reported(error: BaseException) -> tuple[str, int] | None:
    """The one line and the exit status a command's error is reported with; None for an error
    that keeps its traceback."""
    from ..core.lock import OutputDirectoryError
    from ..core.preemption import TrainingPreempted
    from ..hub.push import HubPushError

    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, (UsageError, OutputDirectoryError)):
        return str(error), 2
    if isinstance(error, RunFailed):
        return str(error), error.status
    if isinstance(error, (HubPushError, FloatingPointError)):
        return first_line, 1
    if isinstance(error, TrainingPreempted):
        return f"{error}. Nothing was written.", error.exit_status
    if isinstance(error, KeyboardInterrupt):
        return "interrupted.", 130
    if isinstance(error, ValueError):  # argument and data validation (arguments, trainer, datasets)
        return first_line, 2
    return None


if __name__ == "__main__":
    sys.exit(main())
