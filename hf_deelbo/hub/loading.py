"""Loading a pretrained classifier (Hub id, transformers directory or timm directory) with a head
for the user's labels, and the names of the newly initialised head."""

from __future__ import annotations

import os

from .config import check_config_entries, read_json_config
from .timm import load_timm_model


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
        name_or_path,
        config=config,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        output_loading_info=True,
        **hub_kwargs,
    )
    try:
        processor = AutoImageProcessor.from_pretrained(image_processor_name or name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        processor = None
    return model, processor, head_modules_from_loading_info(model, info)


def head_modules_from_loading_info(model, loading_info: dict) -> list[str] | None:
    """Module names of the parameters `from_pretrained(..., output_loading_info=True)` reports as
    newly initialised (missing or size-mismatched keys): exactly the new head. `None` when
    nothing was newly initialised (the checkpoint already had a head of the right size)."""
    new_keys = set(loading_info.get("missing_keys", ())) | {k[0] for k in loading_info.get("mismatched_keys", ())}
    parameter_names = {name for name, p in model.named_parameters() if p.requires_grad}
    modules = sorted({key.rsplit(".", 1)[0] for key in new_keys if key in parameter_names})
    return modules or None
