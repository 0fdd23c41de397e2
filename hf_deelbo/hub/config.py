"""The entries the package writes into a model's config.json (`config.<key>`, one per method of
the registry): storing them on a model, and the one reader that checks them against the
method's typed, versioned schema (`hf_deelbo.registry.MethodSpec`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import fields
from typing import ClassVar

from torch import nn
from transformers.utils import logging as transformers_logging

from ..registry import MethodSpec, config_keys, method_spec

logger = transformers_logging.get_logger(__name__)

# Where a PEFT adapter's entries go. `PeftModel.save_pretrained` writes adapter_config.json (a
# `PeftConfig`: `from_pretrained` drops keys it does not know, with a warning to upgrade peft) and
# not the base model's config.json, so the entries get a file of their own next to the adapter,
# holding what config.json would: `{<key>: <entry>}`. A config.json there would make the directory
# look like a full model to transformers.
ADAPTER_CONFIG_ENTRIES_NAME = "hf_deelbo_config.json"


def set_model_config_entry(model: nn.Module, key: str, values: dict) -> None:
    """Store `values` as `model.config.<key>` for transformers models (saved in config.json). Raw
    timm models have no such config: they get `model.<key>_config`, written to timm's config.json
    by `save_timm_config`."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, key, values)
    else:
        setattr(model, f"{key}_config", values)


def save_adapter_config_entries(output_dir: str, entries: dict) -> str:
    """Write `entries` (`{<key>: <entry>}`) to `output_dir/ADAPTER_CONFIG_ENTRIES_NAME` as sorted JSON,
    next to a PEFT adapter's adapter_config.json; returns the file's path."""
    path = os.path.join(output_dir, ADAPTER_CONFIG_ENTRIES_NAME)
    _write_json(path, entries)
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(kind: str, value, entry_key: str) -> str | None:
    if kind in ("positive", "nonnegative"):
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (kind == "positive" and value == 0):
            return f"must be a finite number {'> 0' if kind == 'positive' else '>= 0'}"
    elif kind == "strengths":
        values = list(value.values()) if isinstance(value, dict) else [value]
        if not values or not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in values):
            return "must be a finite number >= 0, or a dict of them"
    elif kind == "variances":
        if not (
            isinstance(value, dict)
            and value
            and all(isinstance(k, str) and _is_number(v) and math.isfinite(v) and v > 0 for k, v in value.items())
        ):
            return "must be a non-empty dict of names to finite numbers > 0"
    elif kind == "radii":
        if value is not None and not (
            isinstance(value, dict) and all(_is_number(v) and math.isfinite(v) and v >= 0 for v in value.values())
        ):
            return "must be null or a dict of finite numbers >= 0"
    elif kind == "count":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return "must be an int >= 0"
    elif kind == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return "must be a list of module names"
    elif kind == "text":
        if not isinstance(value, str):
            return "must be a string"
    elif kind == "flag":
        if not isinstance(value, bool):
            return "must be true or false"
    elif kind == "version":
        supported = method_spec(entry_key).format_version or 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return "must be an int >= 1"
        if value > supported:
            return f"is newer than this hf_deelbo reads ({supported}): upgrade hf_deelbo"
    return None


def read_config_entry(config, key: str, source: str = "the model's config") -> dict:
    """The validated `key` entry (a registered method's, e.g. `config.deelbo`) of a config: a dict
    (as read from config.json) or an object with that attribute (`model.config`). The one reader of
    these entries: `show`, `evaluate`, `load_classifier` and `posterior_from_config` go through it.

    Raises:
        KeyError: the config has no such entry.
        ValueError: the entry is malformed; the message names the key, the value and `source`.
    """
    fix = "fix config.json or save the model again with the trainer"
    if isinstance(config, dict) and key in config and config[key] is None:
        raise ValueError(f"{source}: {key!r} is null, not a JSON object of hyperparameters; {fix}.")
    entry = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if entry is None:
        raise KeyError(f"{source} has no {key!r} entry: the model was not trained with it.")
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: {key!r} must be a JSON object of hyperparameters; got {entry!r}; {fix}.")
    schema = method_spec(key).schema
    unknown = sorted(set(entry) - set(schema))
    if unknown:
        logger.warning_once(
            f"{source}: {key!r} has keys this version of hf_deelbo does not know, which it ignores: {unknown} "
            "(written by a newer hf_deelbo, or edited by hand)."
        )
    for name, (kind, required) in schema.items():
        if name not in entry:
            if required:
                raise ValueError(f"{source}: {key!r} has no {name!r} (keys: {sorted(entry)}); {fix}.")
            continue
        problem = _value_problem(kind, entry[name], key)
        choices = method_spec(key).choices.get(name)
        if problem is None and choices is not None and entry[name] not in choices:
            problem = f"must be one of {list(choices)}"
        if problem:
            raise ValueError(f"{source}: {key}.{name} {problem}; got {entry[name]!r}; {fix}.")
    for (name, value), companion in method_spec(key).companions.items():
        if entry.get(name) == value and companion not in entry:
            raise ValueError(
                f"{source}: {key}.{name} is {value!r}, which needs {key}.{companion}, and it is missing; {fix}."
            )
    return entry


class MethodConfig:
    """A registered method's entry of config.json as a typed, versioned object (peft's
    `PeftConfigMixin` is the model). Subclasses are dataclasses of `registry.entry_field`s, registered
    with `MethodSpec(config_class=...)`, which sets `method` (the key, schema and format version).

    `to_dict()` is the JSON entry (the format version added, keys sorted); `from_dict`,
    `from_model_config` and `from_pretrained` read one through `read_config_entry` (validated, keys
    this version does not know warned once and ignored, a newer format version refused);
    `save_pretrained` writes it into a saved model's config.json or a PEFT adapter's entries file.
    """

    method: ClassVar[MethodSpec]

    def to_dict(self) -> dict:
        """The JSON dict stored as `config.<key>`: every value set (None only where its kind takes it)."""
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None or item.metadata["kind"] == "radii":
                values[item.metadata.get("name") or item.name] = _json_value(value)
        return self.method.config_entry(values)

    @classmethod
    def from_dict(cls, entry: dict, source: str = "the config entry"):
        """The typed entry of `entry` (a dict as stored in config.json), validated.

        Raises:
            ValueError: the entry is malformed; the message names the key, the value and `source`.
        """
        return cls.from_model_config({cls.method.key: entry}, source)

    @classmethod
    def from_model_config(cls, config, source: str = "the model's config"):
        """The typed entry of a model's config: `model.config`, or config.json as a dict.

        Raises:
            KeyError: the config has no entry of this method.
            ValueError: the entry is malformed.
        """
        entry = read_config_entry(config, cls.method.key, source)
        values = {}
        for item in fields(cls):
            name = item.metadata.get("name") or item.name
            if name in entry:
                values[item.name] = entry[name]
        return cls(**values)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **hub_kwargs):
        """The entry of a saved model (its config.json) or of a saved PEFT adapter (its
        `ADAPTER_CONFIG_ENTRIES_NAME`): a local directory or a Hub repo id (`hub_kwargs`, e.g.
        revision or token, go to `hf_hub_download`).

        Raises:
            FileNotFoundError: neither file in the directory (or the repo).
            KeyError: the file has no entry of this method.
            ValueError: the file is not JSON, or the entry is malformed.
        """
        config_file = config_file_of(pretrained_model_name_or_path, **hub_kwargs)
        return cls.from_model_config(read_json_config(config_file), config_file)

    def save_pretrained(self, save_directory: str) -> str:
        """Write the entry into `save_directory`'s config.json (a saved model: its other keys kept),
        else into its `ADAPTER_CONFIG_ENTRIES_NAME` (a PEFT adapter: other methods' entries kept);
        the file is replaced whole, never left half written. Returns the file's path."""
        model_config = os.path.join(save_directory, "config.json")
        if os.path.isfile(model_config):
            path = model_config
        else:
            path = os.path.join(save_directory, ADAPTER_CONFIG_ENTRIES_NAME)
        config = read_json_config(path) if os.path.isfile(path) else {}
        config[self.method.key] = self.to_dict()
        _write_json(path, config)
        return path


def _json_value(value):
    """A field's value as JSON holds it (tuples as lists; dicts and lists copied)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _write_json(path: str, content: dict) -> None:
    """`content` as indented, sorted JSON at `path`, through a temporary file and an atomic rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(temporary, 0o644)  # as open() would make it, not mkstemp's owner-only mode
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def config_file_of(path: str, **hub_kwargs) -> str:
    """The local copy of the file holding a trained model's entries: config.json (a saved model),
    else `ADAPTER_CONFIG_ENTRIES_NAME` (a saved PEFT adapter), in a directory or a Hub repo."""
    return _local_config_file(path) if os.path.isdir(path) else _download_config_file(path, **hub_kwargs)


def load_config_entry(path: str, key: str, **hub_kwargs) -> dict:
    """Read the `key` entry of a model trained by the package (validated, `read_config_entry`): from
    the config.json of a saved model, or the `ADAPTER_CONFIG_ENTRIES_NAME` file of a saved PEFT
    adapter; `path` is a local directory or a Hub repo id of either (`hub_kwargs`, e.g. revision or
    token, go to `hf_hub_download`). The one reader of the entries: the CLI's `show`, `push` and
    `evaluate` read through it too.

    Raises:
        FileNotFoundError: neither file in `path` (or the repo).
        KeyError: the file has no `key` entry (the model was not trained with that method).
        ValueError: the file is not JSON, or its entry is malformed.
    """
    config_file = config_file_of(path, **hub_kwargs)
    return read_config_entry(read_json_config(config_file), key, config_file)


def _local_config_file(path: str) -> str:
    """config.json of a saved model, else the entries file of a saved PEFT adapter, in directory `path`."""
    for name in ("config.json", ADAPTER_CONFIG_ENTRIES_NAME):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(
        f"No config.json (a saved model) or {ADAPTER_CONFIG_ENTRIES_NAME} (a saved PEFT adapter) in {path}: "
        "is it a directory saved by the trainer?"
    )


def _download_config_file(repo_id: str, **hub_kwargs) -> str:
    """The local copy of a Hub repo's config.json (a full model), else of its
    `ADAPTER_CONFIG_ENTRIES_NAME` (a PEFT adapter pushed by the trainer)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    for name in ("config.json", ADAPTER_CONFIG_ENTRIES_NAME):
        try:
            return hf_hub_download(repo_id, name, **hub_kwargs)
        except HFValidationError:
            raise FileNotFoundError(f"{repo_id} is neither a directory nor a Hub repo id.") from None
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(
        f"The Hub repo {repo_id} has neither config.json (a full model) nor {ADAPTER_CONFIG_ENTRIES_NAME} (a PEFT "
        "adapter pushed by the trainer)."
    )


def read_json_config(config_file: str) -> dict:
    """config.json as a dict, or one ValueError naming the file."""
    try:
        with open(config_file) as f:
            config = json.load(f)
    except ValueError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); fix or replace it.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object; got {type(config).__name__}.")
    return config


def check_config_entries(config, source: str) -> None:
    """Validate every registered method's entry the config holds."""
    for key in config_keys():
        present = key in config if isinstance(config, dict) else getattr(config, key, None) is not None
        if present:
            read_config_entry(config, key, source)
