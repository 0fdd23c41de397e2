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
        parameter_names: every trainable parameter's name, in `model.named_parameters()` order.
        backbone_names, head_names: the two groups.
        num_backbone_params, num_head_params, num_params: D_b, K, D.
    """

    def __init__(self, model: nn.Module, groups: ParameterGroups):
        parameters = dict(model.named_parameters())
        members = set(groups.backbone) | set(groups.head)
        self.parameter_names = [name for name in parameters if name in members]
        self.parameters_by_name = {name: parameters[name] for name in self.parameter_names}
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
        weight would cost ~6× the time for no visible gain.
        """
        if torch.is_grad_enabled():
            backbone = sum((p - mu).square().sum().double() for p, mu in zip(self.backbone, self.prior_mean))
        else:
            backbone = sum(torch.sub(p, mu).square_().sum().double() for p, mu in zip(self.backbone, self.prior_mean))
        head = sum(p.square().sum().double() for p in self.head)
        return backbone, head
