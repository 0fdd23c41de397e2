"""The arguments of `hf-deelbo train`: the flags (transformers' run_image_classification.py's where
they overlap, every DEELBoTrainingArguments / TrainingArguments flag), the embedded task's defaults,
the short and full help, and a JSON or YAML arguments file (`--config_file`, or as the only
positional argument, as the example scripts take it)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field

from ..search.selection import SelectionStrategy
from .common import (
    DEFAULT_HUB_MODEL,
    ArgumentParser,
    DataTrainingArguments,
    ModelArguments,
    UsageError,
    accept_negative_numbers,
    hf_argument_parser,
    refuse_unknown_flags,
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
    learning_rate_selection: SelectionStrategy = field(
        default=SelectionStrategy.FULL,
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
        self.learning_rate_selection = SelectionStrategy.check("learning_rate_selection", self.learning_rate_selection)


def _config_file_values(path: str, what: str) -> dict:
    """The mapping of flag names to values in a JSON or YAML arguments file (`what` names it in errors);
    null values are left out. They become the parser's defaults, so flags on the command line win."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise UsageError(
            f"{what} {path!r} cannot be read ({error.strerror}); pass a readable JSON or YAML file."
        ) from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"{what} {path!r} is not valid JSON/YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{what} {path!r} must hold a mapping of flag names to values.")
    return {key: value for key, value in values.items() if value is not None}


def _given(argv: list[str], file_values: dict) -> set[str]:
    """The names of the flags set on the command line or in the arguments file."""
    return {a.split("=", 1)[0].removeprefix("--") for a in argv if a.startswith("--")} | set(file_values)


def _is_embedded(argv: list[str], file_values: dict | None = None) -> bool:
    """No model and no data named: the embedded digits task."""
    return not _given(argv, file_values or {}) & {"model_name_or_path", "dataset_name", "train_dir"}


def is_embedded_run(model_args, data_args) -> bool:
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
    "output_dir",
    "learning_rate",
    "optim",
    "optim_args",
    "lr_scheduler_type",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "seed",
    "logging_steps",
    "eval_strategy",
    "save_strategy",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "resume_from_checkpoint",
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
    method_fields = [
        f.name
        for f in dataclasses.fields(DEELBoTrainingArguments)
        if f.init and f.name not in trainer_fields and f.name not in shared_fields
    ] + shared_fields
    names = lambda dataclass_type: [f.name for f in dataclasses.fields(dataclass_type)]  # noqa: E731
    groups = [
        ("DE ELBO (the method's own flags)", method_fields),
        (
            "model (as in transformers' run_image_classification.py)",
            names(ModelArguments) if full else list(MODEL_FLAGS_IN_SHORT_HELP),
        ),
        (
            "data (as in run_image_classification.py; none of them: the embedded digits task)",
            names(DataTrainingArguments),
        ),
        ("run", names(RunArguments)),
        (
            f"training: transformers' TrainingArguments ({'all' if full else 'a few'} of "
            f"{len(trainer_fields)}{'' if full else '; --help-all lists every one'})",
            trainer_fields if full else list(TRAINER_FLAGS_IN_SHORT_HELP),
        ),
    ]
    shown = ArgumentParser(
        prog="hf-deelbo train",
        add_help=False,
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
        raise UsageError(str(error)) from None
    if not _given(argv, file_values) & {"do_train", "do_eval"}:
        training_args.do_train = training_args.do_eval = True
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError(
            "--do_train and --do_eval are both false, so the run would do nothing; set one of them to "
            "true, or pass neither (train, then evaluate)."
        )
    if run_args.push_to_hub_model_id is not None and training_args.hub_model_id is None:
        training_args.hub_model_id = run_args.push_to_hub_model_id
    if run_args.resume or str(training_args.resume_from_checkpoint).lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the newest complete checkpoint of output_dir
    if training_args.remove_unused_columns:
        # The images and labels reach the model through a transform of the image and label columns,
        # which Trainer would drop as unused (run_image_classification.py's README asks for the flag).
        logger.info("--remove_unused_columns is set to false: the image transform reads the dataset's columns.")
        training_args.remove_unused_columns = False
    if model_args.model_name_or_path is None and not is_embedded_run(model_args, data_args):
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
            kind = {int: "an int", float: "a number", str: "a string"}.get(
                convert, "true or false" if action.nargs == "?" else "one of its choices"
            )
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
            raise UsageError(
                f"{what} {config_file!r} sets {key!r}, which is no flag of hf-deelbo train; {hint}"
                "`hf-deelbo train --help-all` lists them."
            )
