"""What goes to and comes from the Hub: the methods' config entries (`config`), timm portability
(`timm`), loading classifiers (`loading`), pushing (`push`) and the model card (`model_card`).
Knows the methods only through the registry (`hf_deelbo.registry`)."""

from .config import load_config_entry, read_config_entry, read_json_config, set_model_config_entry
from .loading import load_classifier
from .push import HubPushError, HubUnreachableError, check_hub_reachable, push_error, set_hub_timeout
from .timm import load_timm_model

__all__ = [
    "HubPushError",
    "HubUnreachableError",
    "check_hub_reachable",
    "load_classifier",
    "load_config_entry",
    "load_timm_model",
    "push_error",
    "read_config_entry",
    "read_json_config",
    "set_hub_timeout",
    "set_model_config_entry",
]
