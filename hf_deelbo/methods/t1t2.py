"""T1–T2: L2-SP strengths learned by the hypergradient of the validation loss.

Luketina, Berglund, Greff, Raiko, "Scalable Gradient-Based Tuning of Continuous Regularization
Hyperparameters" (ICML 2016). The training loss is L2-SP's,

    C_train(θ) + Ω(θ; α, β),    Ω = Σ_l (α_l/2) ‖w_b,l − μ_l‖² + Σ_l (β_l/2) ‖w_h,l‖²

(one α and one β, or one per tensor with `per_layer_strengths`). One SGD step at learning rate η
gives θ' = θ − η (∇C_train(θ) + ∇_θ Ω(θ; α, β)), and the validation cost after it changes with
the strengths as

    ∂C_val(θ')/∂α_l = −η ⟨∇_{w_b,l} C_val(θ'), w_b,l − μ_l⟩
    ∂C_val(θ')/∂β_l = −η ⟨∇_{w_h,l} C_val(θ'), w_h,l⟩

(the mixed derivative ∂²Ω/∂θ∂α is w − μ: no Hessian is needed). Every `hyper_steps` optimizer
steps, the trainer keeps θ − μ and w_h from just before the step and η of that step, takes the
validation gradient at the weights after it, and moves the strengths by projected gradient
descent, α ← max(0, α − `hyper_learning_rate` · ∂C_val/∂α) (likewise β), so they never go negative.
With momentum or gradient clipping the real step is not the plain SGD step above; the
hypergradient is then that of the plain step, as in Luketina et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.arguments import StatefulFineTuningArguments
from ..core.callback import MethodStateCallback
from ..core.validation import ValidationTrainerMixin, check_validation_fraction
from ..hub.config import MethodConfig
from ..registry import MethodSpec, entry_field, register_method
from .l2sp import L2SPTrainer, L2SPTrainingArguments, l2sp_penalty

CITATION = """
@inproceedings{luketina2016scalable,
  title     = {Scalable Gradient-Based Tuning of Continuous Regularization Hyperparameters},
  author    = {Luketina, Jelena and Berglund, Mathias and Greff, Klaus and Raiko, Tapani},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2016}
}"""


@dataclass
class T1T2Config(MethodConfig):
    """T1–T2's entry of config.json (`config.t1t2`): the learned strengths α, β (one number, or one
    per tensor by name with `per_layer_strengths`), the hyper-step's settings and the group sizes."""

    alpha: float | dict[str, float] = entry_field("strengths")
    beta: float | dict[str, float] = entry_field("strengths")
    hyper_learning_rate: float | None = entry_field("positive", default=None)
    hyper_steps: int | None = entry_field("count", default=None)
    per_layer_strengths: bool | None = entry_field("flag", default=None)
    head_modules: list[str] | None = entry_field("names", default=None)
    num_backbone_params: int | None = entry_field("count", default=None)
    num_head_params: int | None = entry_field("count", default=None)


T1T2 = register_method(
    MethodSpec(
        key="t1t2",
        title="T1–T2",
        tags=("t1-t2",),
        citation=CITATION,
        format_version=1,
        config_class=T1T2Config,
        contract_arguments={"hyper_steps": 1, "per_layer_strengths": True},
    )
)


def t1t2_hypergradient(
    validation_gradients: list[torch.Tensor], regularizer_gradients: list[torch.Tensor], learning_rate: float
) -> torch.Tensor:
    """∂C_val(θ')/∂s_l = −η ⟨∇_l C_val(θ'), ∂(∇_l Ω)/∂s_l⟩ for each tensor l (float64 vector).

    Args:
        validation_gradients: ∇C_val at the weights after the step, one tensor per parameter.
        regularizer_gradients: ∂(∇Ω)/∂s per parameter at the weights before the step:
            w_b,l − μ_l for a backbone tensor (s = α_l), w_h,l for a head tensor (s = β_l).
        learning_rate: η of the step.
    """
    return torch.stack(
        [
            -learning_rate * torch.sum(g.double() * d.double())
            for g, d in zip(validation_gradients, regularizer_gradients, strict=False)
        ]
    )


# Stateful first: dataclass fields are collected from the last base to the first, so its
# `restore_callback_states_from_checkpoint=True` wins over the default L2-SP's arguments inherit.
@dataclass
class T1T2TrainingArguments(StatefulFineTuningArguments, L2SPTrainingArguments):
    r"""
    Configuration for [`T1T2Trainer`]: [`L2SPTrainingArguments`] (`alpha`, `beta` are the
    starting strengths) plus the hyper-step settings. `restore_callback_states_from_checkpoint`
    defaults to `True` and is kept there (the strengths live in callback state; `False` is
    overridden with a warning).

    Parameters:
        hyper_steps (`int`, *optional*, defaults to `10`):
            One hyper-step (a validation batch and a strength update) every this many optimizer steps.
        hyper_learning_rate (`float`, *optional*, defaults to `1.0`):
            Step size of the projected gradient descent on the strengths.
        per_layer_strengths (`bool`, *optional*, defaults to `False`):
            One α per backbone tensor and one β per head tensor instead of one each.
        validation_fraction (`float`, *optional*, defaults to `None`):
            `None`: the hypergradient uses `eval_dataset`. A fraction in (0, 1): a stratified
            part of `train_dataset` is held out of training and used instead.
    """

    trainer_name: ClassVar[str] = "T1T2Trainer"
    callback_state: ClassVar[str] = "the strengths"

    alpha: float = field(default=1e-3, metadata={"help": "Starting L2-SP strength of the backbone (learned)."})
    beta: float = field(default=1e-3, metadata={"help": "Starting L2 strength of the head (learned)."})
    hyper_steps: int = field(default=10, metadata={"help": "One hyper-step every this many optimizer steps."})
    hyper_learning_rate: float = field(default=1.0, metadata={"help": "Step size of the strengths' gradient descent."})
    per_layer_strengths: bool = field(
        default=False, metadata={"help": "One strength per parameter tensor instead of one for backbone and head."}
    )
    validation_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this stratified fraction of train_dataset for the hypergradient. Default: eval_dataset."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.hyper_steps < 1:
            raise ValueError(f"hyper_steps must be an int >= 1; got {self.hyper_steps}")
        if not (math.isfinite(self.hyper_learning_rate) and self.hyper_learning_rate > 0):
            raise ValueError(f"hyper_learning_rate must be a finite number > 0; got {self.hyper_learning_rate}")
        check_validation_fraction(self.validation_fraction)


class T1T2Callback(MethodStateCallback):
    """Around every `hyper_steps`-th optimizer step: before it, keeps w_b − μ, w_h and η
    (`T1T2Trainer.prepare_hyper_step`); after it, updates the strengths (`T1T2Trainer.hyper_step`).

    State (JSON, in `trainer_state.json`): the strengths, so a resumed run goes on with them.
    """

    state_attributes = ("backbone_strengths", "head_strengths")
    cadence_argument = "hyper_steps"

    def restore(self, trainer: T1T2Trainer) -> None:
        trainer.set_strengths(self.backbone_strengths, self.head_strengths)

    def current_state(self) -> dict:
        return {
            "backbone_strengths": self.target.backbone_strengths.tolist(),
            "head_strengths": self.target.head_strengths.tolist(),
        }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.is_due(args, state):
            self.timed(self.target, self.target.prepare_hyper_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.is_due(args, state):
            self.timed(self.target, self.target.hyper_step)


class T1T2Trainer(ValidationTrainerMixin, L2SPTrainer):
    """L2-SP fine-tuning whose strengths α (backbone, toward μ) and β (head, toward 0) are learned
    by T1–T2 hypergradients on validation data (see the module docstring for the equations).

    Takes [`T1T2TrainingArguments`] and a validation set (`eval_dataset`, or `validation_fraction`
    of `train_dataset`). The learned strengths are saved as `config.t1t2`. Logs `nll`, `penalty`,
    `alpha`, `beta` (means over tensors with `per_layer_strengths`) and `hyper_seconds`.
    """

    args_class = T1T2TrainingArguments
    method = T1T2
    callback_class = T1T2Callback

    def __init__(self, model: nn.Module | None = None, args: T1T2TrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        num_backbone = len(self.anchor.backbone) if self.args.per_layer_strengths else 1
        num_head = len(self.anchor.head) if self.args.per_layer_strengths else 1
        device = self.args.device
        self.backbone_strengths = torch.full(
            (num_backbone,), float(self.args.alpha), dtype=torch.float64, device=device
        )
        self.head_strengths = torch.full((num_head,), float(self.args.beta), dtype=torch.float64, device=device)
        self.last_hypergradient: tuple[torch.Tensor, torch.Tensor] | None = None
        self._before_step = None
        self.install_method_callback(self)

    @property
    def t1t2_callback(self) -> T1T2Callback:
        return self.method_callback

    def set_strengths(self, backbone: list[float], head: list[float]) -> None:
        if len(backbone) != len(self.backbone_strengths) or len(head) != len(self.head_strengths):
            raise ValueError(
                f"The checkpoint holds {len(backbone)} backbone and {len(head)} head strengths; this trainer has "
                f"{len(self.backbone_strengths)} and {len(self.head_strengths)} (per_layer_strengths="
                f"{self.args.per_layer_strengths}). Resume with the arguments the checkpoint was trained with."
            )
        self.backbone_strengths.copy_(torch.tensor(backbone, dtype=torch.float64))
        self.head_strengths.copy_(torch.tensor(head, dtype=torch.float64))

    # ---- the hyper-step -------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_hyper_step(self) -> None:
        """Keeps ∂(∇Ω)/∂s of the step about to be taken (w_b − μ, w_h) and its learning rate η."""
        anchor = self.anchor
        regularizer_gradients = [p - mu for p, mu in zip(anchor.backbone, anchor.prior_mean, strict=False)]
        regularizer_gradients += [p.detach().clone() for p in anchor.head]
        self._before_step = (regularizer_gradients, float(self.optimizer.param_groups[0]["lr"]))

    def hyper_step(self) -> None:
        """Validation gradient at the new weights → hypergradient → projected step on α, β."""
        regularizer_gradients, learning_rate = self._before_step
        self._before_step = None
        parameters = self.anchor.backbone + self.anchor.head
        loss = self.validation_loss(self.next_validation_batch())
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, parameters, strict=False)]
        per_tensor = t1t2_hypergradient(gradients, regularizer_gradients, learning_rate)
        if self.accelerator.num_processes > 1:  # every rank sees other validation batches
            per_tensor = self.accelerator.reduce(per_tensor, reduction="mean")
        num_backbone_tensors = len(self.anchor.backbone)
        backbone, head = per_tensor[:num_backbone_tensors], per_tensor[num_backbone_tensors:]
        if not self.args.per_layer_strengths:
            backbone, head = backbone.sum().reshape(1), head.sum().reshape(1)
        self.last_hypergradient = (backbone, head)
        step = self.args.hyper_learning_rate
        self.backbone_strengths.sub_(step * backbone).clamp_(min=0.0)
        self.head_strengths.sub_(step * head).clamp_(min=0.0)

    # ---- loss and logs --------------------------------------------------------------------------

    def _strength_per_tensor(self, strengths: torch.Tensor, count: int) -> torch.Tensor:
        return strengths if len(strengths) == count else strengths.expand(count)

    def penalty(self) -> torch.Tensor:
        """Σ_l (α_l/2)‖w_b,l − μ_l‖² + Σ_l (β_l/2)‖w_h,l‖² at the current strengths."""
        backbone_sq, head_sq = self.anchor.squared_distances_per_tensor()
        alpha = self._strength_per_tensor(self.backbone_strengths, len(backbone_sq))
        beta = self._strength_per_tensor(self.head_strengths, len(head_sq))
        return l2sp_penalty(backbone_sq, head_sq, alpha, beta)

    def logged_values(self, logs: dict) -> dict:
        values = super().logged_values(logs)
        if "loss" in logs:
            values.update(alpha=float(self.backbone_strengths.mean()), beta=float(self.head_strengths.mean()))
        return values

    def method_config(self) -> T1T2Config:
        anchor = self.anchor
        if self.args.per_layer_strengths:
            alpha = dict(zip(anchor.backbone_names, self.backbone_strengths.tolist(), strict=False))
            beta = dict(zip(anchor.head_names, self.head_strengths.tolist(), strict=False))
        else:
            alpha, beta = float(self.backbone_strengths[0]), float(self.head_strengths[0])
        return T1T2Config(
            alpha=alpha,
            beta=beta,
            head_modules=list(self.head_modules),
            hyper_learning_rate=float(self.args.hyper_learning_rate),
            hyper_steps=int(self.args.hyper_steps),
            num_backbone_params=anchor.num_backbone_params,
            num_head_params=anchor.num_head_params,
            per_layer_strengths=bool(self.args.per_layer_strengths),
        )
