"""The pretrained anchor of fine-tuning: the backbone's pretrained values μ, the head's 0, and the
squared distances of the current weights to them (the quantity every L2-SP-style prior needs)."""

from __future__ import annotations

import torch
from torch import nn

from .groups import ParameterGroups


class PretrainedAnchor:
    """Holds references to the model's trainable parameters, split by `groups`, and a snapshot
    μ of the backbone taken when it is built (so μ stays the pretrained weights when a checkpoint
    is later loaded into the model).

    Attributes:
        parameter_names, trainable: every trainable parameter's name and tensor, in
            `model.named_parameters()` order.
        backbone_names, head_names: the two groups.
        num_backbone_params, num_head_params, num_params: D_b, K, D.
    """

    def __init__(self, model: nn.Module, groups: ParameterGroups):
        parameters = dict(model.named_parameters())
        members = set(groups.backbone) | set(groups.head)
        self.parameter_names = [name for name in parameters if name in members]
        self.trainable = [parameters[name] for name in self.parameter_names]
        self.backbone_names = list(groups.backbone)
        self.head_names = list(groups.head)
        self.backbone = [parameters[name] for name in self.backbone_names]
        self.head = [parameters[name] for name in self.head_names]
        self.prior_mean = [p.detach().clone() for p in self.backbone]
        self.num_backbone_params = sum(p.numel() for p in self.backbone)
        self.num_head_params = sum(p.numel() for p in self.head)
        self.num_params = self.num_backbone_params + self.num_head_params

    def squared_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖m_b − μ‖², ‖m_h‖²) as float64 scalars, differentiable with respect to m.

        Each tensor is reduced in its own dtype (torch's cascade summation: about 1e-7 relative
        error in float32) and the per-tensor sums are added in float64; a float64 copy of every
        weight would cost ~6× the time for no visible gain. The gradients, 2(m_b − μ) and 2 m_h,
        are formed in backward: autograd would otherwise keep every m_b − μ alive from the forward
        pass to the backward pass, one more weight-sized copy at the step's peak.
        """
        backbone, head = self.squared_distances_per_tensor()
        return backbone.sum(), head.sum()

    def squared_distances_per_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖m_b,l − μ_l‖² for each backbone tensor l, ‖m_h,l‖² for each head tensor l): two float64
        vectors in `backbone_names` / `head_names` order, differentiable with respect to m (the
        gradients are formed in backward, as in `squared_distances`)."""
        return _SquaredDistances.apply(self, *self.backbone, *self.head)

    @torch.no_grad()
    def _squared_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.trainable[0].device if self.trainable else None
        backbone = [torch.sub(p, mu).square_().sum().double() for p, mu in zip(self.backbone, self.prior_mean)]
        head = [p.square().sum().double() for p in self.head]
        return (
            torch.stack(backbone) if backbone else torch.zeros(0, dtype=torch.float64, device=device),
            torch.stack(head) if head else torch.zeros(0, dtype=torch.float64, device=device),
        )


class _SquaredDistances(torch.autograd.Function):
    """Per-tensor ‖m_b,l − μ_l‖², ‖m_h,l‖² with d/dm_b,l = 2(m_b,l − μ_l), d/dm_h,l = 2 m_h,l formed in backward."""

    @staticmethod
    def forward(ctx, anchor: PretrainedAnchor, *parameters):
        ctx.anchor = anchor
        return anchor._squared_distances()

    @staticmethod
    def backward(ctx, grad_backbone, grad_head):
        anchor = ctx.anchor
        grads = [
            torch.sub(p, mu).mul_(_coefficient(g, p.dtype))
            for p, mu, g in zip(anchor.backbone, anchor.prior_mean, grad_backbone)
        ]
        grads += [p.detach() * _coefficient(g, p.dtype) for p, g in zip(anchor.head, grad_head)]
        return (None, *grads)


def _coefficient(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2·grad (float64) in the weights' dtype, capped at its largest finite value. With σ at its
    floor and m_b = μ, the prior variance is ~1e-60 and the coefficient ~1e60, which a float32
    cast turns into inf and inf · (m − μ = 0) into NaN; capped, those gradients are 0, and any
    nonzero one is still far beyond what gradient clipping lets through."""
    return (2 * grad).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
