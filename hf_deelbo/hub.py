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


# Entries the package writes into config.json: DE ELBO's learned values, the L2-SP baseline's
# settings, TPGM's learned radii and T1–T2's learned strengths.
CONFIG_KEYS = (DEELBO_CONFIG_KEY, "l2sp", "tpgm", "t1t2")


def set_model_config_entry(model: nn.Module, key: str, values: dict) -> None:
    """Store `values` as `model.config.<key>` for transformers models (saved in config.json). Raw
    timm models have no such config: they get `model.<key>_config`, written to timm's config.json
    by `save_timm_config`."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, key, values)
    else:
        setattr(model, f"{key}_config", values)


def _timm_config(model: nn.Module, model_config: dict | None = None) -> dict:
    """timm's config.json content for a timm model, loadable by timm and by transformers.

    timm 1.0.31 records `num_classes` in `model_args` as well as at the top level, and
    `TimmWrapperForImageClassification` then fails with "got multiple values for keyword argument
    'num_classes'"; the top-level value is the one both libraries read, so `model_args` drops it.
    """
    import tempfile

    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        save_config_for_hf(model, path, model_config=model_config)
        with open(path) as f:
            config = json.load(f)
    config["model_args"] = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    return config


def save_timm_config(model: nn.Module, output_dir: str) -> None:
    """Write timm's config.json (loadable by `timm.create_model("hf-hub:...")` or
    `"local-dir:..."`, and by transformers' `TimmWrapperForImageClassification`) with the learned
    hyperparameters under `deelbo`."""
    model_config = {k: getattr(model, f"{k}_config") for k in CONFIG_KEYS if getattr(model, f"{k}_config", None)}
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


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output directory is untouched."""


def check_repo_namespace(repo_id: str, token: str | bool | None = None) -> str:
    """`namespace/name` for `repo_id`: as given, or with the logged-in user's namespace.

    Raises:
        HubPushError: `repo_id` has no namespace and no Hub login tells whose it is.
    """
    if "/" in repo_id:
        return repo_id
    from huggingface_hub import HfApi

    try:
        namespace = HfApi().whoami(token=token)["name"]
    except Exception as error:  # noqa: BLE001 - no token, an invalid one, or an unreachable Hub
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubPushError(
            f"repo id {repo_id!r} has no namespace and the Hub cannot tell whose it is ({reason}). "
            f"Pass 'your-namespace/{repo_id}', or log in with `hf auth login`."
        ) from None
    return f"{namespace}/{repo_id}"


def push_error(error: Exception, output_dir: str, repo_id: str | None) -> HubPushError:
    """One clear error for a failed push, saying that nothing local was lost."""
    from huggingface_hub import constants

    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return HubPushError(
        f"Could not push {output_dir} to {constants.ENDPOINT}/{repo_id or ''} ({type(error).__name__}: {reason}). "
        f"The local output in {output_dir} is intact; push again once the Hub is reachable "
        f"(trainer.push_to_hub(), or hf-deelbo push {output_dir} --repo_id {repo_id or 'namespace/name'})."
    )


def load_timm_model(path: str, **kwargs) -> nn.Module:
    """A raw timm model from a directory in timm's format, with the hyperparameters of its
    config.json (if any) as `model.<key>_config` for each key of `CONFIG_KEYS`."""
    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key in CONFIG_KEYS:
        if key in config:
            setattr(model, f"{key}_config", config[key])
    return model


def load_classifier(
    name_or_path: str,
    num_labels: int | None = None,
    id2label: dict | None = None,
    *,
    ignore_mismatched_sizes: bool = False,
    config_name: str | None = None,
    image_processor_name: str | None = None,
    **hub_kwargs,
):
    """A pretrained classifier with a head for `num_labels` labels: `(model, image_processor,
    head_modules)`; `head_modules` names the newly initialised parameters (from the loading info),
    or is None when nothing was newly initialised.

    - a local directory in timm's format (config.json with `architecture`, no `model_type`) loads
      as a raw timm model (`timm.create_model("local-dir:...")`), with `model.deelbo_config`;
    - anything else (Hub ids, transformers directories, timm repos on the Hub) loads with
      `AutoModelForImageClassification`; timm repos go through `TimmWrapperForImageClassification`,
      with `num_classes` dropped from `model_args` (written there by timm's `push_to_hf_hub`, it
      makes the wrapper fail with "multiple values for keyword argument 'num_classes'").

    `hub_kwargs` (cache_dir, revision, token, trust_remote_code) go to every `from_pretrained`.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from .groups import head_modules_from_loading_info

    local_config = os.path.join(os.path.expanduser(name_or_path), "config.json")
    if os.path.isfile(local_config):
        with open(local_config) as f:
            config = json.load(f)
        if "architecture" in config and "model_type" not in config:
            model = load_timm_model(os.path.expanduser(name_or_path))
            if num_labels is not None and num_labels != model.num_classes:
                model.reset_classifier(num_labels)
                classifier = model.get_classifier()
                return model, None, [next(n for n, m in model.named_modules() if m is classifier)]
            return model, None, None
    config = AutoConfig.from_pretrained(config_name or name_or_path, **hub_kwargs)
    if getattr(config, "model_type", None) == "timm_wrapper" and config.model_args:
        config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"} or None
    if num_labels is not None:
        id2label = id2label or {i: str(i) for i in range(num_labels)}
        config.num_labels = num_labels
        config.id2label = dict(id2label)
        config.label2id = {v: k for k, v in id2label.items()}
    model, info = AutoModelForImageClassification.from_pretrained(
        name_or_path, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes, output_loading_info=True,
        **hub_kwargs,
    )
    try:
        processor = AutoImageProcessor.from_pretrained(image_processor_name or name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        processor = None
    return model, processor, head_modules_from_loading_info(model, info)
