"""L2-SP fine-tuning with fixed strengths: the baseline whose strengths DE ELBO learns.

Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks" (ICML 2018). The loss on a minibatch B is

    mean_{i∈B} CE(f(x_i; w), y_i) + (α/2) ‖w_b − μ‖² + (β/2) ‖w_h‖²

with μ the pretrained backbone weights (taken when the trainer is built) and w_h the new head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from .anchor import PretrainedAnchor
from .argument_checks import check_training_arguments
from .base import FineTuningTrainer

L2SP_CONFIG_KEY = "l2sp"


@dataclass
class L2SPTrainingArguments(TrainingArguments):
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

    alpha: float = field(default=1e-3, metadata={"help": "L2-SP strength toward the pretrained backbone, (α/2)‖w_b − μ‖²."})
    beta: float = field(default=1e-3, metadata={"help": "L2 strength on the new head, (β/2)‖w_h‖²."})
    head_modules: list[str] | None = field(
        default=None, metadata={"help": "Module-name prefixes of the new head. Default: detected."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_training_arguments(self)
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        if self.weight_decay != 0:
            raise ValueError(f"weight_decay must be 0 with L2SPTrainer: the L2-SP penalty replaces it; got {self.weight_decay}")


class L2SPTrainer(FineTuningTrainer):
    """Fine-tunes with the L2-SP penalty at fixed strengths `alpha` (backbone, toward μ) and `beta`
    (head, toward 0), with the same backbone/head split as `DEELBoTrainer`. The strengths are
    saved as `config.l2sp`. Logs `nll` and `penalty` (window averages)."""

    args_class = L2SPTrainingArguments
    config_key = L2SP_CONFIG_KEY
    method_name = "L2-SP"
    citation = """
@inproceedings{li2018explicit,
  title     = {Explicit Inductive Bias for Transfer Learning with Convolutional Networks},
  author    = {Li, Xuhong and Grandvalet, Yves and Davoine, Franck},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2018}
}"""

    def __init__(self, model: nn.Module | None = None, args: L2SPTrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.anchor = PretrainedAnchor(self.model, self.groups)
        self._window = torch.zeros(3, dtype=torch.float64, device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """loss = mean CE + (α/2)‖w_b − μ‖² + (β/2)‖w_h‖²"""
        logits = self._forward(model, inputs)
        nll = F.cross_entropy(logits.float(), inputs[self.label_names[0]])
        backbone_sq, head_sq = self.anchor.squared_distances()
        penalty = 0.5 * self.args.alpha * backbone_sq + 0.5 * self.args.beta * head_sq
        loss = (nll + penalty).float()
        if model.training:
            with torch.no_grad():
                self._window += torch.stack([nll.detach().double(), penalty.detach(), torch.ones_like(penalty)])
        return (loss, logits) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            means = self._window_means(self._window)
            if means is not None:
                logs["nll"], logs["penalty"] = means
        super().log(logs, start_time)

    def config_entry(self) -> dict:
        return {
            "alpha": float(self.args.alpha),
            "beta": float(self.args.beta),
            "head_modules": list(self.head_modules),
            "num_backbone_params": self.anchor.num_backbone_params,
            "num_head_params": self.anchor.num_head_params,
        }
