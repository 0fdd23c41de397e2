"""L2-SP fine-tuning with fixed strengths: the baseline whose strengths DE ELBO learns.

Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks" (ICML 2018). The loss on a minibatch B is

    mean_{i∈B} CE(f(x_i; w), y_i) + (α/2) ‖w_b − μ‖² + (β/2) ‖w_h‖²

with μ the pretrained backbone weights (taken when the trainer is built) and w_h the new head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.anchor import PretrainedAnchor
from ..core.arguments import FineTuningArguments
from ..core.trainer import FineTuningTrainer
from ..hub.config import MethodConfig
from ..registry import MethodSpec, entry_field, register_method

CITATION = """
@inproceedings{li2018explicit,
  title     = {Explicit Inductive Bias for Transfer Learning with Convolutional Networks},
  author    = {Li, Xuhong and Grandvalet, Yves and Davoine, Franck},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2018}
}"""


@dataclass
class L2SPConfig(MethodConfig):
    """L2-SP's entry of config.json (`config.l2sp`): the strengths α (backbone, toward μ) and β
    (head, toward 0) a model was fine-tuned with, its head's module names and the group sizes."""

    alpha: float = entry_field("nonnegative")
    beta: float = entry_field("nonnegative")
    head_modules: list[str] | None = entry_field("names", default=None)
    num_backbone_params: int | None = entry_field("count", default=None)
    num_head_params: int | None = entry_field("count", default=None)


L2SP = register_method(
    MethodSpec(
        key="l2sp",
        title="L2-SP",
        tags=("l2-sp",),
        citation=CITATION,
        config_class=L2SPConfig,
        contract_arguments={"alpha": 1e-3, "beta": 1e-4},
    )
)


def l2sp_penalty(backbone_squared_distances, head_squared_norms, alpha, beta) -> torch.Tensor:
    """The L2-SP penalty, for one strength per group or one per tensor:

        Ω = Σ_l (α_l/2) ‖w_b,l − μ_l‖² + Σ_l (β_l/2) ‖w_h,l‖²

    Args:
        backbone_squared_distances: ‖w_b − μ‖² (a scalar), or ‖w_b,l − μ_l‖² per backbone tensor.
        head_squared_norms: ‖w_h‖², or ‖w_h,l‖² per head tensor.
        alpha, beta: the strengths, numbers or tensors shaped like the distances.
    """
    return 0.5 * (alpha * backbone_squared_distances).sum() + 0.5 * (beta * head_squared_norms).sum()


@dataclass
class L2SPTrainingArguments(FineTuningArguments):
    r"""
    Configuration for [`L2SPTrainer`]. Every [`~transformers.TrainingArguments`] field is
    accepted; `weight_decay` must stay `0.0` (the L2-SP penalty replaces it).

    Parameters:
        alpha (`float`, *optional*, defaults to `1e-3`):
            Strength α of the pull of the backbone toward its pretrained weights, (α/2)‖w_b − μ‖².
        beta (`float`, *optional*, defaults to `1e-3`):
            Strength β of the head's L2 penalty toward 0, (β/2)‖w_h‖².
        head_modules (`list[str]`, *optional*, defaults to `None`):
            Module-name prefixes of the new head; `None` detects it (as in `DEELBoTrainer`).
    """

    trainer_name: ClassVar[str] = "L2SPTrainer"
    replaces_weight_decay: ClassVar[str] = "the L2-SP penalty"

    alpha: float = field(
        default=1e-3, metadata={"help": "L2-SP strength toward the pretrained backbone, (α/2)‖w_b − μ‖²."}
    )
    beta: float = field(default=1e-3, metadata={"help": "L2 strength on the new head, (β/2)‖w_h‖²."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")


class L2SPTrainer(FineTuningTrainer):
    """Fine-tunes with the L2-SP penalty at fixed strengths `alpha` (backbone, toward μ) and `beta`
    (head, toward 0), with the same backbone/head split as `DEELBoTrainer`. The strengths are
    saved as `config.l2sp`. Logs `nll` and `penalty` (window averages)."""

    args_class = L2SPTrainingArguments
    method = L2SP
    logged_metrics = ("nll", "penalty")
    supports_model_init = True  # e.g. `hyperparameter_search` over alpha, beta and the learning rate

    def __init__(self, model: nn.Module | None = None, args: L2SPTrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.anchor = PretrainedAnchor(self.model, self.groups)

    def _bind_model(self, model: nn.Module) -> None:
        super()._bind_model(model)
        self.anchor = PretrainedAnchor(model, self.groups)

    def penalty(self) -> torch.Tensor:
        """(α/2)‖w_b − μ‖² + (β/2)‖w_h‖² at the current weights."""
        return l2sp_penalty(*self.anchor.squared_distances(), self.args.alpha, self.args.beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """loss = mean CE + Ω (`penalty`)"""
        logits = self._forward(model, inputs)
        nll = F.cross_entropy(logits.float(), inputs[self.label_names[0]])
        penalty = self.penalty()
        loss = (nll + penalty).float()
        if model.training:
            self.metrics.record(nll=nll, penalty=penalty)
        return (loss, logits) if return_outputs else loss

    def method_config(self) -> L2SPConfig:
        return L2SPConfig(
            alpha=float(self.args.alpha),
            beta=float(self.args.beta),
            head_modules=list(self.head_modules),
            num_backbone_params=self.anchor.num_backbone_params,
            num_head_params=self.anchor.num_head_params,
        )
