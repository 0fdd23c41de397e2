"""Calling a classifier, whatever library built it: transformers models take keyword features and
return `.logits`; timm and plain `nn.Module` classifiers take `pixel_values` and return logits.
The label columns are never passed to the model."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .adapters import peft_base_model

LABEL_KEYS = ("labels", "label", "label_ids")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a DDP / DataParallel / compiled wrapper) is a transformers
    model, or a `peft.PeftModel` adapting one (called as the model it adapts is)."""
    from accelerate.utils import extract_model_from_parallel
    from transformers import PreTrainedModel

    return isinstance(peft_base_model(extract_model_from_parallel(model)), PreTrainedModel)


def classifier_logits(
    model: nn.Module,
    inputs: dict,
    parameters: dict | None = None,
    transformers_model: bool | None = None,
    *,
    tie_weights: bool = True,
) -> torch.Tensor:
    """Logits of a classifier on `inputs`, at its own weights or at `parameters` (name → tensor).
    `tie_weights=False` when `parameters` already names every alias of a tied weight
    (`IsotropicGaussianPosterior.sample_parameters`), as in `torch.func.functional_call`.

    transformers models are called as `model(**features).logits`; other models (timm) as
    `model(pixel_values)`. Label columns are never passed to the model.
    """
    if transformers_model is None:
        transformers_model = is_transformers_model(model)
    features = {k: v for k, v in inputs.items() if k not in LABEL_KEYS}
    if transformers_model:
        args, kwargs = (), features
    else:
        args, kwargs = (features["pixel_values"],), {}
    if parameters is None:
        outputs = model(*args, **kwargs)
    else:
        outputs = functional_call(model, parameters, args, kwargs, strict=False, tie_weights=tie_weights)
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]
