"""TPGM: fine-tuning inside learned balls around the pretrained weights.

Tian, Dai, Ma, He, Liu, Kira, "Trainable Projected Gradient Method for Robust Fine-tuning" (CVPR 2023). Each
backbone tensor θ_l (the new head is excluded) is kept within a learned radius γ_l of its
pretrained value θ_0,l by the projection

    θ̃_l = θ_0,l + min(1, γ_l / ‖θ_l − θ_0,l‖) (θ_l − θ_0,l)

- `norm="l2"`: ‖·‖ is the tensor's Euclidean norm (one scale per tensor).
- `norm="mars"`: the maximum absolute row sum (Gouk et al., ICLR 2021). The tensor is read as rows
  along its first dimension (a 1-d tensor is one row) and each row r is scaled by
  min(1, γ_l / ‖Δ_r‖₁), so every row's absolute sum, hence their maximum, ends up ≤ γ_l.

The radii are learned on validation data: every `projection_steps` optimizer steps, `radius_steps`
Adam steps lower the validation cross-entropy of the projected weights θ̃(γ) with respect to γ,
through ∂θ̃_l/∂γ_l = Δ/‖Δ‖ where the ball binds (0 elsewhere); γ ≥ 0. At the first update the
radii start at the current distances. From then on the weights are projected after every
optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.anchor import PretrainedAnchor
from ..core.arguments import StatefulFineTuningArguments
from ..core.callback import MethodStateCallback
from ..core.choices import Choice
from ..core.trainer import FineTuningTrainer
from ..core.validation import ValidationTrainerMixin, check_validation_fraction
from ..hub.config import MethodConfig
from ..registry import MethodSpec, entry_field, register_method


class ProjectionNorm(Choice):
    """The distance TPGM bounds per backbone tensor."""

    L2 = "l2", "one Euclidean ball per backbone tensor"
    MARS = "mars", "the maximum absolute row sum"


CITATION = """
@inproceedings{tian2023trainable,
  title     = {Trainable Projected Gradient Method for Robust Fine-tuning},
  author    = {Tian, Junjiao and Dai, Xiaoliang and Ma, Chih-Yao and He, Zecheng and Liu, Yen-Cheng and Kira, Zsolt},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""


@dataclass
class TPGMConfig(MethodConfig):
    """TPGM's entry of config.json (`config.tpgm`): the learned projection radius of each backbone
    tensor by name (null before the first projection), the norm, the projection's settings and the
    group sizes."""

    radii: dict[str, float] | None = entry_field("radii", default=None)
    norm: str | None = entry_field("text", default=None, choices=ProjectionNorm.values())
    projection_steps: int | None = entry_field("count", default=None)
    head_modules: list[str] | None = entry_field("names", default=None)
    num_backbone_params: int | None = entry_field("count", default=None)
    num_head_params: int | None = entry_field("count", default=None)


TPGM = register_method(
    MethodSpec(
        key="tpgm",
        title="TPGM",
        tags=("tpgm",),
        citation=CITATION,
        format_version=1,
        config_class=TPGMConfig,
        contract_arguments={"projection_steps": 1, "norm": "mars"},
    )
)


# ---- the projection (pure tensor functions) ---------------------------------------------------


def distance_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """‖Δ‖ that the projection scales by: a scalar (L2), or one L1 norm per row shaped to broadcast
    against Δ (MARS)."""
    if norm == "l2":
        return torch.linalg.vector_norm(delta)
    if delta.dim() <= 1:
        return delta.abs().sum()
    return delta.abs().sum(dim=tuple(range(1, delta.dim())), keepdim=True)


def tensor_distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """The distance the ball bounds: ‖Δ‖₂ (L2) or the maximum absolute row sum (MARS)."""
    return distance_norms(delta, norm).max()


def projection_ratio(delta: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """min(1, γ / ‖Δ‖), differentiable in γ (Δ is treated as data)."""
    norms = distance_norms(delta.detach(), norm)
    return torch.clamp(radius / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)


class ProjectionBalls:
    """One ball per backbone tensor of `anchor`: radii γ (a float32 vector, `None` until
    initialised), the projected weights θ̃(γ) for the radius gradient, and the in-place projection."""

    def __init__(self, anchor: PretrainedAnchor, norm: str):
        self.anchor = anchor
        self.norm = norm
        self.radii: torch.Tensor | None = None

    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """Each backbone tensor's current distance to its pretrained value."""
        return torch.stack(
            [
                tensor_distance((p - mu).float(), self.norm)
                for p, mu in zip(self.anchor.backbone, self.anchor.prior_mean, strict=False)
            ]
        )

    def initialize(self, radii: list[float] | None = None) -> None:
        values = torch.tensor(radii, dtype=torch.float32) if radii is not None else self.distances().float()
        device = self.anchor.backbone[0].device
        self.radii = nn.Parameter(values.to(device))

    def projected_parameters(self, radii: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name → θ̃_l(γ) for every backbone tensor, differentiable with respect to the radii."""
        radii = self.radii if radii is None else radii
        anchor, projected = self.anchor, {}
        for name, p, mu, radius in zip(anchor.backbone_names, anchor.backbone, anchor.prior_mean, radii, strict=False):
            delta = p.detach() - mu
            projected[name] = mu + projection_ratio(delta, radius.to(delta.dtype), self.norm) * delta
        return projected

    @torch.no_grad()
    def project(self) -> int:
        """θ_l ← θ̃_l for every backbone tensor outside its ball; returns how many were moved."""
        moved = 0
        for p, mu, radius in zip(self.anchor.backbone, self.anchor.prior_mean, self.radii, strict=False):
            delta = p - mu
            ratio = projection_ratio(delta, radius.to(delta.dtype), self.norm)
            outside = ratio < 1
            if bool(outside.any()):
                p.copy_(torch.where(outside, mu + ratio * delta, p))
                moved += 1
        return moved


# ---- arguments --------------------------------------------------------------------------------


@dataclass
class TPGMTrainingArguments(StatefulFineTuningArguments):
    r"""
    Configuration for [`TPGMTrainer`]. Every [`~transformers.TrainingArguments`] field is accepted;
    `weight_decay` must stay `0.0` (the projection replaces it), and
    `restore_callback_states_from_checkpoint` defaults to `True` and is kept there (the radii live
    in callback state; `False` is overridden with a warning).

    Parameters:
        norm (`str`, *optional*, defaults to `"l2"`):
            `"l2"`: one Euclidean ball per backbone tensor. `"mars"`: the maximum absolute row sum
            bound, projected row by row.
        projection_steps (`int`, *optional*, defaults to `10`):
            The radii are updated on validation data every this many optimizer steps.
        radius_steps (`int`, *optional*, defaults to `1`):
            Adam steps on the radii per update, one validation batch each.
        radius_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Adam's learning rate for the radii (in units of weight distance).
        validation_fraction (`float`, *optional*, defaults to `None`):
            `None`: the radii learn on `eval_dataset`. A fraction in (0, 1): a stratified part of
            `train_dataset` is held out of training and used instead.
        head_modules (`list[str]`, *optional*, defaults to `None`):
            Module-name prefixes of the new head (never projected); `None` detects it.
    """

    trainer_name: ClassVar[str] = "TPGMTrainer"
    replaces_weight_decay: ClassVar[str] = "the projection"
    callback_state: ClassVar[str] = "the radii"

    norm: ProjectionNorm = field(
        default=ProjectionNorm.L2,
        metadata={"help": f"Distance bounded per backbone tensor: {ProjectionNorm.described()}."},
    )
    projection_steps: int = field(default=10, metadata={"help": "Update the radii every this many optimizer steps."})
    radius_steps: int = field(
        default=1, metadata={"help": "Adam steps on the radii per update (one validation batch each)."}
    )
    radius_learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the radii."})
    validation_fraction: float | None = field(
        default=None,
        metadata={"help": "Hold out this stratified fraction of train_dataset for the radii. Default: eval_dataset."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in ProjectionNorm.values():
            raise ValueError(f"norm must be {' or '.join(map(repr, ProjectionNorm.values()))}; got {self.norm!r}")
        self.norm = ProjectionNorm(self.norm)
        for name in ("projection_steps", "radius_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1; got {getattr(self, name)}")
        if not (math.isfinite(self.radius_learning_rate) and self.radius_learning_rate > 0):
            raise ValueError(f"radius_learning_rate must be a finite number > 0; got {self.radius_learning_rate}")
        check_validation_fraction(self.validation_fraction)


# ---- the callback -----------------------------------------------------------------------------


class TPGMCallback(MethodStateCallback):
    """Right after each optimizer step: every `projection_steps` steps, the radii take
    `radius_steps` Adam steps on validation batches (`TPGMTrainer.update_radii`); then, once
    radii exist, every backbone tensor is projected into its ball.

    State (JSON, in `trainer_state.json`): the radii and Adam's moments, so a resumed run goes on
    with the same balls.
    """

    state_attributes = ("radii", "radius_optimizer")
    cadence_argument = "projection_steps"

    def restore(self, trainer: TPGMTrainer) -> None:
        trainer.restore_radii(self.radii, self.radius_optimizer)

    def current_state(self) -> dict:
        radii, optimizer = self.target.radii_state()
        return {"radii": radii, "radius_optimizer": optimizer}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.timed(self.target, lambda: self.step(args, state))

    def step(self, args, state) -> None:
        if self.is_due(args, state):
            self.target.update_radii()
        if self.target.balls.radii is not None:
            self.target.balls.project()


# ---- the trainer ------------------------------------------------------------------------------


class TPGMTrainer(ValidationTrainerMixin, FineTuningTrainer):
    """Fine-tunes with plain cross-entropy while TPGM keeps each backbone tensor inside a learned
    ball around its pretrained value (see the module docstring for the equations).

    Takes [`TPGMTrainingArguments`] and a validation set (`eval_dataset`, or `validation_fraction`
    of `train_dataset`). The learned radii are saved as `config.tpgm` (per backbone tensor name).
    Logs `nll` and `hyper_seconds` (time spent on radii and projections).
    """

    args_class = TPGMTrainingArguments
    method = TPGM
    callback_class = TPGMCallback
    logged_metrics = ("nll",)

    def __init__(self, model: nn.Module | None = None, args: TPGMTrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.anchor = PretrainedAnchor(self.model, self.groups)
        self.balls = ProjectionBalls(self.anchor, self.args.norm)
        self._radius_optimizer = None
        self.install_method_callback(self)

    # ---- radii ----------------------------------------------------------------------------------

    def _make_radius_optimizer(self) -> None:
        self._radius_optimizer = torch.optim.Adam([self.balls.radii], lr=self.args.radius_learning_rate)

    def restore_radii(self, radii: list[float], optimizer_state: dict | None) -> None:
        self.balls.initialize(radii)
        self._make_radius_optimizer()
        if optimizer_state:
            state = {
                key: torch.tensor(value, dtype=torch.float32, device=self.balls.radii.device)
                for key, value in optimizer_state.items()
            }
            self._radius_optimizer.load_state_dict(
                {"state": {0: state}, "param_groups": self._radius_optimizer.state_dict()["param_groups"]}
            )

    def radii_state(self) -> tuple[list[float] | None, dict | None]:
        if self.balls.radii is None:
            return None, None
        state = self._radius_optimizer.state_dict()["state"].get(0, {})
        return self.balls.radii.tolist(), {key: value.tolist() for key, value in state.items()}

    def radius_gradient(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(validation CE of θ̃(γ) on `inputs`, its gradient with respect to γ), the model in eval mode."""
        loss = self.validation_loss(inputs, self.balls.projected_parameters())
        (gradient,) = torch.autograd.grad(loss, self.balls.radii)
        return loss.detach(), gradient

    def update_radii(self) -> None:
        """`radius_steps` Adam steps on the radii (initialised at the current distances the first time)."""
        if self.balls.radii is None:
            self.balls.initialize()
            self._make_radius_optimizer()
        for _ in range(self.args.radius_steps):
            _, gradient = self.radius_gradient(self.next_validation_batch())
            if self.accelerator.num_processes > 1:  # every rank sees other validation batches
                gradient = self.accelerator.reduce(gradient, reduction="mean")
            self.balls.radii.grad = gradient
            self._radius_optimizer.step()
            self._radius_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                self.balls.radii.clamp_(min=0.0)

    # ---- loss and logs --------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """loss = mean CE (the regularization is the projection, not a penalty)"""
        logits = self._forward(model, inputs)
        loss = F.cross_entropy(logits.float(), inputs[self.label_names[0]])
        if model.training:
            self.metrics.record(nll=loss)
        return (loss, logits) if return_outputs else loss

    def method_config(self) -> TPGMConfig:
        radii = self.balls.radii.tolist() if self.balls.radii is not None else None
        return TPGMConfig(
            head_modules=list(self.head_modules),
            norm=self.args.norm,
            num_backbone_params=self.anchor.num_backbone_params,
            num_head_params=self.anchor.num_head_params,
            projection_steps=int(self.args.projection_steps),
            radii=dict(zip(self.anchor.backbone_names, radii, strict=False)) if radii is not None else None,
        )
