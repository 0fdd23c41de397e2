"""What the commands share: the model and data arguments (named as in transformers'
run_image_classification.py), one-line errors, the Hub checks and loading, and reading a run's
`config.deelbo`."""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field

# run_image_classification.py's default model, used when a dataset is given without a model.
DEFAULT_HUB_MODEL = "google/vit-base-patch16-224-in21k"


EMBEDDED_TEST_FRACTION = 0.3  # of digits 5-9, held out for evaluation


# TrainingArguments' seed: what `train` split the embedded digits with when nothing says otherwise.
DEFAULT_SEED = 42


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
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Accepted as in run_image_classification.py; the model is always loaded from "
            "--model_name_or_path (fine-tuning needs pretrained weights)."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the model's."}
    )
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one from `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom models defined on the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise the head when the checkpoint's number of labels differs."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to fine-tune on (names as in run_image_classification.py)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id. Default: scikit-learn's digits 5-9."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder with the training data (one sub-folder per class)."}
    )
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


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing written."""


class RunFailed(Exception):
    """A run that had started failed: one line with the cause and what was kept (every complete
    checkpoint and file the run wrote); exit status `status` (1, 2 for bad data, 130 on Ctrl-C)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class OneLineErrors:
    """argparse reports a bad value after printing the whole usage (130 lines for `train`); here it is
    one `UsageError` line naming the flag and the value (and, for a `Choice` flag, what each choice
    means)."""

    choice_enums: dict = {}  # option string -> the `Choice` enum of its field

    def error(self, message: str):
        match = re.match(r"argument (\S+): invalid choice", message)
        choice = self.choice_enums.get(match.group(1).split("/")[0]) if match else None
        if choice is not None:
            message += f"; {match.group(1).split('/')[0].lstrip('-')} must be {choice.described()}"
        raise UsageError(f"{message}; `{self.prog} --help` lists the flags.")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    pass


def hf_argument_parser(dataclass_types, prog: str):
    """transformers' `HfArgumentParser` with one-line errors and no prefix matching (`--max_step`
    is an error, not `--max_steps`)."""
    from transformers import HfArgumentParser

    class Parser(OneLineErrors, HfArgumentParser):
        pass

    parser = Parser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.choice_enums = _choice_enums(parser, dataclass_types)
    return parser


def _choice_enums(parser, dataclass_types) -> dict:
    """Option string -> `Choice` enum, for every flag whose field is one."""
    import dataclasses
    import typing

    from ..core.choices import Choice

    enum_fields = {}
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for f in dataclasses.fields(dataclass_type):
            if isinstance(hints.get(f.name), type) and issubclass(hints[f.name], Choice):
                enum_fields[f.name] = hints[f.name]
    return {
        option: enum_fields[a.dest] for a in parser._actions if a.dest in enum_fields for option in a.option_strings
    }


def accept_negative_numbers(parser) -> None:
    """Values like `-1e-4` and `-inf` read as numbers, not flags: argparse only knows plain negative
    integers and decimals (`-3`, `-0.5`), and reports `--sigma_init -1e-4` as a flag missing its
    value; read as a number, the value reaches the flag's own check ("must be > 0; got -0.0001")."""
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def refuse_unknown_flags(parser, argv: list[str]) -> None:
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


def looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)


def _check_model_path(name: str) -> None:
    if looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(
            f"--model_name_or_path {name!r} is not a directory; pass a saved model directory or a Hub model id."
        )


def require_hub(what: str, local_alternative: str) -> None:
    """A one-line error at once, instead of a minute of retries, when `what` needs an unreachable Hub."""
    from ..hub.push import HubUnreachableError, check_hub_reachable

    try:
        check_hub_reachable(what, local_alternative)
    except HubUnreachableError as error:
        raise UsageError(str(error)) from None


def check_model_source(name: str) -> None:
    """A local directory, or a Hub id with the Hub in reach (or offline mode)."""
    _check_model_path(name)
    if not os.path.isdir(os.path.expanduser(name)):
        require_hub(f"--model_name_or_path {name!r}", "a saved model directory")


def load_pretrained_classifier(model_args, num_labels: int | None = None, id2label: dict | None = None):
    """`hub.load_classifier` with the command line's arguments and one-line errors."""
    from ..hub.loading import load_classifier

    name = model_args.model_name_or_path
    check_model_source(name)
    try:
        return load_classifier(
            name,
            num_labels,
            id2label,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            config_name=model_args.config_name,
            image_processor_name=model_args.image_processor_name,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as error:
        raise UsageError(f"--model_name_or_path {name!r} could not be loaded: {str(error).splitlines()[0]}") from None
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused a pickled weights file
        raise UsageError(
            f"--model_name_or_path {name!r} holds pickled weights with more than tensors, which are never unpickled "
            f"({str(error).split('.')[0]}); load a model saved as model.safetensors."
        ) from None
    except RuntimeError as error:
        if "size mismatch" in str(error) or "mismatched" in str(error):
            raise UsageError(
                f"--model_name_or_path {name!r} has a head of another size; pass --ignore_mismatched_sizes true."
            ) from None
        raise


def read_deelbo(path_or_repo: str, token: str | None = None, revision: str | None = None):
    """The learned hyperparameters (a `DEELBoConfig`) of an output directory or Hub repo (a full model
    or a PEFT adapter), read by the package's one reader (`DEELBoConfig.from_pretrained`); bad input
    is one UsageError."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from ..hub.config import ADAPTER_CONFIG_ENTRIES_NAME
    from ..methods.deelbo.config import DEELBO, DEELBoConfig

    if os.path.isdir(path_or_repo):
        if not any(
            os.path.isfile(os.path.join(path_or_repo, name)) for name in ("config.json", ADAPTER_CONFIG_ENTRIES_NAME)
        ):
            raise UsageError(f"{path_or_repo!r} has no config.json; pass a directory written by hf-deelbo train.")
        hub_kwargs = {}
    else:
        if looks_like_local_path(path_or_repo):
            raise UsageError(f"{path_or_repo!r} is not a directory; pass an output directory or a Hub repo id.")
        require_hub(repr(path_or_repo), "an output directory")
        hub_kwargs = {"token": token, "revision": revision}
    try:
        return DEELBoConfig.from_pretrained(path_or_repo, **hub_kwargs)
    except KeyError:
        raise UsageError(
            f"{path_or_repo!r} has no `{DEELBO.key}` entry in its config: it was not trained by hf-deelbo."
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise UsageError(
            f"Cannot read config.json of {path_or_repo!r} from the Hub: {str(error).splitlines()[0]}"
        ) from None
    except (ValueError, OSError) as error:  # FileNotFoundError included
        raise UsageError(str(error).splitlines()[0]) from None
