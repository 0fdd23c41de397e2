"""hf_deelbo: fine-tuning that learns its own L2-SP regularization strength (DE ELBO)."""

__version__ = "0.1.0"

from . import digits
from .arguments import DEELBoTrainingArguments
from .callback import DEELBoCallback
from .groups import ParameterGroups, detect_head_modules, split_parameters
from .hub import HubPushError, load_classifier, load_deelbo_config
from .posterior import IsotropicGaussianPosterior
from .prediction import posterior_from_config, predictive_log_probs
from .trainer import DEELBoTrainer

__all__ = [
    "DEELBoCallback",
    "DEELBoTrainer",
    "DEELBoTrainingArguments",
    "HubPushError",
    "IsotropicGaussianPosterior",
    "ParameterGroups",
    "detect_head_modules",
    "digits",
    "load_classifier",
    "load_deelbo_config",
    "posterior_from_config",
    "predictive_log_probs",
    "split_parameters",
]
