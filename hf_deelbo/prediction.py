"""Prediction at the posterior mean or by Bayesian model averaging, inside or outside a trainer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .groups import split_parameters
from .posterior import IsotropicGaussianPosterior

LABEL_KEYS = ("labels", "label", "label_ids")


def is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) or isinstance(getattr(model, "module", None), PreTrainedModel)


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


@torch.no_grad()
def predictive_log_probs(
    model: nn.Module,
    inputs: dict,
    posterior: IsotropicGaussianPosterior | None = None,
    num_samples: int = 0,
    seed: int = 0,
    transformers_model: bool | None = None,
) -> torch.Tensor:
    """log p(y | x): log softmax f(x; m) when `num_samples` is 0, else the Bayesian model average

        log (1/S) Σ_s softmax f(x; m + σ ε_s),    ε_s ~ N(0, I)

    with draws from a generator seeded by `seed` (the global RNG is left untouched).
    """
    if num_samples == 0:
        return F.log_softmax(classifier_logits(model, inputs, None, transformers_model).float(), dim=-1)
    if posterior is None:
        raise ValueError("num_samples > 0 needs the posterior (see posterior_from_config) to draw weights from.")
    generator = torch.Generator(device=posterior.rho.device).manual_seed(seed)
    draws = torch.stack([
        F.log_softmax(
            classifier_logits(
                model, inputs, posterior.sample_parameters(model, generator), transformers_model, tie_weights=False
            ).float(),
            dim=-1,
        )
        for _ in range(num_samples)
    ])
    return torch.logsumexp(draws, dim=0) - math.log(num_samples)


def posterior_from_config(model: nn.Module) -> IsotropicGaussianPosterior:
    """Rebuild q(w) = N(m, σ²I) of a model saved by `DEELBoTrainer`: m are its weights, σ and
    the head split come from `model.config.deelbo` (or timm's `model.deelbo_config`).

    Example:

        model = AutoModelForImageClassification.from_pretrained("org/model")
        posterior = posterior_from_config(model)
        log_probs = predictive_log_probs(model, {"pixel_values": x}, posterior, num_samples=16)
    """
    from .hub import read_config_entry

    source = getattr(model, "config", None)
    if getattr(source, "deelbo", None) is None:
        source = {"deelbo": getattr(model, "deelbo_config", None)}
    try:
        config = read_config_entry(source, "deelbo", f"{type(model).__name__}'s config")
    except KeyError:
        raise ValueError(
            f"{type(model).__name__} carries no DE ELBO hyperparameters (config.deelbo): it was not saved by DEELBoTrainer."
        ) from None
    groups = split_parameters(model, config.get("head_modules"))
    return IsotropicGaussianPosterior(model, groups, sigma_init=float(config["sigma"]))
