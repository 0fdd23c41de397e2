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
    (`GaussianPosterior.sample_parameters`), as in `torch.func.functional_call`.

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


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that track running statistics (timm's BatchNormAct2d included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm_statistics(model: nn.Module, batches, forward) -> int:
    """Recompute the BatchNorm running statistics at the model's current weights: reset, then the
    cumulative average of `forward(batch)` over `batches` in training mode (momentum None), as
    `torch.optim.swa_utils.update_bn` does for models called on a tensor. Returns the number of
    layers recomputed (0: nothing to do, `batches` untouched)."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=False):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)
