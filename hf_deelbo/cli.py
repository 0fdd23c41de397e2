"""The `hf-deelbo` command.

    hf-deelbo train      fine-tune with DE ELBO (no model/dataset: the embedded digits task, offline)
    hf-deelbo evaluate   accuracy, NLL and ECE of a saved model, at the posterior mean or with --bma_samples
    hf-deelbo push       upload an output directory to the Hub
    hf-deelbo show       print the learned hyperparameters of a local directory or Hub repo

`train` takes the flags of transformers' run_image_classification.py where they overlap
(--model_name_or_path, --dataset_name, --train_dir, --validation_dir, --image_column_name,
--label_column_name, --max_train_samples, --ignore_mismatched_sizes, ...), every
DEELBoTrainingArguments / TrainingArguments flag, and --config_file (JSON or YAML).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("hf_deelbo")

# The embedded default: fine-tune a backbone pretrained on digits 0–4 on 100 images of 5–9, with
# the paper's optimizer recipe, scaled to a run of a few minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = {
    "output_dir": "deelbo-digits",
    "max_steps": 150,
    "learning_rate": 0.03,
    "optim": "sgd",
    "optim_args": "momentum=0.9,nesterov=True",
    "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_pin_memory": False,  # a CPU-sized demo: pinning only warns there
}
EMBEDDED_MAX_TRAIN_SAMPLES = 100
EMBEDDED_TEST_FRACTION = 0.3  # of digits 5-9, held out for evaluation
# run_image_classification.py's default model, used when a dataset is given without a model.
DEFAULT_HUB_MODEL = "google/vit-base-patch16-224-in21k"


@dataclass
class ModelArguments:
    """Which model to fine-tune (names as in run_image_classification.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub model id or local directory (transformers or timm format). Default: with a dataset, "
            f"{DEFAULT_HUB_MODEL} (as run_image_classification.py); without one, the embedded backbone "
            "pretrained on digits 0-4."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models and datasets downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or path, if not the model's."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one from `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom models defined on the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise the head when the checkpoint's number of labels differs."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to fine-tune on (names as in run_image_classification.py)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id. Default: scikit-learn's digits 5-9."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder with the training data (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder with the validation data."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction held out for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep this many training examples (stratified). Embedded default: 100."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many evaluation examples."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be an int >= 1 (omit it to keep every example); got {value}")
        if not (0 <= self.train_val_split < 1):
            raise ValueError(f"--train_val_split must be in [0, 1) (0 holds nothing out); got {self.train_val_split}")


@dataclass
class RunArguments:
    config_file: str | None = field(
        default=None, metadata={"help": "JSON or YAML file with any of these flags; flags on the command line win."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the content of output_dir if it already holds a run."}
    )
    learning_rates: list[float] | None = field(
        default=None,
        metadata={
            "help": "Train one run per learning rate (e.g. 0.1 0.01 0.001 0.0001) and keep the one with the lowest "
            "final training objective (DE ELBO loss on the training set without augmentation, 10 draws), as the "
            "paper does; no validation data is used."
        },
    )
    push_to_hub_model_id: str | None = field(
        default=None, metadata={"help": "Older name of --hub_model_id, accepted as in run_image_classification.py."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Resume the run in output_dir from its newest complete checkpoint (incomplete ones, e.g. from "
            "a full disk, are skipped and named); same as --resume_from_checkpoint true."
        },
    )


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing written."""


class RunFailed(Exception):
    """A run that had started failed: one line with the cause and what was kept (every complete
    checkpoint and file the run wrote); exit status `status` (1, 2 for bad data, 130 on Ctrl-C)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _config_file_flags(path: str) -> list[str]:
    """Turn a JSON/YAML config into command-line flags (placed before the real ones, which win)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise UsageError(f"--config_file {path!r} cannot be read ({error.strerror}); pass a readable JSON or YAML file.")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"--config_file {path!r} is not valid JSON/YAML: {str(error).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UsageError(f"--config_file {path!r} must hold a mapping of flag names to values.")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            flags.extend(str(v) for v in value)
        else:
            flags.append(str(value))
    return flags


def _is_embedded(argv: list[str]) -> bool:
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return not given & {"--model_name_or_path", "--dataset_name", "--train_dir"}


class _OneLineErrors:
    """argparse reports a bad value after printing the whole usage (130 lines for `train`); here it is
    one `UsageError` line naming the flag and the value."""

    def error(self, message: str):
        raise UsageError(f"{message}; `{self.prog} --help` lists the flags.")


class _ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _hf_argument_parser(dataclass_types, prog: str):
    """transformers' `HfArgumentParser` with one-line errors and no prefix matching (`--max_step`
    is an error, not `--max_steps`)."""
    from transformers import HfArgumentParser

    class Parser(_OneLineErrors, HfArgumentParser):
        pass

    return Parser(dataclass_types, prog=prog, allow_abbrev=False)


def train_parser(embedded: bool = False):
    """The parser of `hf-deelbo train`; `embedded`: with the embedded digits task's defaults."""
    from .arguments import DEELBoTrainingArguments

    parser = _hf_argument_parser(
        (ModelArguments, DataTrainingArguments, DEELBoTrainingArguments, RunArguments), "hf-deelbo train"
    )
    parser.set_defaults(remove_unused_columns=False)  # the image transform reads the dataset's columns
    if embedded:
        parser.set_defaults(**EMBEDDED_DEFAULTS)
    return parser


def _refuse_unknown_flags(parser, argv: list[str]) -> None:
    import difflib

    _, unknown = parser.parse_known_args(argv)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
    if not unknown:
        return
    if not flags:
        raise UsageError(f"unexpected value(s) {' '.join(unknown)}; every value follows its --flag.")
    known = [o for action in parser._actions for o in action.option_strings]
    close = difflib.get_close_matches(flags[0], known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    every = ", --help-all all of them" if parser.prog == "hf-deelbo train" else ""
    raise UsageError(f"unknown flag {flags[0]}; {hint}`{parser.prog} --help` lists the flags{every}.")


# What `train --help` shows of transformers' TrainingArguments (`--help-all` shows every flag).
TRAINER_FLAGS_IN_SHORT_HELP = (
    "output_dir", "learning_rate", "optim", "optim_args", "lr_scheduler_type", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed", "logging_steps",
    "eval_strategy", "save_strategy", "report_to", "push_to_hub", "hub_model_id", "resume_from_checkpoint",
)
MODEL_FLAGS_IN_SHORT_HELP = ("model_name_or_path", "ignore_mismatched_sizes")


def train_help(full: bool = False) -> str:
    """`train --help`: the method's flags first, then the model, data and run flags, then a few of
    TrainingArguments' (all of them with `full`, as `--help-all`). Defaults are the ones that apply
    with a model or dataset; where the embedded digits task uses others, both are shown."""
    import copy
    import dataclasses

    from transformers import TrainingArguments

    from .arguments import DEELBoTrainingArguments

    parser = train_parser()
    actions = {action.dest: action for action in parser._actions}
    trainer_fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    method_fields = [f.name for f in dataclasses.fields(DEELBoTrainingArguments)
                     if f.init and f.name not in trainer_fields]
    names = lambda dataclass_type: [f.name for f in dataclasses.fields(dataclass_type)]  # noqa: E731
    groups = [
        ("DE ELBO (the method's own flags)", method_fields),
        ("model (as in transformers' run_image_classification.py)",
         names(ModelArguments) if full else list(MODEL_FLAGS_IN_SHORT_HELP)),
        ("data (as in run_image_classification.py; none of them: the embedded digits task)",
         names(DataTrainingArguments)),
        ("run", names(RunArguments)),
        (f"training: transformers' TrainingArguments ({'all' if full else 'a few'} of "
         f"{len(trainer_fields)}{'' if full else '; --help-all lists every one'})",
         trainer_fields if full else list(TRAINER_FLAGS_IN_SHORT_HELP)),
    ]
    shown = _ArgumentParser(
        prog="hf-deelbo train", add_help=False,
        usage="hf-deelbo train [--model_name_or_path MODEL] [--dataset_name NAME | --train_dir DIR] [flags]",
        description="Fine-tune an image classifier with DE ELBO. With no --model_name_or_path, --dataset_name "
        "or --train_dir: the embedded digits task (offline). docs/cli.md",
    )
    options = shown.add_argument_group("options")
    options.add_argument("-h", "--help", action="help", help="show this message")
    options.add_argument("--help-all", action="help", help="show every flag, TrainingArguments' included")
    for title, dests in groups:
        group = shown.add_argument_group(title)
        for dest in dests:
            action = actions.get(dest)
            if action is None or action.help == argparse.SUPPRESS:
                continue
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]  # not the --dashed-alias of each flag
            if action.choices is not None and len(action.choices) > 8:
                action.metavar = dest.upper()
                action.help = f"{action.help} (Choices: see --help-all.)"
            action.help = _with_defaults(action.help or "", dest, action.default)
            group._group_actions.append(action)
            shown._actions.append(action)
    return shown.format_help()


def _with_defaults(help_text: str, dest: str, default) -> str:
    """The help text and its default, and the embedded digits task's where it differs; `%` escaped."""
    from enum import Enum

    show = lambda value: value.value if isinstance(value, Enum) else value  # noqa: E731
    if dest == "output_dir" and default is None:
        default = "trainer_output"  # what TrainingArguments uses for None
    parts = []
    if default is not None and default != [] and "Default:" not in help_text:
        parts.append(f"default: {show(default)}")
    if dest in EMBEDDED_DEFAULTS and EMBEDDED_DEFAULTS[dest] != default:
        parts.append(f"embedded digits task: {EMBEDDED_DEFAULTS[dest]}")
    text = help_text.replace("%", "%%") if "%(" not in help_text else help_text
    return f"{text} ({'; '.join(parts)})" if parts else text


def parse_train_args(argv: list[str]):
    """(model_args, data_args, training_args, run_args) from the command line and --config_file."""
    config_file = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            config_file = argv[i + 1]
        elif arg.startswith("--config_file="):
            config_file = arg.split("=", 1)[1]
    if config_file is not None:
        argv = _config_file_flags(config_file) + argv
    parser = train_parser(embedded=_is_embedded(argv))
    _refuse_unknown_flags(parser, argv)
    try:
        model_args, data_args, training_args, run_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # raised by __post_init__ validation
        raise UsageError(str(error))
    if run_args.push_to_hub_model_id is not None and training_args.hub_model_id is None:
        training_args.hub_model_id = run_args.push_to_hub_model_id
    if run_args.resume or str(training_args.resume_from_checkpoint).lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the newest complete checkpoint of output_dir
    if training_args.remove_unused_columns:
        # The images and labels reach the model through a transform of the image and label columns,
        # which Trainer would drop as unused (run_image_classification.py's README asks for the flag).
        logger.info("--remove_unused_columns is set to false: the image transform reads the dataset's columns.")
        training_args.remove_unused_columns = False
    if model_args.model_name_or_path is None and not _is_embedded(argv):
        model_args.model_name_or_path = DEFAULT_HUB_MODEL
    return model_args, data_args, training_args, run_args


def _check_output_dir(training_args, run_args) -> bool:
    """True if output_dir already existed. Refuses a directory a live run holds, or holding another
    run (unless resumed or overwritten), and a resume with nothing to resume from."""
    from .checkpoints import checkpoint_problem, newest_complete_checkpoint
    from .lock import LOCK_NAME, lock_holder

    path = training_args.output_dir
    # Under torchrun every rank runs this command; the main process speaks for the run.
    holder = lock_holder(path) if os.path.isdir(path) and _is_main_process() else None
    if holder is not None:
        raise UsageError(
            f"--output_dir {path!r} is in use by another run ({holder}); wait for it to finish, or choose another "
            "--output_dir."
        )
    if training_args.resume_from_checkpoint is True:
        checkpoint, skipped = newest_complete_checkpoint(path)
        if checkpoint is None:
            found = "; ".join(f"{name}: {why}" for name, why in skipped) or "no checkpoint-<step> directory"
            raise UsageError(
                f"--resume: --output_dir {path!r} holds no complete checkpoint to resume from ({found}); "
                "start a new run without --resume."
            )
    elif training_args.resume_from_checkpoint:
        checkpoint = training_args.resume_from_checkpoint
        if not os.path.isdir(checkpoint):
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint!r} is not a directory; pass a checkpoint-<step> directory, or "
                "--resume for the newest complete checkpoint of --output_dir."
            )
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint!r} cannot be resumed from exactly: {problem}. Pass --resume "
                "for the newest complete checkpoint of --output_dir."
            )
    if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_NAME}:
        if training_args.resume_from_checkpoint:
            return True
        if not run_args.overwrite_output_dir:
            has_checkpoints = any(name.startswith("checkpoint-") for name in os.listdir(path))
            raise UsageError(
                f"--output_dir {path!r} already holds files from another run; "
                + ("pass --resume to continue it from its newest complete checkpoint, " if has_checkpoints else "")
                + "pass --overwrite_output_dir to replace them, or choose another --output_dir."
            )
        return True
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir {path!r} is a file, not a directory; choose another --output_dir.")
    return os.path.isdir(path)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)


def _check_model_path(name: str) -> None:
    if _looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(
            f"--model_name_or_path {name!r} is not a directory; pass a saved model directory or a Hub model id."
        )


def _require_hub(what: str, local_alternative: str) -> None:
    """A one-line error at once, instead of a minute of retries, when `what` needs an unreachable Hub."""
    from .hub import HubUnreachableError, check_hub_reachable

    try:
        check_hub_reachable(what, local_alternative)
    except HubUnreachableError as error:
        raise UsageError(str(error))


def _check_model_source(name: str) -> None:
    """A local directory, or a Hub id with the Hub in reach (or offline mode)."""
    _check_model_path(name)
    if not os.path.isdir(os.path.expanduser(name)):
        _require_hub(f"--model_name_or_path {name!r}", "a saved model directory")


def load_pretrained_classifier(model_args, num_labels: int | None = None, id2label: dict | None = None):
    """`hub.load_classifier` with the command line's arguments and one-line errors."""
    from .hub import load_classifier

    name = model_args.model_name_or_path
    _check_model_source(name)
    try:
        return load_classifier(
            name, num_labels, id2label, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            config_name=model_args.config_name, image_processor_name=model_args.image_processor_name,
            cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as error:
        raise UsageError(f"--model_name_or_path {name!r} could not be loaded: {str(error).splitlines()[0]}")
    except RuntimeError as error:
        if "size mismatch" in str(error) or "mismatched" in str(error):
            raise UsageError(
                f"--model_name_or_path {name!r} has a head of another size; pass --ignore_mismatched_sizes true."
            )
        raise


def _embedded_data_and_model(data_args, training_args):
    from . import digits

    print("Embedded default: a resnet10t pretrained on digits 0-4, fine-tuned on digits 5-9 (scikit-learn's digits).")
    backbone = digits.pretrained_backbone_path(seed=0)

    def model_init():
        return digits.load_backbone_with_new_head(backbone, len(digits.TARGET_CLASSES), seed=training_args.seed)

    num_train = data_args.max_train_samples if data_args.max_train_samples is not None else EMBEDDED_MAX_TRAIN_SAMPLES
    train, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), num_train, seed=training_args.seed,
                               test_fraction=EMBEDDED_TEST_FRACTION)
    if data_args.max_eval_samples is not None:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    train = digits.with_pixel_values(train)
    # no augmentation here, so the training objective is computed on the training set itself
    return model_init, train, train, digits.with_pixel_values(test), backbone, "digits 5-9 (scikit-learn)", None


def _check_dataset_source(name: str | None) -> None:
    """A Hub dataset id needs the Hub in reach, or datasets' offline mode (its cache)."""
    import datasets

    if name is not None and not os.path.exists(name) and not datasets.config.HF_HUB_OFFLINE:
        _require_hub(f"--dataset_name {name!r}", "--train_dir DIR (an image folder, one sub-folder per class)")


def _dataset_not_cached(name: str, error: Exception) -> str:
    return (f"--dataset_name {name!r} is not in the local cache, and datasets is offline (HF_HUB_OFFLINE or "
            f"HF_DATASETS_OFFLINE is 1: {str(error).splitlines()[0]}); unset it with the Hub in reach, or pass "
            "--train_dir DIR.")


def _hub_data_and_model(model_args, data_args, training_args):
    from . import data as data_lib

    _check_model_source(model_args.model_name_or_path)  # before any download or dataset build
    _check_dataset_source(data_args.dataset_name)
    try:
        datasets = data_lib.load_image_datasets(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.validation_dir,
            cache_dir=model_args.cache_dir, token=model_args.token,
        )
    except FileNotFoundError as error:
        raise UsageError(str(error))
    except ConnectionError as error:  # offline mode, and the dataset is not in the cache
        raise UsageError(_dataset_not_cached(data_args.dataset_name, error))
    if "train" not in datasets:
        raise UsageError(f"The dataset has no 'train' split (splits: {list(datasets)}); pass --train_dir or another --dataset_name.")
    data_lib.check_columns(datasets["train"], data_args.image_column_name, data_args.label_column_name)
    names = data_lib.label_names(datasets["train"], data_args.label_column_name)
    train, evaluation = data_lib.held_out_split(
        datasets["train"], datasets.get("validation"), data_args.train_val_split, training_args.seed,
        data_args.max_train_samples, data_args.max_eval_samples,
    )
    model, processor, head_modules = load_pretrained_classifier(model_args, len(names), dict(enumerate(names)))
    train_tf, eval_tf = data_lib.image_transforms(model, processor)
    # The trainer checks the whole label column before training; it reads it under the name `labels`.
    train, evaluation = (_labels_named_labels(d, data_args.label_column_name) for d in (train, evaluation))
    cols = (data_args.image_column_name, "labels")
    objective_view = data_lib.with_pixel_values(train, eval_tf, *cols)  # the training set without augmentation
    train = data_lib.with_pixel_values(train, train_tf, *cols)
    evaluation = data_lib.with_pixel_values(evaluation, eval_tf, *cols) if evaluation is not None else None
    if training_args.head_modules is None and head_modules is not None:
        training_args.head_modules = head_modules
    loaded = [model]

    def model_init():  # the loaded model first, then fresh loads (learning-rate selection)
        if loaded:
            return loaded.pop()
        return load_pretrained_classifier(model_args, len(names), dict(enumerate(names)))[0]

    return model_init, train, objective_view, evaluation, model_args.model_name_or_path, data_args.dataset_name, processor


def _labels_named_labels(dataset, label_column: str):
    """`dataset` with its label column `label_column` renamed `labels` (None stays None)."""
    if dataset is None or label_column == "labels":
        return dataset
    if "labels" in dataset.column_names:
        dataset = dataset.remove_columns("labels")
    return dataset.rename_column(label_column, "labels")


def train_command(argv: list[str]) -> int:
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(train_help(full="--help-all" in argv))
        return 0
    from transformers.trainer_utils import set_seed

    from .digits import classification_metrics
    from .plots import LOSS_PLOT, RELIABILITY_PLOT, plot_reliability, plot_training_loss
    from .trainer import DEELBoTrainer

    model_args, data_args, training_args, run_args = parse_train_args(argv)
    existed = _check_output_dir(training_args, run_args)
    set_seed(training_args.seed)
    if _is_embedded(argv):
        loaded = _embedded_data_and_model(data_args, training_args)
    else:
        loaded = _hub_data_and_model(model_args, data_args, training_args)
    model_init, train, objective_view, evaluation, base_model, dataset_name, processor = loaded
    from .data import collate

    kwargs = dict(eval_dataset=evaluation, data_collator=collate, processing_class=processor)
    output_dir = training_args.output_dir
    if run_args.learning_rates:
        if any(not (lr > 0) for lr in run_args.learning_rates):
            raise UsageError(f"--learning_rates must all be > 0; got {run_args.learning_rates}")
        if training_args.resume_from_checkpoint:
            raise UsageError("--learning_rates cannot be combined with --resume_from_checkpoint; resume one run instead.")
    else:
        trainer = DEELBoTrainer(model=model_init(), args=training_args, train_dataset=train, **kwargs)
    from . import lock

    main_process = training_args.process_index == 0
    if main_process:
        lock.acquire(output_dir)  # from here on, nothing the run writes is ever removed
    if existed and run_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
        if main_process:
            _remove_previous_run(output_dir)
    try:
        if run_args.learning_rates:
            from .search import select_learning_rate

            result = select_learning_rate(model_init, train, training_args, run_args.learning_rates,
                                          objective_dataset=objective_view, **kwargs)
            trainer = result.trainer
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "learning_rate_selection.json"), "w") as f:
                json.dump({"chosen": result.best, "runs": [
                    {**run.settings, "training_objective": run.score, "seconds": run.seconds, "learned": run.learned}
                    for run in result.runs
                ]}, f, indent=2)
            for run in result.runs:
                shutil.rmtree(os.path.join(output_dir, f"lr-{run.settings['learning_rate']:g}"), ignore_errors=True)
            print("Learning rate by final training objective: " + ", ".join(
                f"{run.settings['learning_rate']:g} -> {run.score:.4g} (sigma {run.learned['sigma']:.3g})"
                for run in result.runs
            ) + f"; chosen {result.best['learning_rate']:g}")
        else:
            trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_state()
        _record_split(_is_embedded(argv), data_args, training_args, train, evaluation)
        metrics = {}
        if evaluation is not None:
            output = trainer.predict(evaluation)
            metrics = classification_metrics(torch.tensor(output.predictions), torch.tensor(output.label_ids))
            trainer.log({f"eval_{k}": v for k, v in metrics.items()} | {"eval_loss": metrics["nll"]})
            plot_reliability(output.predictions, output.label_ids, os.path.join(output_dir, RELIABILITY_PLOT))
        plot_training_loss(trainer.state.log_history, os.path.join(output_dir, LOSS_PLOT))
        trainer.create_model_card(finetuned_from=base_model, dataset=dataset_name)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset=dataset_name, finetuned_from=base_model)
    except BaseException as error:
        failure = _run_failure(error, output_dir)
        if failure is None:
            raise
        raise failure from error
    finally:
        if main_process:
            lock.release(output_dir)  # removes output_dir only if the run created it and wrote nothing
    _print_summary(trainer.learned_hyperparameters(), metrics, output_dir, trainer.state.log_history,
                   _num_labels(trainer))
    if trainer.failed_pushes:
        print(f"hf-deelbo train: error: {len(trainer.failed_pushes)} checkpoint push(es) to the Hub failed "
              f"({'; '.join(trainer.failed_pushes)}); everything is saved in {output_dir}: push it with "
              f"hf-deelbo push {output_dir} --repo_id {trainer.hub_model_id or training_args.hub_model_id}.",
              file=sys.stderr)
        return 1
    return 0


def _record_split(embedded: bool, data_args, training_args, train, evaluation) -> None:
    """`data_split.json` in output_dir: the data and the held-out split, for `hf-deelbo evaluate`."""
    from .data import write_split_record

    if embedded:
        source = dict(source="embedded digits", evaluation="held out", test_fraction=EMBEDDED_TEST_FRACTION)
    else:
        source = dict(
            source="dataset" if data_args.dataset_name else "image folder",
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_dir=data_args.train_dir, validation_dir=data_args.validation_dir,
            image_column_name=data_args.image_column_name, label_column_name=data_args.label_column_name,
            # as `data.held_out_split` makes it: the validation split, else held out of train
            evaluation=None if evaluation is None else "validation or held out",
            test_fraction=data_args.train_val_split,
        )
    write_split_record(
        training_args.output_dir, **source, seed=training_args.seed, max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples, num_train_examples=len(train),
        num_eval_examples=len(evaluation) if evaluation is not None else 0,
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _remove_previous_run(output_dir: str) -> None:
    """--overwrite_output_dir: the previous run's files go, the lock of this run stays."""
    from .lock import LOCK_NAME

    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name == LOCK_NAME:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _kept(output_dir: str) -> str:
    """What a failed run leaves, in one sentence."""
    from .checkpoints import complete_checkpoints
    from .lock import LOCK_NAME

    written = [n for n in os.listdir(output_dir) if n != LOCK_NAME] if os.path.isdir(output_dir) else []
    if not written:
        return "Nothing was written."
    complete = complete_checkpoints(output_dir)
    if complete:
        return (f"Everything written is kept in {output_dir}, with the complete checkpoints {', '.join(complete)}; "
                "continue with the same command and --resume.")
    return f"Everything written is kept in {output_dir} (no complete checkpoint)."


def _run_failure(error: BaseException, output_dir: str) -> Exception | None:
    """The one-line report of a run that failed after it started, or None for an unexpected error
    (raised as it is, with its traceback, after saying what was kept)."""
    from .hub import HubPushError
    from .lock import OutputDirectoryInUse

    kept = _kept(output_dir)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        return RunFailed(f"interrupted. {kept}", 130)
    if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a checkpoint file
        return RunFailed(f"{_unpickled_file(error)} holds more than tensors, which is never unpickled "
                         f"({first_line[:200]}); resume from another checkpoint. {kept}")
    if isinstance(error, (UsageError, OutputDirectoryInUse)):
        return UsageError(f"{first_line} {kept}")
    if isinstance(error, ValueError):  # data found invalid mid-run
        return RunFailed(f"{first_line} {kept}", 2)
    if isinstance(error, (FloatingPointError, HubPushError)):
        return RunFailed(f"{first_line} {kept}")
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return RunFailed(f"{type(error).__name__}: {error.strerror or first_line}{where}. {kept}")
    if "No space left on device" in str(error) or "StorageFull" in str(error):  # safetensors' own error type
        return RunFailed(f"No space left on device ({type(error).__name__}). {kept}")
    print(f"hf-deelbo train: {kept}", file=sys.stderr)
    return None


def _unpickled_file(error: BaseException) -> str:
    """The name of the file whose `torch.load` raised `error` (read from the traceback's frames)."""
    tb, name = error.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load" and code.co_filename.endswith("serialization.py"):
            name = os.path.basename(str(tb.tb_frame.f_locals.get("f", ""))) or name
        tb = tb.tb_next
    return name or "A checkpoint file"


def _num_labels(trainer) -> int | None:
    from .checks import num_model_labels

    return num_model_labels(trainer.accelerator.unwrap_model(trainer.model))


def _print_summary(deelbo: dict, metrics: dict, output_dir: str, log_history: list | None = None,
                   num_labels: int | None = None) -> None:
    print("\nDE ELBO learned hyperparameters")
    print(f"  lambda (backbone prior variance) {deelbo['lambda']:.4g}   alpha_eff = 1/(D lambda) = {deelbo['alpha_eff']:.4g}")
    print(f"  tau    (head prior variance)     {deelbo['tau']:.4g}   beta_eff  = 1/(D tau)    = {deelbo['beta_eff']:.4g}")
    print(f"  sigma  (posterior std)           {deelbo['sigma']:.4g}")
    print(f"  kappa  (data emphasis)           {deelbo['kappa']:.4g}   (D = {deelbo['num_backbone_params'] + deelbo['num_head_params']:,}, N = {deelbo['num_train_examples']})")
    if metrics:
        print(f"Test accuracy {metrics['accuracy']:.4f}   NLL {metrics['nll']:.4f}   ECE {metrics['ece']:.4f}")
    print(f"Model, config.json (with `deelbo`), model card and plots written to {os.path.abspath(output_dir)}")
    nlls = [entry["nll"] for entry in log_history or [] if "nll" in entry]
    if nlls and num_labels and num_labels > 1 and not nlls[-1] < math.log(num_labels):
        print(f"Warning: the final training NLL {nlls[-1]:.4g} is no better than predicting every class equally "
              f"(log C = {math.log(num_labels):.4g}, C = {num_labels}): the model learned nothing. Lower "
              "--learning_rate (or --sigma_init); with --kappa 1 (the plain ELBO) this collapse is the expected "
              "result when D >> N.")


def _read_deelbo(path_or_repo: str, token: str | None = None, revision: str | None = None) -> dict:
    if os.path.isdir(path_or_repo):
        config_file = os.path.join(path_or_repo, "config.json")
        if not os.path.isfile(config_file):
            raise UsageError(f"{path_or_repo!r} has no config.json; pass a directory written by hf-deelbo train.")
    else:
        if _looks_like_local_path(path_or_repo):
            raise UsageError(f"{path_or_repo!r} is not a directory; pass an output directory or a Hub repo id.")
        _require_hub(repr(path_or_repo), "an output directory")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            config_file = hf_hub_download(path_or_repo, "config.json", token=token, revision=revision)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
            raise UsageError(f"Cannot read config.json of {path_or_repo!r} from the Hub: {str(error).splitlines()[0]}")
    from .hub import read_config_entry, read_json_config

    try:
        config = read_json_config(config_file)
        if "deelbo" not in config:
            raise UsageError(f"{path_or_repo!r} has no `deelbo` entry in config.json: it was not trained by hf-deelbo.")
        return read_config_entry(config, "deelbo", f"config.json of {path_or_repo!r}")
    except ValueError as error:
        raise UsageError(str(error)) from None


def show_command(argv: list[str]) -> int:
    import argparse

    parser = _ArgumentParser(prog="hf-deelbo show", description="Print the learned hyperparameters.", allow_abbrev=False)
    parser.add_argument("path_or_repo_id", help="Output directory or Hub repo id.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument("--json", action="store_true", help="Print config.deelbo as JSON.")
    args = parser.parse_args(argv)
    deelbo = _read_deelbo(args.path_or_repo_id, args.token, args.revision)
    if args.json:
        print(json.dumps(deelbo, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in deelbo)
    for key, value in sorted(deelbo.items()):
        shown = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _point_card_at_repo(output_dir: str, repo_id: str) -> None:
    """The card of a directory trained without a Hub id loads the local directory; once pushed, it
    loads `repo_id`."""
    from .model_card import set_card_repo_id

    card_file = os.path.join(output_dir, "README.md")
    if not os.path.isfile(card_file):
        return
    with open(card_file, encoding="utf-8") as f:
        text = f.read()
    pointed = set_card_repo_id(text, repo_id)
    if pointed != text:
        with open(card_file, "w", encoding="utf-8") as f:
            f.write(pointed)


def push_command(argv: list[str]) -> int:
    import argparse

    from huggingface_hub import HfApi

    parser = _ArgumentParser(prog="hf-deelbo push", description="Upload an output directory to the Hub.", allow_abbrev=False)
    parser.add_argument("output_dir", help="Directory written by hf-deelbo train.")
    parser.add_argument("--repo_id", required=True, help="Target repo, 'namespace/name'.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--commit_message", default="Upload model fine-tuned with DE ELBO")
    args = parser.parse_args(argv)
    _read_deelbo(args.output_dir)  # refuses directories that are not a finished run
    from .hub import HubPushError, check_repo_namespace, push_error, set_hub_timeout

    set_hub_timeout()
    card_file = os.path.join(args.output_dir, "README.md")
    card = open(card_file, "rb").read() if os.path.isfile(card_file) else None
    try:
        repo_id = check_repo_namespace(args.repo_id, args.token)
        api = HfApi(token=args.token)
        url = api.create_repo(repo_id, private=args.private, exist_ok=True, repo_type="model")
        _point_card_at_repo(args.output_dir, repo_id)
        api.upload_folder(
            repo_id=repo_id, folder_path=args.output_dir, commit_message=args.commit_message,
            revision=args.revision, ignore_patterns=["checkpoint-*", "_*", "*.pt", "*.pth", "training_args.bin"],
        )
    except Exception as error:  # noqa: BLE001 - one line, the cause named
        if card is not None:  # a failed push leaves the directory as it was
            with open(card_file, "wb") as f:
                f.write(card)
        if isinstance(error, HubPushError):
            raise UsageError(str(error)) from None
        raise UsageError(str(push_error(error, args.output_dir, args.repo_id))) from None
    print(f"Pushed {args.output_dir} to {url}")
    return 0


def evaluate_command(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from . import data as data_lib
    from . import digits
    from .prediction import posterior_from_config, predictive_log_probs

    @dataclass
    class EvaluateArguments:
        model_name_or_path: str = field(metadata={"help": "Output directory or Hub repo of a model trained with hf-deelbo."})
        bma_samples: int = field(default=0, metadata={"help": "0: posterior mean; S > 0: average over S posterior draws."})
        batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
        seed: int | None = field(
            default=None,
            metadata={"help": "Seed of the posterior draws (--bma_samples). Default: the run's seed, as train used."},
        )
        split: str | None = field(
            default=None,
            metadata={"help": "Dataset split to evaluate. Default: the examples the run held out from training "
                      "(its data_split.json: train's seed and fraction), or the dataset's validation split."},
        )

    parser = _hf_argument_parser((EvaluateArguments, DataTrainingArguments), "hf-deelbo evaluate")
    _refuse_unknown_flags(parser, argv)
    eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    if eval_args.bma_samples < 0:
        raise UsageError(f"--bma_samples must be >= 0 (0 predicts with the posterior mean); got {eval_args.bma_samples}")
    margs = ModelArguments(model_name_or_path=eval_args.model_name_or_path)
    model, processor, _ = load_pretrained_classifier(margs)
    model.eval()
    record = data_lib.read_split_record(eval_args.model_name_or_path)
    dataset, description = evaluation_data(record, data_args, eval_args.split, model, processor)
    if eval_args.seed is None:
        eval_args.seed = record["seed"] if record else DEFAULT_SEED
    posterior = posterior_from_config(model) if eval_args.bma_samples else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=eval_args.batch_size, collate_fn=data_lib.collate)
    log_probs, labels = [], []
    for batch in loader:
        log_probs.append(predictive_log_probs(model, {"pixel_values": batch["pixel_values"]}, posterior,
                                              eval_args.bma_samples, eval_args.seed))
        labels.append(batch["labels"])
    metrics = digits.classification_metrics(torch.cat(log_probs), torch.cat(labels))
    if not all(math.isfinite(v) for v in metrics.values()):
        raise UsageError(
            f"{eval_args.model_name_or_path!r} predicts non-finite probabilities (NLL {metrics['nll']}): its weights "
            "or its config.deelbo hold NaN or inf; evaluate another checkpoint."
        )
    how = f"BMA over {eval_args.bma_samples} draws" if eval_args.bma_samples else "posterior mean"
    print(f"{eval_args.model_name_or_path} ({how}, {len(dataset)} examples: {description}): "
          f"accuracy {metrics['accuracy']:.4f}  NLL {metrics['nll']:.4f}  ECE {metrics['ece']:.4f}")
    return 0


# TrainingArguments' seed: what `train` split the embedded digits with when nothing says otherwise.
DEFAULT_SEED = 42


def evaluation_data(record: dict | None, data_args, split: str | None, model, processor):
    """`(dataset, description)`: what `hf-deelbo evaluate` scores.

    Without data flags, the examples the run held out from training, rebuilt from its
    `data_split.json` (`record`) with train's source, seed, fraction and sizes, so that no
    training example is scored. With --dataset_name / --validation_dir naming the run's data, the
    same held-out part; naming other data, its `split` (default: validation). A run without a
    record (trained before it was written, or not by `hf-deelbo train`) is scored on the digits
    5-9 held out with train's default seed."""
    from . import data as data_lib
    from . import digits

    given = data_args.dataset_name is not None or data_args.validation_dir is not None
    if not given and (record is None or record["source"] == "embedded digits"):
        seed = record["seed"] if record else DEFAULT_SEED
        fraction = record["test_fraction"] if record else EMBEDDED_TEST_FRACTION
        _, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), None, seed=seed, test_fraction=fraction)
        limit = record.get("max_eval_samples") if record else None
        if limit is not None:
            test = test.select(range(min(limit, len(test))))
        origin = "held out by the run" if record else "no data_split.json: train's default split"
        return digits.with_pixel_values(test), f"digits 5-9, {fraction:.0%} {origin}, seed {seed}"
    if given:
        names = (data_args.dataset_name, data_args.dataset_config_name, data_args.validation_dir)
        columns = (data_args.image_column_name, data_args.label_column_name)
        same_data = record is not None and names == (
            record.get("dataset_name"), record.get("dataset_config_name"), record.get("validation_dir"))
    else:
        names = (record.get("dataset_name"), record.get("dataset_config_name"), record.get("validation_dir"))
        columns = (record["image_column_name"], record["label_column_name"])
        same_data = True
    train_dir = record.get("train_dir") if same_data else None
    try:
        datasets = data_lib.load_image_datasets(names[0], names[1], train_dir, names[2])
    except FileNotFoundError as error:
        raise UsageError(str(error))
    if split is not None:
        if split not in datasets:
            raise UsageError(f"--split {split!r} is not a split of the data (splits: {list(datasets)}); pass one of them.")
        dataset, description = datasets[split], f"split {split!r}"
    elif same_data:
        _, dataset = data_lib.held_out_split(
            datasets.get("train"), datasets.get("validation"), record["test_fraction"], record["seed"],
            record.get("max_train_samples"), record.get("max_eval_samples"),
        )
        if dataset is None:
            raise UsageError("the run held out no evaluation data (--train_val_split 0, no validation split); "
                             "pass --split, or --dataset_name / --validation_dir with other data.")
        description = "held out by the run" if "validation" not in datasets else "the validation split"
    elif "validation" in datasets:
        dataset, description = datasets["validation"], "the validation split"
    else:
        raise UsageError(f"the data has no 'validation' split (splits: {list(datasets)}); pass --split NAME.")
    data_lib.check_columns(dataset, *columns)
    _, eval_tf = data_lib.image_transforms(model, processor)
    return data_lib.with_pixel_values(dataset, eval_tf, *columns), description


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "push": push_command, "show": show_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[0] + "\n\n" + "\n".join(__doc__.strip().split("\n\n")[1:2]), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-deelbo: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Other libraries' INFO lines (timm's "Loading pretrained weights from ...") are noise here.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)  # hf_deelbo's logger follows transformers' verbosity (warnings) otherwise
    from .hub import HubPushError
    from .lock import OutputDirectoryInUse

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UsageError, OutputDirectoryInUse) as error:
        print(f"hf-deelbo {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"hf-deelbo {argv[0]}: error: {error}", file=sys.stderr)
        return error.status
    except (HubPushError, FloatingPointError) as error:
        print(f"hf-deelbo {argv[0]}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hf-deelbo {argv[0]}: error: interrupted.", file=sys.stderr)
        return 130
    except ValueError as error:
        # Argument and data validation (DEELBoTrainingArguments, DEELBoTrainer, datasets).
        print(f"hf-deelbo {argv[0]}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
