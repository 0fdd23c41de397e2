"""Learned hyperparameters ⇄ the model's config (`config.deelbo` in config.json)."""

from __future__ import annotations

import json
import os

from torch import nn

from .objective import effective_l2sp_strengths

DEELBO_CONFIG_KEY = "deelbo"
DEELBO_FORMAT_VERSION = 1


def deelbo_config(
    *,
    backbone_prior_variance: float,
    head_prior_variance: float,
    sigma: float,
    kappa: float,
    num_train_examples: int,
    num_backbone_params: int,
    num_head_params: int,
    head_modules: list[str],
) -> dict:
    """The JSON dict stored as `config.deelbo`, keys sorted.

    `lambda`, `tau`: learned prior variances of backbone and head; `sigma`: posterior std;
    `kappa`: data emphasis; `alpha_eff`, `beta_eff`: the equivalent L2-SP strengths 1/(Dλ), 1/(Dτ).
    """
    alpha_eff, beta_eff = effective_l2sp_strengths(
        backbone_prior_variance, head_prior_variance, num_backbone_params + num_head_params
    )
    values = {
        "alpha_eff": float(alpha_eff),
        "beta_eff": float(beta_eff),
        "format_version": DEELBO_FORMAT_VERSION,
        "head_modules": list(head_modules),
        "kappa": float(kappa),
        "lambda": float(backbone_prior_variance),
        "num_backbone_params": int(num_backbone_params),
        "num_head_params": int(num_head_params),
        "num_train_examples": int(num_train_examples),
        "sigma": float(sigma),
        "tau": float(head_prior_variance),
    }
    return dict(sorted(values.items()))


def set_model_deelbo_config(model: nn.Module, values: dict) -> None:
    """Store `values` on the model: `model.config.deelbo` for transformers models, and
    `model.pretrained_cfg["deelbo"]` for raw timm models (written to config.json on save)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, DEELBO_CONFIG_KEY, values)
    elif isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.deelbo_config = values


def save_timm_config(model: nn.Module, output_dir: str) -> None:
    """Write timm's config.json (loadable by `timm.create_model("local-dir:...")` and the Hub)
    with the learned hyperparameters under `deelbo`."""
    from timm.models._hub import save_config_for_hf

    model_config = {}
    if getattr(model, "deelbo_config", None) is not None:
        model_config[DEELBO_CONFIG_KEY] = model.deelbo_config
    save_config_for_hf(model, os.path.join(output_dir, "config.json"), model_config=model_config)


def load_deelbo_config(path: str) -> dict:
    """Read `deelbo` from the config.json of a saved model directory.

    Raises:
        FileNotFoundError: no config.json in `path`.
        KeyError: config.json has no `deelbo` entry (the model was not trained with DEELBoTrainer).
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in {path}: is it a saved model directory?")
    with open(config_file) as f:
        config = json.load(f)
    if DEELBO_CONFIG_KEY not in config:
        raise KeyError(f"{config_file} has no '{DEELBO_CONFIG_KEY}' entry: the model was not trained by DEELBoTrainer.")
    return config[DEELBO_CONFIG_KEY]


def load_timm_model(path: str, **kwargs) -> nn.Module:
    """A raw timm model from a directory in timm's format, with the learned hyperparameters of
    its config.json (if any) as `model.deelbo_config`."""
    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if DEELBO_CONFIG_KEY in config:
        model.deelbo_config = config[DEELBO_CONFIG_KEY]
    return model
