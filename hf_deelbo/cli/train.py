"""`hf-deelbo train`: fine-tune with DE ELBO (no model and no dataset: the embedded digits task, offline).

Takes the flags of transformers' run_image_classification.py where they overlap, every
DEELBoTrainingArguments / TrainingArguments flag, and a JSON or YAML arguments file (`--config_file`,
or as the only positional argument, as the example scripts take it)."""

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
from typing import Literal

import PIL
import torch

from ..core import output_dir as output_dir_policy
from .common import (
    DEFAULT_HUB_MODEL,
    EMBEDDED_TEST_FRACTION,
    ArgumentParser,
    DataTrainingArguments,
    ModelArguments,
    RunFailed,
    UsageError,
    accept_negative_numbers,
    check_model_source,
    hf_argument_parser,
    load_pretrained_classifier,
    refuse_unknown_flags,
    require_hub,
)

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
    learning_rate_selection: Literal["full", "halving"] = field(
        default="full",
        metadata={
            "help": "How --learning_rates chooses: 'full' trains one complete run per learning rate; 'halving' "
            "(successive halving, needs --max_steps) trains all of them to max_steps/16 (for 4 learning rates), "
            "continues the best half to max_steps/8 and the best of those to max_steps, exactly resumed; each early "
            "score is taken after a cool-down branch (20%% more steps with the learning rate decayed to 0, then "
            "dropped): 1.35 runs' steps instead of 4, by the same training objective (one draw at the early "
            "rounds), and agrees with 'full' where the early ranking holds."
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

    def __post_init__(self):
        from ..core.arguments import check_choice

        check_choice("learning_rate_selection", self.learning_rate_selection,
                     {"full": "one complete run per learning rate", "halving": "successive halving"})


def _config_file_values(path: str, what: str) -> dict:
    """The mapping of flag names to values in a JSON or YAML arguments file (`what` names it in errors);
    null values are left out. They become the parser's defaults, so flags on the command line win."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise UsageError(f"{what} {path!r} cannot be read ({error.strerror}); pass a readable JSON or YAML file.")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"{what} {path!r} is not valid JSON/YAML: {str(error).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UsageError(f"{what} {path!r} must hold a mapping of flag names to values.")
    return {key: value for key, value in values.items() if value is not None}


def _given(argv: list[str], file_values: dict) -> set[str]:
    """The names of the flags set on the command line or in the arguments file."""
    return {a.split("=", 1)[0].removeprefix("--") for a in argv if a.startswith("--")} | set(file_values)


def _is_embedded(argv: list[str], file_values: dict | None = None) -> bool:
    """No model and no data named: the embedded digits task."""
    return not _given(argv, file_values or {}) & {"model_name_or_path", "dataset_name", "train_dir"}


def _is_embedded_run(model_args, data_args) -> bool:
    """`_is_embedded`, from the parsed arguments."""
    return model_args.model_name_or_path is None and data_args.dataset_name is None and data_args.train_dir is None


def _arguments_file(argv: list[str]) -> tuple[str | None, str, list[str]]:
    """(the arguments file, how errors name it, the other arguments): a single positional `.json` or
    `.yaml` file, as transformers' example scripts take it, or `--config_file FILE`."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        return argv[0], "the arguments file", []
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            return argv[i + 1], "--config_file", argv
        if arg.startswith("--config_file="):
            return arg.split("=", 1)[1], "--config_file", argv
    return None, "", argv


def make_parser(embedded: bool = False):
    """The parser of `hf-deelbo train`; `embedded`: with the embedded digits task's defaults."""
    from ..methods.deelbo.arguments import DEELBoTrainingArguments

    parser = hf_argument_parser(
        (ModelArguments, DataTrainingArguments, DEELBoTrainingArguments, RunArguments), "hf-deelbo train"
    )
    parser.set_defaults(remove_unused_columns=False)  # the image transform reads the dataset's columns
    if embedded:
        parser.set_defaults(**EMBEDDED_DEFAULTS)
    return parser


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

    from ..core.arguments import FineTuningArguments
    from ..methods.deelbo.arguments import DEELBoTrainingArguments

    parser = make_parser()
    actions = {action.dest: action for action in parser._actions}
    trainer_fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    # DE ELBO's own flags first, then those every method shares (head_modules).
    shared_fields = [f.name for f in dataclasses.fields(FineTuningArguments) if f.name not in trainer_fields]
    method_fields = [f.name for f in dataclasses.fields(DEELBoTrainingArguments)
                     if f.init and f.name not in trainer_fields and f.name not in shared_fields] + shared_fields
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
    shown = ArgumentParser(
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
    """(model_args, data_args, training_args, run_args) from the command line and an arguments file
    (`_arguments_file`), whose values are the parser's typed defaults (trl's `TrlParser` does the
    same), so that the command line wins. Without --do_train or --do_eval, both are set: `train`
    trains and evaluates."""
    config_file, what, argv = _arguments_file(list(argv))
    file_values = _config_file_values(config_file, what) if config_file is not None else {}
    parser = make_parser(embedded=_is_embedded(argv, file_values))
    _refuse_unknown_keys(parser, file_values, config_file, what)
    parser.set_defaults(**_typed_file_values(parser, file_values, config_file, what))
    accept_negative_numbers(parser)
    refuse_unknown_flags(parser, argv)
    try:
        model_args, data_args, training_args, run_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # raised by __post_init__ validation
        raise UsageError(str(error))
    if not _given(argv, file_values) & {"do_train", "do_eval"}:
        training_args.do_train = training_args.do_eval = True
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("--do_train and --do_eval are both false, so the run would do nothing; set one of them to "
                         "true, or pass neither (train, then evaluate).")
    if run_args.push_to_hub_model_id is not None and training_args.hub_model_id is None:
        training_args.hub_model_id = run_args.push_to_hub_model_id
    if run_args.resume or str(training_args.resume_from_checkpoint).lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the newest complete checkpoint of output_dir
    if training_args.remove_unused_columns:
        # The images and labels reach the model through a transform of the image and label columns,
        # which Trainer would drop as unused (run_image_classification.py's README asks for the flag).
        logger.info("--remove_unused_columns is set to false: the image transform reads the dataset's columns.")
        training_args.remove_unused_columns = False
    if model_args.model_name_or_path is None and not _is_embedded_run(model_args, data_args):
        model_args.model_name_or_path = DEFAULT_HUB_MODEL
    return model_args, data_args, training_args, run_args


def _typed_file_values(parser, file_values: dict, config_file: str | None, what: str) -> dict:
    """The arguments file's values typed as the command line types them (each through its flag's
    own type function and choices, each item of a list flag), so that `{"max_steps": 10.5}` is
    refused as `--max_steps 10.5` is. A list or mapping is kept as it is for flags whose field
    takes one (`report_to`, `lr_scheduler_kwargs`), and refused for a number or a switch."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in file_values.items():
        action = actions[key]
        convert = action.type or str
        several = action.nargs in ("+", "*")
        try:
            if isinstance(value, (list, dict)) and not several:
                if convert is not str:
                    raise ValueError("a list or mapping")
                typed[key] = value
                continue
            if several and not isinstance(value, list):
                value = [value]
            # a choice outside the choices passes: the arguments' own check names them all
            items = [convert(str(item)) for item in value] if several else [convert(str(value))]
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            kind = {int: "an int", float: "a number", str: "a string"}.get(convert, "true or false" if action.nargs == "?"
                                                                            else "one of its choices")
            raise UsageError(
                f"{what} {config_file!r} sets {key!r} to {file_values[key]!r}, but --{key} takes {kind}"
                f"{' (or a list of them)' if several else ''}; write the value as on the command line "
                f"(`hf-deelbo train --help-all` lists it)."
            ) from None
        typed[key] = items if several else items[0]
    return typed


def _refuse_unknown_keys(parser, file_values: dict, config_file: str | None, what: str) -> None:
    import difflib

    known = {action.dest for action in parser._actions}
    for key in file_values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{what} {config_file!r} sets {key!r}, which is no flag of hf-deelbo train; {hint}"
                             "`hf-deelbo train --help-all` lists them.")


def _embedded_data_and_model(data_args, training_args):
    from ..demo import digits

    num_train = data_args.max_train_samples if data_args.max_train_samples is not None else EMBEDDED_MAX_TRAIN_SAMPLES
    num_classes = len(digits.TARGET_CLASSES)
    if num_train < num_classes:
        raise UsageError(f"--max_train_samples {num_train} is fewer than the embedded task's {num_classes} classes "
                         f"(digits 5-9): the stratified split keeps every class; pass at least {num_classes}.")
    print("Embedded default: a resnet10t pretrained on digits 0-4, fine-tuned on digits 5-9 (scikit-learn's digits).")
    backbone = digits.pretrained_backbone_path(seed=0)

    def model_init():
        return digits.load_backbone_with_new_head(backbone, len(digits.TARGET_CLASSES), seed=training_args.seed)

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
        require_hub(f"--dataset_name {name!r}", "--train_dir DIR (an image folder, one sub-folder per class)")


def _dataset_not_cached(name: str, error: Exception) -> str:
    return (f"--dataset_name {name!r} is not in the local cache, and datasets is offline (HF_HUB_OFFLINE or "
            f"HF_DATASETS_OFFLINE is 1: {str(error).splitlines()[0]}); unset it with the Hub in reach, or pass "
            "--train_dir DIR.")


def _hub_data_and_model(model_args, data_args, training_args):
    from . import data as data_lib

    check_model_source(model_args.model_name_or_path)  # before any download or dataset build
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


def main(argv: list[str]) -> int:
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(train_help(full="--help-all" in argv))
        return 0
    from ..core.preemption import raising

    with raising():  # SIGTERM/SIGUSR1: at once before training; after the current step during it
        return _train(argv)


def _train(argv: list[str]) -> int:
    from transformers.trainer_utils import set_seed

    from ..evaluation.metrics import classification_metrics
    from ..evaluation.plots import LOSS_PLOT, RELIABILITY_PLOT, plot_reliability, plot_training_loss
    from ..methods.deelbo.trainer import DEELBoTrainer

    model_args, data_args, training_args, run_args = parse_train_args(argv)
    _check_learning_rate_selection(training_args, run_args)
    existed = output_dir_policy.check_output_dir(
        training_args.output_dir, training_args.resume_from_checkpoint, run_args.overwrite_output_dir, "cli",
        _is_main_process())
    set_seed(training_args.seed)
    embedded = _is_embedded_run(model_args, data_args)
    if embedded:
        loaded = _embedded_data_and_model(data_args, training_args)
    else:
        loaded = _hub_data_and_model(model_args, data_args, training_args)
    model_init, train, objective_view, evaluation, base_model, dataset_name, processor = loaded
    from transformers import default_data_collator

    kwargs = dict(eval_dataset=evaluation, data_collator=default_data_collator, processing_class=processor)
    output_dir = training_args.output_dir
    if run_args.learning_rates and not training_args.do_train:
        raise UsageError("--learning_rates selects among training runs; it needs --do_train (or neither --do_train "
                         "nor --do_eval, which does both).")
    if training_args.do_train and run_args.learning_rates:
        if any(not (lr > 0) for lr in run_args.learning_rates):
            raise UsageError(f"--learning_rates must all be > 0; got {run_args.learning_rates}")
        if training_args.resume_from_checkpoint:
            raise UsageError("--learning_rates cannot be combined with --resume_from_checkpoint; resume one run instead.")
    else:
        try:  # the trainer reads the first examples: an image file that is none is bad input
            trainer = DEELBoTrainer(model=model_init(), args=training_args, train_dataset=train, **kwargs)
        except PIL.UnidentifiedImageError as error:
            raise UsageError(_not_an_image(error)) from None
    from ..core import lock

    main_process = training_args.process_index == 0
    if main_process:
        lock.acquire(output_dir, created=not existed)  # from here on, nothing the run writes is ever removed
    try:
        if existed and run_args.overwrite_output_dir and not training_args.resume_from_checkpoint and main_process:
            output_dir_policy.clear_previous_run(output_dir)
        train_metrics = None
        if training_args.do_train and run_args.learning_rates:
            from ..search import select_learning_rate

            result = select_learning_rate(model_init, train, training_args, run_args.learning_rates,
                                          objective_dataset=objective_view,
                                          strategy=run_args.learning_rate_selection, **kwargs)
            trainer = result.trainer
            train_metrics = next(run.metrics for run in result.runs if run.settings == result.best)
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "learning_rate_selection.json"), "w") as f:
                json.dump(_selection_record(result, run_args.learning_rate_selection), f, indent=2)
            for run in result.runs:
                shutil.rmtree(os.path.join(output_dir, f"lr-{run.settings['learning_rate']:g}"), ignore_errors=True)
            if run_args.learning_rate_selection == "halving":
                print(f"Learning rate by successive halving ({result.total_steps} steps in all): " + ", ".join(
                    f"{run.settings['learning_rate']:g} -> {run.score:.4g} after {run.steps} steps"
                    + (f" (eliminated in round {run.eliminated_at})" if run.eliminated else "")
                    for run in result.runs
                ) + f"; chosen {result.best['learning_rate']:g}")
            else:
                print("Learning rate by final training objective: " + ", ".join(
                    f"{run.settings['learning_rate']:g} -> {run.score:.4g} (sigma {run.learned['sigma']:.3g})"
                    for run in result.runs
                ) + f"; chosen {result.best['learning_rate']:g}")
        elif training_args.do_train:
            train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
        if training_args.do_train:
            trainer.save_model()
            trainer.save_metrics("train", train_metrics)  # train_results.json and all_results.json
            trainer.save_state()
            _record_split(embedded, data_args, training_args, train, evaluation)
        metrics = {}
        if training_args.do_eval and evaluation is not None:
            output = trainer.predict(evaluation)
            metrics = classification_metrics(torch.tensor(output.predictions), torch.tensor(output.label_ids))
            eval_metrics = {f"eval_{k}": v for k, v in metrics.items()} | {"eval_loss": metrics["nll"]}
            trainer.log(eval_metrics)
            trainer.save_metrics("eval", eval_metrics)  # eval_results.json, added to all_results.json
            plot_reliability(output.predictions, output.label_ids, os.path.join(output_dir, RELIABILITY_PLOT))
        if training_args.do_train:
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
    if not training_args.do_train:
        if metrics:
            print(f"Test accuracy {metrics['accuracy']:.4f}   NLL {metrics['nll']:.4f}   ECE {metrics['ece']:.4f} "
                  f"(not trained: --do_eval without --do_train); written to {os.path.abspath(output_dir)}")
        return 0
    _print_summary(trainer.learned_hyperparameters(), metrics, output_dir, trainer.state.log_history,
                   _num_labels(trainer))
    if trainer.failed_pushes:
        print(f"hf-deelbo train: error: {len(trainer.failed_pushes)} checkpoint push(es) to the Hub failed "
              f"({'; '.join(trainer.failed_pushes)}); everything is saved in {output_dir}: push it with "
              f"hf-deelbo push {output_dir} --repo_id {trainer.hub_model_id or training_args.hub_model_id}.",
              file=sys.stderr)
        return 1
    return 0


def _check_learning_rate_selection(training_args, run_args) -> None:
    """--learning_rate_selection halving needs --learning_rates and a --max_steps it can pause at
    fractions of (`halving_schedule`)."""
    if run_args.learning_rate_selection != "halving":
        return
    if not run_args.learning_rates:
        raise UsageError("--learning_rate_selection halving chooses among --learning_rates; pass them too "
                         "(e.g. --learning_rates 0.1 0.01 0.001 0.0001).")
    if not training_args.max_steps > 0:
        raise UsageError(
            "--learning_rate_selection halving pauses runs at fractions of --max_steps, so it needs --max_steps > 0; "
            f"got {training_args.max_steps}. Pass --max_steps (the length of the full run)."
        )
    from ..search import halving_min_steps

    num = len(run_args.learning_rates)
    needed = halving_min_steps(num)
    if training_args.max_steps < needed:
        raise UsageError(f"--learning_rate_selection halving needs --max_steps >= {needed} for {num} learning rates; "
                         f"got {training_args.max_steps}. Raise --max_steps or pass fewer --learning_rates.")


def _selection_record(result, selection: str) -> dict:
    """learning_rate_selection.json: the chosen settings and every run's score, time and learned
    values; for successive halving also its steps, its score at each round and when it was eliminated."""
    runs = []
    for run in result.runs:
        record = {**run.settings, "training_objective": run.score, "seconds": run.seconds, "learned": run.learned}
        if selection == "halving":
            record.update(steps=run.steps, round_scores=run.round_scores, eliminated_at=run.eliminated_at)
        runs.append(record)
    record = {"selection": selection, "chosen": result.best, "runs": runs}
    if selection == "halving":
        record.update(total_steps=result.total_steps, total_seconds=result.total_seconds)
    return record


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


def _run_failure(error: BaseException, output_dir: str) -> Exception | None:
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
        return RunFailed(f"{_not_an_image(error)} {kept}", 2)
    if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a checkpoint file
        return RunFailed(f"{_unpickled_file(error)} holds more than tensors, which is never unpickled "
                         f"({first_line[:200]}); resume from another checkpoint. {kept}")
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


def _not_an_image(error: Exception) -> str:
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


def _num_labels(trainer) -> int | None:
    from ..core.checks import num_model_labels

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
