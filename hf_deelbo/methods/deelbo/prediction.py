"""Prediction at the posterior mean or by Bayesian model averaging, inside or outside a trainer."""

from __future__ import annotations

import math
import os

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as transformers_logging

from ...core.groups import split_parameters
from ...core.modeling import classifier_logits
from .config import DEELBO, DEELBoConfig
from .posterior import POSTERIOR_RHO_NAME, GaussianPosterior

logger = transformers_logging.get_logger(__name__)


@torch.no_grad()
def predictive_log_probs(
    model: nn.Module,
    inputs: dict,
    posterior: GaussianPosterior | None = None,
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
    draws = torch.stack(
        [
            F.log_softmax(
                classifier_logits(
                    model, inputs, posterior.sample_parameters(model, generator), transformers_model, tie_weights=False
                ).float(),
                dim=-1,
            )
            for _ in range(num_samples)
        ]
    )
    return torch.logsumexp(draws, dim=0) - math.log(num_samples)


def posterior_from_config(model: nn.Module, model_dir: str | None = None) -> GaussianPosterior:
    """Rebuild q(w) = N(m, σ²I) of a model saved by `DEELBoTrainer`: m are its weights, σ and
    the head split come from `model.config.deelbo` (or timm's `model.deelbo_config`).

    A diagonal posterior (`posterior_covariance="diagonal"`) keeps its σ_i in
    `deelbo_posterior_rho.safetensors` next to the weights: pass the saved model's directory as
    `model_dir` to use them. Without it, every weight gets the stored root-mean-square σ, with a
    warning.

    Example:

        model = AutoModelForImageClassification.from_pretrained("org/model")
        posterior = posterior_from_config(model)
        log_probs = predictive_log_probs(model, {"pixel_values": x}, posterior, num_samples=16)
    """
    source = getattr(model, "config", None)
    if getattr(source, DEELBO.key, None) is None:
        source = {DEELBO.key: getattr(model, f"{DEELBO.key}_config", None)}
    try:
        config = DEELBoConfig.from_model_config(source, f"{type(model).__name__}'s config")
    except KeyError:
        raise ValueError(
            f"{type(model).__name__} carries no DE ELBO hyperparameters (config.deelbo): it was not saved by DEELBoTrainer."
        ) from None
    groups = split_parameters(model, config.head_modules)
    rho_file = os.path.join(model_dir, POSTERIOR_RHO_NAME) if model_dir is not None else None
    if config.posterior_covariance == "diagonal":
        if rho_file is not None and os.path.isfile(rho_file):
            posterior = GaussianPosterior(
                model, groups, sigma_init=float(config.sigma), posterior_covariance="diagonal"
            )
            posterior.load_rho_pieces(safetensors.torch.load_file(rho_file, device=str(posterior.rho.device)))
            return posterior
        logger.warning(
            f"The model was trained with a diagonal posterior, but its σ_i are not at hand "
            f"({rho_file or 'no model_dir given'}): every weight gets the root-mean-square σ = {config.sigma:g}. "
            f"Pass posterior_from_config(model, model_dir=<the saved model's directory>) to use them."
        )
    return GaussianPosterior(model, groups, sigma_init=float(config.sigma))
