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

    The `pretrained_cfg` keys that name where the *pretrained* weights came from (timm's tag such
    as `c3_in1k`, origin and download URLs, paper ids) are dropped: they do not describe the
    fine-tuned weights. The preprocessing keys (input size, mean, std, ...) stay: they are the
    ones the model was fine-tuned with when its inputs follow `timm.data.resolve_data_config`.
    """
    import tempfile

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
    "tag", "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "origin_url", "paper_ids",
    "paper_name", "notes",
)


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


# What each entry of config.json the package writes must hold: key -> (kind, required). Kinds:
# "positive" a finite float > 0; "nonnegative" a finite float >= 0; "strengths" a nonnegative
# float or a dict of them (per-tensor values); "radii" None or a dict of floats >= 0; "count" an
# int >= 0; "names" a list of non-empty strings; "text" a string; "flag" a bool; "version" the entry's
# format version, an int from 1 to the version this package writes (`ENTRY_FORMAT_VERSIONS`).
ENTRY_SCHEMAS = {
    DEELBO_CONFIG_KEY: {
        "lambda": ("positive", True), "tau": ("positive", True), "sigma": ("positive", True),
        "kappa": ("positive", True), "alpha_eff": ("nonnegative", False), "beta_eff": ("nonnegative", False),
        "num_train_examples": ("count", True), "num_backbone_params": ("count", True),
        "num_head_params": ("count", True), "head_modules": ("names", False), "format_version": ("version", False),
    },
    "l2sp": {
        "alpha": ("nonnegative", True), "beta": ("nonnegative", True), "head_modules": ("names", False),
        "num_backbone_params": ("count", False), "num_head_params": ("count", False),
    },
    "tpgm": {
        "radii": ("radii", False), "norm": ("text", False), "projection_steps": ("count", False),
        "head_modules": ("names", False), "num_backbone_params": ("count", False),
        "num_head_params": ("count", False), "format_version": ("version", False),
    },
    "t1t2": {
        "alpha": ("strengths", True), "beta": ("strengths", True), "hyper_learning_rate": ("positive", False),
        "hyper_steps": ("count", False), "per_layer_strengths": ("flag", False), "head_modules": ("names", False),
        "num_backbone_params": ("count", False), "num_head_params": ("count", False),
        "format_version": ("version", False),
    },
}
ENTRY_FORMAT_VERSIONS = {DEELBO_CONFIG_KEY: DEELBO_FORMAT_VERSION, "tpgm": 1, "t1t2": 1}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(kind: str, value, key: str, entry_key: str) -> str | None:
    import math

    if kind in ("positive", "nonnegative"):
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (kind == "positive" and value == 0):
            return f"must be a finite number {'> 0' if kind == 'positive' else '>= 0'}"
    elif kind == "strengths":
        values = list(value.values()) if isinstance(value, dict) else [value]
        if not values or not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in values):
            return "must be a finite number >= 0, or a dict of them"
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
        supported = ENTRY_FORMAT_VERSIONS[entry_key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return "must be an int >= 1"
        if value > supported:
            return f"is newer than this hf_deelbo reads ({supported}): upgrade hf_deelbo"
    return None


def read_config_entry(config, key: str = DEELBO_CONFIG_KEY, source: str = "the model's config") -> dict:
    """The validated `key` entry (`deelbo`, `l2sp`, `tpgm`, `t1t2`) of a config: a dict (as read
    from config.json) or an object with that attribute (`model.config`). The one reader of these
    entries: `show`, `evaluate`, `load_classifier` and `posterior_from_config` go through it.

    Raises:
        KeyError: the config has no such entry.
        ValueError: the entry is malformed; the message names the key, the value and `source`.
    """
    entry = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if entry is None:
        raise KeyError(f"{source} has no {key!r} entry: the model was not trained with it.")
    fix = "fix config.json or save the model again with the trainer"
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: {key!r} must be a JSON object of hyperparameters; got {entry!r}; {fix}.")
    for name, (kind, required) in ENTRY_SCHEMAS[key].items():
        if name not in entry:
            if required:
                raise ValueError(f"{source}: {key!r} has no {name!r} (keys: {sorted(entry)}); {fix}.")
            continue
        problem = _value_problem(kind, entry[name], name, key)
        if problem:
            raise ValueError(f"{source}: {key}.{name} {problem}; got {entry[name]!r}; {fix}.")
    return entry


def load_deelbo_config(path: str) -> dict:
    """Read `deelbo` from the config.json of a saved model directory (validated, `read_config_entry`).

    Raises:
        FileNotFoundError: no config.json in `path`.
        KeyError: config.json has no `deelbo` entry (the model was not trained with DEELBoTrainer).
        ValueError: config.json is not JSON, or its `deelbo` entry is malformed.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in {path}: is it a saved model directory?")
    return read_config_entry(read_json_config(config_file), DEELBO_CONFIG_KEY, config_file)


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
    """Validate every entry of `CONFIG_KEYS` the config holds."""
    for key in CONFIG_KEYS:
        present = key in config if isinstance(config, dict) else getattr(config, key, None) is not None
        if present:
            read_config_entry(config, key, source)


# Seconds a request to the Hub may wait for an answer (a commit that never answers fails instead of
# hanging): HF_DEELBO_HUB_TIMEOUT, default 300. Connecting is limited to 10 s.
DEFAULT_HUB_TIMEOUT = 300.0


def set_hub_timeout(seconds: float | None = None) -> None:
    """Give huggingface_hub's HTTP client a timeout (its default waits forever), through its own
    `set_client_factory`. A client factory the user installed is left alone."""
    import httpx2
    from huggingface_hub.utils import _http

    if seconds is None:
        seconds = float(os.environ.get("HF_DEELBO_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT))
    current = _http._GLOBAL_CLIENT_FACTORY
    if current is not _http.default_client_factory and not getattr(current, "hf_deelbo_timeout", None):
        return
    if getattr(current, "hf_deelbo_timeout", None) == seconds:
        return

    def client_factory() -> httpx2.Client:
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(seconds, connect=min(10.0, seconds))
        return client

    client_factory.hf_deelbo_timeout = seconds
    _http.set_client_factory(client_factory)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output directory is untouched. `reason`: the cause
    and what to do, in a few words; `status_code`: the HTTP status, if the Hub answered."""

    def __init__(self, message: str, reason: str = "", status_code: int | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.status_code = status_code


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


def push_error(error: Exception, output_dir: str, repo_id: str | None, wrote_output: bool = True) -> HubPushError:
    """One clear error for a failed push: the cause (the HTTP status where the Hub answered: 401/403
    name the token), what to do, and, once something was written (`wrote_output`), that nothing
    local was lost."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HubPushError):
        return error
    cause = error
    while not isinstance(cause, (HfHubHTTPError, httpx2.TimeoutException)) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    target = repo_id or "namespace/name"
    if status in (401, 403):
        action = (
            f"the Hub refused the token ({status}): log in with `hf auth login` (or set HF_TOKEN / pass --token) "
            f"with a token that may write to {target}"
        )
    elif isinstance(cause, httpx2.TimeoutException):
        action = (f"the Hub did not answer within the timeout ({type(cause).__name__}; HF_DEELBO_HUB_TIMEOUT sets it); "
                  "push again later")
    elif status is not None:
        action = f"the Hub answered {status} ({text}); push again later"
    else:
        action = f"the Hub is unreachable ({type(cause).__name__}: {text}); push again once it is reachable"
    if wrote_output:
        then = (f"The local output in {output_dir} is intact; {action} (trainer.push_to_hub(), or "
                f"hf-deelbo push {output_dir} --repo_id {target}).")
    else:
        then = f"Nothing was trained or written yet; {action}, then start again."
    return HubPushError(f"Could not push to {constants.ENDPOINT}/{repo_id or ''}: {then}", reason=action,
                        status_code=status)


def load_timm_model(path: str, **kwargs) -> nn.Module:
    """A raw timm model from a directory in timm's format, with the hyperparameters of its
    config.json (if any) as `model.<key>_config` for each key of `CONFIG_KEYS`."""
    import timm

    config = read_json_config(os.path.join(path, "config.json"))
    check_config_entries(config, os.path.join(path, "config.json"))
    model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
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
        config = read_json_config(local_config)
        if "architecture" in config and "model_type" not in config:
            model = load_timm_model(os.path.expanduser(name_or_path))
            if num_labels is not None and num_labels != model.num_classes:
                model.reset_classifier(num_labels)
                classifier = model.get_classifier()
                return model, None, [next(n for n, m in model.named_modules() if m is classifier)]
            return model, None, None
    config = AutoConfig.from_pretrained(config_name or name_or_path, **hub_kwargs)
    check_config_entries(config, f"config.json of {config_name or name_or_path}")
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


class HubUnreachableError(OSError):
    """The Hub does not answer: raised before any download, in one line saying how to work offline."""


def check_hub_reachable(what: str, local_alternative: str, timeout: float = 5.0) -> None:
    """Fail fast when `what` (e.g. "--dataset_name 'beans'") needs the Hub and the Hub does not
    answer: huggingface_hub and datasets retry a refused or timed-out connection for 20-60 s and
    then raise a long traceback. One HEAD request to `HF_ENDPOINT` (any HTTP status means it
    answers). Nothing is checked in offline mode (`HF_HUB_OFFLINE=1`), where the libraries read
    their caches only.

    Raises:
        HubUnreachableError: naming `what`, the endpoint, the cause, `HF_HUB_OFFLINE=1` and
            `local_alternative` (what to pass instead, e.g. "--train_dir DIR").
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any transport error means the Hub is out of reach
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubUnreachableError(
            f"{what} is on the Hub, which cannot be reached ({constants.ENDPOINT}: {reason}). To work offline, set "
            f"HF_HUB_OFFLINE=1 (what is already in the cache is used) or pass {local_alternative}."
        ) from None
