"""The pretrained anchor of fine-tuning: the backbone's pretrained values μ, the head's 0, and the
squared distances of the current weights to them (the quantity every L2-SP-style prior needs)."""

from __future__ import annotations

import os

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
        self.prior_mean = [p.detach().clone() for p in self.backbone]  # sharded like the weights under FSDP2
        self.process_group, self.sharded = _shard_layout(self.trainable)
        sharded = dict(zip(map(id, self.trainable), self.sharded, strict=False))
        self._sharded_backbone = [sharded[id(p)] for p in self.backbone]
        self._sharded_head = [sharded[id(p)] for p in self.head]
        self.num_backbone_params = sum(p.numel() for p in self.backbone)
        self.num_head_params = sum(p.numel() for p in self.head)
        self.num_params = self.num_backbone_params + self.num_head_params
        self.accumulation_dtype = accumulation_dtype(self.trainable[0].device if self.trainable else "cpu")

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

    def squared_distances_per_tensor(self, deferred: DeferredDistanceGradients | None = None):
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
        for p, mu, g in zip(self.backbone, self.prior_mean, grad_backbone, strict=False):
            _accumulate(p, torch.sub(local(p), local(mu)).mul_(_coefficient(g, p.dtype)))
        for p, g in zip(self.head, grad_head, strict=False):
            _accumulate(p, local(p).detach() * _coefficient(g, p.dtype))

    @torch.no_grad()
    def _squared_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.trainable[0].device if self.trainable else None
        dtype = self.accumulation_dtype
        backbone = [
            torch.sub(local(p), local(mu)).square_().sum().to(dtype)
            for p, mu in zip(self.backbone, self.prior_mean, strict=False)
        ]
        head = [local(p).square().sum().to(dtype) for p in self.head]
        backbone, head = (
            torch.stack(backbone) if backbone else torch.zeros(0, dtype=dtype, device=device),
            torch.stack(head) if head else torch.zeros(0, dtype=dtype, device=device),
        )
        if self.process_group is not None:  # FSDP2: each rank summed its own shard of the sharded tensors
            backbone, head = (
                sum_over_shards(backbone, self._sharded_backbone, self.process_group),
                sum_over_shards(head, self._sharded_head, self.process_group),
            )
        return backbone, head


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
            for p, mu, g in zip(anchor.backbone, anchor.prior_mean, grad_backbone, strict=False)
        ]
        grads += [p.detach() * _coefficient(g, p.dtype) for p, g in zip(anchor.head, grad_head, strict=False)]
        return (None, None, *grads)


ACCUMULATION_DTYPE_VARIABLE = "HF_DEELBO_ACCUMULATION_DTYPE"


def accumulation_dtype(device) -> torch.dtype:
    """The dtype the squared distances, the KL and the draw's dL/dσ are summed in: float64, except on
    a device without it (Apple's MPS), where it is float32: per-tensor sums in the weights' float32,
    added over at most a few hundred tensors (a relative error of a few 1e-7, below what the
    learned λ, τ, σ resolve). HF_DEELBO_ACCUMULATION_DTYPE=float32 asks for float32 on any device
    (how the tests run that path without a Mac)."""
    if os.environ.get(ACCUMULATION_DTYPE_VARIABLE, "").lower() == "float32" or torch.device(device).type == "mps":
        return torch.float32
    return torch.float64


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
    """p.grad += grad, `grad` being the local shard's under FSDP2."""
    if p.grad is None:
        p.grad = grad if not _is_dtensor(p) else torch.zeros_like(p)
        if not _is_dtensor(p):
            return
    local(p.grad).add_(grad)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (FSDP2's sharded parameters), else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_layout(tensors: list[torch.Tensor]):
    """(process group, [is sharded]) of parameters sharded by FSDP2 (`fully_shard`: DTensors with
    `Shard(0)` on one 1-D mesh); (None, [False, ...]) when none is a DTensor."""
    sharded = [_is_dtensor(t) for t in tensors]
    if not any(sharded):
        return None, sharded
    from torch.distributed.tensor import Shard

    meshes = {t.device_mesh for t in tensors if _is_dtensor(t)}
    layouts = {tuple(t.placements) for t in tensors if _is_dtensor(t)}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1 or layouts != {(Shard(0),)}:
        raise NotImplementedError(
            f"Sharded parameters are supported as torch's fully_shard makes them (Shard(0) on one 1-D device mesh); got "
            f"placements {sorted(map(str, layouts))} on {len(meshes)} mesh(es). Shard with fully_shard(model) on a 1-D mesh."
        )
    return next(iter(meshes)).get_group(), sharded


def sum_over_shards(values: torch.Tensor, sharded: list[bool], group) -> torch.Tensor:
    """`values` (one per tensor, each summed over this rank's shard where `sharded`) with the sharded
    entries summed over the ranks of `group`; the others (replicated tensors) are left as they are."""
    index = torch.tensor([i for i, flag in enumerate(sharded) if flag], dtype=torch.long, device=values.device)
    part = values.index_select(0, index)
    torch.distributed.all_reduce(part, group=group)
    return values.index_copy(0, index, part)


def _coefficient(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2·grad (float64) in the weights' dtype, capped at its largest finite value. With σ at its
    floor and m_b = μ, the prior variance is ~1e-60 and the coefficient ~1e60, which a float32
    cast turns into inf and inf · (m − μ = 0) into NaN; capped, those gradients are 0, and any
    nonzero one is still far beyond what gradient clipping lets through."""
    return (2 * grad).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
