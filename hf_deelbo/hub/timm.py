"""timm portability: checkpoints that load with timm and with transformers' `TimmWrapper` alike.

timm 1.0.31 and `TimmWrapperForImageClassification` each write config.json in a way the other
cannot read (`_timm_config` says how); these functions write what both read.
"""

from __future__ import annotations

import json
import os

from torch import nn

from ..registry import config_keys
from .config import check_config_entries, read_json_config


def _timm_config(model: nn.Module, model_config: dict | None = None) -> dict:
    """timm's config.json content for a timm model, loadable by timm and by transformers.

    timm 1.0.31 records `num_classes` in `model_args` as well as at the top level, and
    `TimmWrapperForImageClassification` then fails with "got multiple values for keyword argument
    'num_classes'"; the top-level value is the one both libraries read, so `model_args` drops it.

    The `pretrained_cfg` keys that name where the *pretrained* weights came from (timm's tag such
    as `c3_in1k`, origin and download URLs, paper ids) are dropped: they do not describe the
    fine-tuned weights. The preprocessing keys (input size, mean, std, ...) stay: they are the
    ones the model was fine-tuned with when its inputs follow `timm.data.resolve_data_config`.
    """
    import tempfile

    # timm 1.0.31 has no public way to build this config alone: `timm.models.save_for_hf`, the public
    # export, writes the weights too, and `save_config_for_hf` writes to a path.
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        save_config_for_hf(model, path, model_config=model_config)
        with open(path) as f:
            config = json.load(f)
    config["model_args"] = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    pretrained_cfg = config.get("pretrained_cfg") or {}
    for key in PRETRAINED_SOURCE_KEYS:
        pretrained_cfg.pop(key, None)
    return config


# pretrained_cfg keys about the source of pretrained weights (timm's `PretrainedCfg` fields).
PRETRAINED_SOURCE_KEYS = (
    "tag",
    "url",
    "file",
    "state_dict",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
)


def save_timm_config(model: nn.Module, output_dir: str) -> None:
    """Write timm's config.json (loadable by `timm.create_model("hf-hub:...")` or
    `"local-dir:..."`, and by transformers' `TimmWrapperForImageClassification`) with the learned
    hyperparameters under `deelbo`."""
    model_config = {k: getattr(model, f"{k}_config") for k in config_keys() if getattr(model, f"{k}_config", None)}
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(_timm_config(model, model_config), f, indent=2)


def make_timm_wrapper_checkpoint_portable(model: nn.Module, output_dir: str) -> None:
    """Make a `TimmWrapperForImageClassification` checkpoint loadable by timm as well.

    `save_pretrained` of a wrapper built from a config writes `model_args: null`, no
    `pretrained_cfg`, and weights prefixed `timm_model.`; `timm.create_model("hf-hub:...")` then
    fails. This writes timm's native key names (which the wrapper also loads) and adds timm's
    `pretrained_cfg` and `model_args` to config.json, keeping every transformers key.
    """
    import safetensors.torch

    weights_file = os.path.join(output_dir, "model.safetensors")
    config_file = os.path.join(output_dir, "config.json")
    if not (os.path.isfile(weights_file) and os.path.isfile(config_file)):
        return
    state_dict = safetensors.torch.load_file(weights_file)
    if any(k.startswith("timm_model.") for k in state_dict):
        state_dict = {k.removeprefix("timm_model."): v for k, v in state_dict.items()}
        safetensors.torch.save_file(state_dict, weights_file, metadata={"format": "pt"})
    with open(config_file) as f:
        config = json.load(f)
    timm_config = _timm_config(model.timm_model)
    config["pretrained_cfg"] = timm_config["pretrained_cfg"]
    config["model_args"] = timm_config["model_args"]
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def is_timm_wrapper(model: nn.Module) -> bool:
    return type(model).__name__.startswith("TimmWrapper")


def load_timm_model(path: str, **kwargs) -> nn.Module:
    """A raw timm model from a directory in timm's format, with the hyperparameters of its
    config.json (if any) as `model.<key>_config` for each registered method."""
    import timm

    config = read_json_config(os.path.join(path, "config.json"))
    check_config_entries(config, os.path.join(path, "config.json"))
    model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    for key in config_keys():
        if key in config:
            setattr(model, f"{key}_config", config[key])
    return model
