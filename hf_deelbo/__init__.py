"""hf_deelbo: fine-tuning that learns its own L2-SP regularization strength (DE ELBO)."""

__version__ = "0.1.0"

from .arguments import DEELBoTrainingArguments
from .callback import DEELBoCallback
from .groups import ParameterGroups, detect_head_modules, split_parameters
from .hub import load_deelbo_config
from .posterior import IsotropicGaussianPosterior
from .trainer import DEELBoTrainer

__all__ = [
    "DEELBoCallback",
    "DEELBoTrainer",
    "DEELBoTrainingArguments",
    "IsotropicGaussianPosterior",
    "ParameterGroups",
    "detect_head_modules",
    "load_deelbo_config",
    "split_parameters",
]
