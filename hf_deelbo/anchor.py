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

    def squared_distances_per_tensor(self, deferred: "DeferredDistanceGradients | None" = None):
        """(‖m_b,l − μ_l‖² for each backbone tensor l, ‖m_h,l‖² for each head tensor l): two float64
        vectors in `backbone_names` / `head_names` order, differentiable with respect to m (the
        gradients are formed in backward, as in `squared_distances`).

        With `deferred`, backward does not form the gradients to m: it hands their coefficients to
        `deferred`, whose `add_to_grads()` adds them to `.grad` later (after the weights, perturbed
        in place during the backward pass, are back at m)."""
        return _SquaredDistances.apply(self, deferred, *self.backbone, *self.head)

    @torch.no_grad()
    def add_distance_gradients(self, grad_backbone: torch.Tensor, grad_head: torch.Tensor) -> None:
        """p.grad += d(loss)/d‖·‖² · 2(m − μ) per tensor (μ = 0 for the head): the gradients
        `_SquaredDistances.backward` would have returned, from its incoming `grad_backbone`, `grad_head`."""
        for p, mu, g in zip(self.backbone, self.prior_mean, grad_backbone):
            _accumulate(p, torch.sub(p, mu).mul_(_coefficient(g, p.dtype)))
        for p, g in zip(self.head, grad_head):
            _accumulate(p, p.detach() * _coefficient(g, p.dtype))

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
    def forward(ctx, anchor: PretrainedAnchor, deferred, *parameters):
        ctx.anchor, ctx.deferred = anchor, deferred
        return anchor._squared_distances()

    @staticmethod
    def backward(ctx, grad_backbone, grad_head):
        anchor = ctx.anchor
        if ctx.deferred is not None:
            ctx.deferred.receive(grad_backbone, grad_head)
            return (None, None, *(None for _ in range(len(anchor.backbone) + len(anchor.head))))
        grads = [
            torch.sub(p, mu).mul_(_coefficient(g, p.dtype))
            for p, mu, g in zip(anchor.backbone, anchor.prior_mean, grad_backbone)
        ]
        grads += [p.detach() * _coefficient(g, p.dtype) for p, g in zip(anchor.head, grad_head)]
        return (None, None, *grads)


class DeferredDistanceGradients:
    """The coefficients d(loss)/d‖m_b,l − μ_l‖², d(loss)/d‖m_h,l‖² from one backward pass, kept
    until the weights are at m again; `add_to_grads` then adds 2·coefficient·(m − μ) to `.grad`."""

    def __init__(self, anchor: PretrainedAnchor):
        self.anchor = anchor
        self.grads: tuple[torch.Tensor, torch.Tensor] | None = None

    def receive(self, grad_backbone: torch.Tensor, grad_head: torch.Tensor) -> None:
        self.grads = (grad_backbone, grad_head)

    def add_to_grads(self) -> None:
        if self.grads is not None:
            self.anchor.add_distance_gradients(*self.grads)
            self.grads = None


@torch.no_grad()
def _accumulate(p: torch.Tensor, grad: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = grad
    else:
        p.grad.add_(grad)


def _coefficient(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2·grad (float64) in the weights' dtype, capped at its largest finite value. With σ at its
    floor and m_b = μ, the prior variance is ~1e-60 and the coefficient ~1e60, which a float32
    cast turns into inf and inf · (m − μ = 0) into NaN; capped, those gradients are 0, and any
    nonzero one is still far beyond what gradient clipping lets through."""
    return (2 * grad).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
