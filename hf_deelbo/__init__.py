"""hf_deelbo: fine-tuning that learns its own L2-SP regularization strength (DE ELBO)."""

__version__ = "0.1.0"

import logging as _logging

from transformers.utils import logging as _transformers_logging

from .core.groups import ParameterGroups, detect_head_modules, split_parameters
from .core.preemption import TrainingPreempted
from .demo import digits
from .evaluation.metrics import compute_metrics
from .hub import HubPushError, load_classifier
from .methods.deelbo.arguments import DEELBoTrainingArguments
from .methods.deelbo.callback import DEELBoCallback
from .methods.deelbo.config import DEELBoConfig, load_deelbo_config
from .methods.deelbo.posterior import GaussianPosterior
from .methods.deelbo.prediction import posterior_from_config, predictive_log_probs
from .methods.deelbo.trainer import DEELBoTrainer
from .methods.l2sp import L2SPTrainer, L2SPTrainingArguments
from .methods.t1t2 import T1T2Callback, T1T2Trainer, T1T2TrainingArguments
from .methods.tpgm import TPGMCallback, TPGMTrainer, TPGMTrainingArguments
from .search import l2sp_grid_search, select_learning_rate

# hf_deelbo's loggers sit under transformers' library logger: `transformers.logging.set_verbosity_info()`
# (what the example scripts call) and TRANSFORMERS_VERBOSITY reveal their messages, printed by
# transformers' own handler, as a transformers user expects.
_logging.getLogger(__name__).parent = _transformers_logging.get_logger("transformers")

__all__ = [
    "DEELBoCallback",
    "DEELBoConfig",
    "DEELBoTrainer",
    "DEELBoTrainingArguments",
    "HubPushError",
    "GaussianPosterior",
    "L2SPTrainer",
    "L2SPTrainingArguments",
    "ParameterGroups",
    "compute_metrics",
    "detect_head_modules",
    "digits",
    "l2sp_grid_search",
    "load_classifier",
    "load_deelbo_config",
    "posterior_from_config",
    "predictive_log_probs",
    "select_learning_rate",
    "split_parameters",
    "T1T2Callback",
    "T1T2Trainer",
    "T1T2TrainingArguments",
    "TPGMCallback",
    "TPGMTrainer",
    "TPGMTrainingArguments",
    "TrainingPreempted",
]


def __getattr__(name: str):
    # Earlier names, kept for one release with a warning.
    if name == "IsotropicGaussianPosterior":
        from .methods.deelbo import posterior

        return getattr(posterior, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
