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

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .anchor import PretrainedAnchor
from .base import FineTuningTrainer
from .l2sp import L2SPTrainingArguments
from .validation import ValidationTrainerMixin, check_validation_fraction

logger = logging.getLogger(__name__)

T1T2_CONFIG_KEY = "t1t2"
T1T2_FORMAT_VERSION = 1


def t1t2_hypergradient(
    validation_gradients: list[torch.Tensor],
    regularizer_gradients: list[torch.Tensor],
    learning_rate: float,
) -> torch.Tensor:
    """∂C_val(θ')/∂s_l = −η ⟨∇_l C_val(θ'), ∂(∇_l Ω)/∂s_l⟩ for each tensor l (float64 vector).

    Args:
        validation_gradients: ∇C_val at the weights after the step, one tensor per parameter.
        regularizer_gradients: ∂(∇Ω)/∂s per parameter at the weights before the step:
            w_b,l − μ_l for a backbone tensor (s = α_l), w_h,l for a head tensor (s = β_l).
        learning_rate: η of the step.
    """
    return torch.stack(
        [-learning_rate * torch.sum(g.double() * d.double()) for g, d in zip(validation_gradients, regularizer_gradients)]
    )


@dataclass
class T1T2TrainingArguments(L2SPTrainingArguments):
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

    # Overridden TrainingArguments default (see the class docstring).
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={"help": "Restore callback states from checkpoints. Always True here: the strengths live in callback state."},
    )
    alpha: float = field(default=1e-3, metadata={"help": "Starting L2-SP strength of the backbone (learned)."})
    beta: float = field(default=1e-3, metadata={"help": "Starting L2 strength of the head (learned)."})
    hyper_steps: int = field(default=10, metadata={"help": "One hyper-step every this many optimizer steps."})
    hyper_learning_rate: float = field(default=1.0, metadata={"help": "Step size of the strengths' gradient descent."})
    per_layer_strengths: bool = field(
        default=False, metadata={"help": "One strength per parameter tensor instead of one for backbone and head."}
    )
    validation_fraction: float | None = field(
        default=None,
        metadata={"help": "Hold out this stratified fraction of train_dataset for the hypergradient. Default: eval_dataset."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.hyper_steps < 1:
            raise ValueError(f"hyper_steps must be an int >= 1; got {self.hyper_steps}")
        if not (math.isfinite(self.hyper_learning_rate) and self.hyper_learning_rate > 0):
            raise ValueError(f"hyper_learning_rate must be a finite number > 0; got {self.hyper_learning_rate}")
        check_validation_fraction(self.validation_fraction)
        if not self.restore_callback_states_from_checkpoint:
            logger.warning(
                "restore_callback_states_from_checkpoint=False is overridden to True: the strengths live in callback state."
            )
            self.restore_callback_states_from_checkpoint = True


class T1T2Callback(TrainerCallback, ExportableState):
    """Around every `hyper_steps`-th optimizer step: before it, keeps w_b − μ, w_h and η
    (`T1T2Trainer.prepare_hyper_step`); after it, updates the strengths (`T1T2Trainer.hyper_step`).

    State (JSON, in `trainer_state.json`): the strengths, so a resumed run goes on with them.
    """

    def __init__(self, backbone_strengths: list[float] | None = None, head_strengths: list[float] | None = None):
        self.backbone_strengths = backbone_strengths
        self.head_strengths = head_strengths
        self.trainer = None

    def bind(self, trainer: T1T2Trainer) -> None:
        self.trainer = trainer
        if self.backbone_strengths is not None:
            trainer.set_strengths(self.backbone_strengths, self.head_strengths)

    def _is_hyper_step(self, args, state) -> bool:
        return (state.global_step + 1) % args.hyper_steps == 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._is_hyper_step(args, state):
            start = time.perf_counter()
            self.trainer.prepare_hyper_step()
            self.trainer.hyper_seconds += time.perf_counter() - start

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._is_hyper_step(args, state):
            start = time.perf_counter()
            self.trainer.hyper_step()
            self.trainer.hyper_seconds += time.perf_counter() - start

    def state(self) -> dict:
        if self.trainer is not None:
            backbone, head = self.trainer.backbone_strengths.tolist(), self.trainer.head_strengths.tolist()
        else:
            backbone, head = self.backbone_strengths, self.head_strengths
        return {"args": {}, "attributes": {"backbone_strengths": backbone, "head_strengths": head}}


class T1T2Trainer(ValidationTrainerMixin, FineTuningTrainer):
    """L2-SP fine-tuning whose strengths α (backbone, toward μ) and β (head, toward 0) are learned
    by T1–T2 hypergradients on validation data (see the module docstring for the equations).

    Takes [`T1T2TrainingArguments`] and a validation set (`eval_dataset`, or `validation_fraction`
    of `train_dataset`). The learned strengths are saved as `config.t1t2`. Logs `nll`, `penalty`,
    `alpha`, `beta` (means over tensors with `per_layer_strengths`) and `hyper_seconds`.
    """

    args_class = T1T2TrainingArguments
    config_key = T1T2_CONFIG_KEY
    method_name = "T1–T2"
    citation = """
@inproceedings{luketina2016scalable,
  title     = {Scalable Gradient-Based Tuning of Continuous Regularization Hyperparameters},
  author    = {Luketina, Jelena and Berglund, Mathias and Greff, Klaus and Raiko, Tapani},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2016}
}"""

    def __init__(self, model: nn.Module | None = None, args: T1T2TrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.anchor = PretrainedAnchor(self.model, self.groups)
        num_backbone = len(self.anchor.backbone) if self.args.per_layer_strengths else 1
        num_head = len(self.anchor.head) if self.args.per_layer_strengths else 1
        device = self.args.device
        self.backbone_strengths = torch.full((num_backbone,), float(self.args.alpha), dtype=torch.float64, device=device)
        self.head_strengths = torch.full((num_head,), float(self.args.beta), dtype=torch.float64, device=device)
        self.last_hypergradient: tuple[torch.Tensor, torch.Tensor] | None = None
        self._before_step = None
        self._window = torch.zeros(3, dtype=torch.float64, device=device)
        self.add_callback(T1T2Callback())
        self.t1t2_callback.bind(self)

    @property
    def t1t2_callback(self) -> T1T2Callback:
        return self.installed_callback(T1T2Callback)

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        self.t1t2_callback.bind(self)

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
        regularizer_gradients = [p - mu for p, mu in zip(anchor.backbone, anchor.prior_mean)]
        regularizer_gradients += [p.detach().clone() for p in anchor.head]
        self._before_step = (regularizer_gradients, float(self.optimizer.param_groups[0]["lr"]))

    def hyper_step(self) -> None:
        """Validation gradient at the new weights → hypergradient → projected step on α, β."""
        regularizer_gradients, learning_rate = self._before_step
        self._before_step = None
        inputs = self.next_validation_batch()
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                logits = self._forward(model, inputs)
            loss = F.cross_entropy(logits.float(), inputs[self.label_names[0]])
            gradients = torch.autograd.grad(loss, self.anchor.backbone + self.anchor.head, allow_unused=True)
        finally:
            model.train(was_training)
        gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, self.anchor.backbone + self.anchor.head)]
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """loss = mean CE + Σ_l (α_l/2)‖w_b,l − μ_l‖² + Σ_l (β_l/2)‖w_h,l‖²"""
        logits = self._forward(model, inputs)
        nll = F.cross_entropy(logits.float(), inputs[self.label_names[0]])
        backbone_sq, head_sq = self.anchor.squared_distances_per_tensor()
        alpha = self._strength_per_tensor(self.backbone_strengths, len(backbone_sq))
        beta = self._strength_per_tensor(self.head_strengths, len(head_sq))
        penalty = 0.5 * (alpha * backbone_sq).sum() + 0.5 * (beta * head_sq).sum()
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
            logs["alpha"] = float(self.backbone_strengths.mean())
            logs["beta"] = float(self.head_strengths.mean())
        super().log(logs, start_time)

    def config_entry(self) -> dict:
        anchor = self.anchor
        if self.args.per_layer_strengths:
            alpha = dict(zip(anchor.backbone_names, self.backbone_strengths.tolist()))
            beta = dict(zip(anchor.head_names, self.head_strengths.tolist()))
        else:
            alpha, beta = float(self.backbone_strengths[0]), float(self.head_strengths[0])
        values = {
            "alpha": alpha,
            "beta": beta,
            "format_version": T1T2_FORMAT_VERSION,
            "head_modules": list(self.head_modules),
            "hyper_learning_rate": float(self.args.hyper_learning_rate),
            "hyper_steps": int(self.args.hyper_steps),
            "num_backbone_params": anchor.num_backbone_params,
            "num_head_params": anchor.num_head_params,
            "per_layer_strengths": bool(self.args.per_layer_strengths),
        }
        return dict(sorted(values.items()))

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        output.metrics["hyper_seconds"] = self.hyper_seconds
        return output
