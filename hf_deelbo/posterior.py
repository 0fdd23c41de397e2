"""The Gaussian posterior q(w) = N(m, σ²I) over the trainable weights.

m are the network's ordinary weights; one scalar σ = softplus(ρ) is shared by every coordinate.
ρ is the only new trainable parameter; it stays in float32 whatever the model's precision.

Sampling mechanism: each training forward pass runs the model through
`torch.func.functional_call` with w̃ = m + σε substituted for the weights, and autograd carries
the gradients to m (dL/dm = dL/dw̃) and to ρ (dL/dρ = Σ dL/dw̃ · ε · σ'(ρ)).

The alternative, perturbing the weights in place and restoring them after backward, (i) cannot
restore m bit-exactly from m + σε − σε, so it needs a saved copy of m, and (ii) must compute dρ by
hand per micro-batch under gradient accumulation, where the gradient buffer already holds earlier
micro-batches. `benchmarks/sampling.py` measures both side by side (docs/benchmarks.md): where the
weights dominate the step, functional_call with the fused draw below takes 30 % less time and a
third less extra memory (4.0× and 2.2× a plain step's, against 5.7× and 3.5×); where activations
dominate, the two are within a few percent. The simpler, exact mechanism wins.

It must be called on the *wrapped* model: on the DDP wrapper the gradient all-reduce still
happens (on the unwrapped module it is silently skipped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .anchor import PretrainedAnchor
from .groups import ParameterGroups
from .objective import gaussian_kl, optimal_prior_variance


def inverse_softplus(y: float) -> float:
    """ρ such that softplus(ρ) = y, stable for small y (softplus(ρ) ≈ e^ρ there)."""
    return y + math.log(-math.expm1(-y))


class IsotropicGaussianPosterior(nn.Module):
    """q(w) = N(m, σ²I) with σ = softplus(ρ), plus the prior mean μ of the backbone.

    Args:
        model: the model being fine-tuned; its trainable parameters are m.
        groups: backbone and head parameter names (`split_parameters`).
        sigma_init: initial σ (the paper uses 1e-4).

    The prior mean μ is a snapshot of the backbone weights taken here, so it stays the
    pretrained weights when a checkpoint is later loaded into the model.
    """

    # σ never goes below this (ρ is projected after each step): σ² stays a normal float64, so the
    # KL's log σ² and λ* = ‖m_b − μ‖²/D_b + σ² stay finite and positive.
    min_sigma = 1e-30

    def __init__(self, model: nn.Module, groups: ParameterGroups, sigma_init: float = 1e-4):
        super().__init__()
        self.anchor = PretrainedAnchor(model, groups)
        device = self.anchor.trainable[0].device
        self.rho = nn.Parameter(torch.tensor(inverse_softplus(sigma_init), dtype=torch.float32, device=device))
        self._wrapped_names: dict[int, list[str]] = {}
        self._sizes = [m.numel() for m in self.anchor.trainable]

    @torch.no_grad()
    def clamp_sigma(self) -> None:
        """Project ρ so that σ ≥ `min_sigma`."""
        self.rho.clamp_(min=inverse_softplus(self.min_sigma))

    @property
    def prior_mean(self) -> dict[str, torch.Tensor]:
        """μ, the pretrained backbone weights, by parameter name."""
        return dict(zip(self.anchor.backbone_names, self.anchor.prior_mean))

    # The groups and their sizes are the anchor's.
    backbone_names = property(lambda self: self.anchor.backbone_names)
    head_names = property(lambda self: self.anchor.head_names)
    num_backbone_params = property(lambda self: self.anchor.num_backbone_params)
    num_head_params = property(lambda self: self.anchor.num_head_params)
    num_params = property(lambda self: self.anchor.num_params)

    def sigma(self) -> torch.Tensor:
        """σ = softplus(ρ) (at least `min_sigma`), float32, differentiable."""
        return F.softplus(self.rho).clamp_min(self.min_sigma)

    def posterior_variance(self) -> torch.Tensor:
        """σ² (σ at least `min_sigma`), float64, differentiable."""
        return F.softplus(self.rho.double()).clamp_min(self.min_sigma) ** 2

    def squared_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖m_b − μ‖², ‖m_h‖²) as float64 scalars (`PretrainedAnchor.squared_distances`)."""
        return self.anchor.squared_distances()

    def kl(self, backbone_prior_variance, head_prior_variance, squared_distances=None) -> torch.Tensor:
        """KL(q ‖ p_{λ,τ}) = KL_b + KL_h (float64, differentiable w.r.t. m and ρ) at fixed λ, τ;
        `squared_distances` = `self.squared_distances()` when the caller already has them."""
        backbone_sq, head_sq = squared_distances if squared_distances is not None else self.squared_distances()
        variance = self.posterior_variance()
        return gaussian_kl(backbone_sq, self.num_backbone_params, variance, backbone_prior_variance) + gaussian_kl(
            head_sq, self.num_head_params, variance, head_prior_variance
        )

    @torch.no_grad()
    def optimal_prior_variances(self, squared_distances=None) -> tuple[float, float]:
        """(λ*, τ*) = (‖m_b − μ‖²/D_b + σ², ‖m_h‖²/K + σ²) for the current m and σ (from
        `squared_distances` = `self.squared_distances()` when the caller already has them)."""
        backbone_sq, head_sq = squared_distances if squared_distances is not None else self.squared_distances()
        variance = self.posterior_variance()
        lam = optimal_prior_variance(backbone_sq, self.num_backbone_params, variance)
        tau = optimal_prior_variance(head_sq, self.num_head_params, variance)
        return lam.item(), tau.item()

    def _names_in(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Every name of each trainable parameter in `model`: one, or several when weights are tied."""
        # Wrappers (DDP's `module.`, torch.compile's `_orig_mod.`) rename parameters; match by identity.
        key = id(model)
        if key not in self._wrapped_names:
            names_by_identity: dict[int, list[str]] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                names_by_identity.setdefault(id(p), []).append(name)
            try:
                self._wrapped_names[key] = [tuple(names_by_identity[id(p)]) for p in self.anchor.trainable]
            except KeyError as error:
                raise RuntimeError(
                    "The posterior's parameters are not parameters of the model it is sampled for; "
                    "was the model replaced or sharded (FSDP) after the trainer was built?"
                ) from error
        return self._wrapped_names[key]

    def sample_parameters(
        self, model: nn.Module, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """One draw w̃ = m + σε for every trainable parameter, keyed by its name in `model` (a tied
        weight under each of its names, one draw for all), ready for
        `functional_call(model, draw, ..., tie_weights=False)`: finding the ties on every call
        walks the whole module tree, which costs more than the step's Gaussian draw on small models.

        ε is one standard-normal vector of length D drawn with `torch.randn` (float32, from
        `generator` or the global RNG, so Trainer's RNG checkpointing covers it), split over the
        trainable parameters in `model.named_parameters()` order.
        """
        tensors = self.anchor.trainable
        noise = torch.randn(self.num_params, device=tensors[0].device, generator=generator)
        draws = _Perturb.apply(noise.split(self._sizes), self.sigma(), *tensors)
        return {name: draw for names, draw in zip(self._names_in(model), draws) for name in names}


class _Perturb(torch.autograd.Function):
    """w̃_l = m_l + σ ε_l for every tensor l, one fused pass per tensor (`addcmul`).

    Backward passes dL/dw̃_l to m_l unchanged and forms dL/dσ = Σ_l ⟨dL/dw̃_l, ε_l⟩ with one dot
    product per tensor. Plain autograd of `m + σ * ε` would also write σε, concatenate the
    gradients and multiply them by ε: three more weight-sized passes per step, which dominate the
    step when the batch's activations are small next to the weights.
    """

    @staticmethod
    def forward(ctx, pieces, sigma, *tensors):
        ctx.set_materialize_grads(False)
        ctx.pieces = pieces  # flat views of one noise vector
        # σε is formed in ε's precision (float32) and then added in the weight's; the fused
        # addcmul does exactly that for float32 weights.
        return tuple(
            torch.addcmul(m, eps.view_as(m), sigma) if m.dtype == eps.dtype else m + (sigma * eps.view_as(m)).to(m.dtype)
            for m, eps in zip(tensors, pieces)
        )

    @staticmethod
    def backward(ctx, *grads):
        # Each dot product in the wider of the two dtypes (a bfloat16 gradient against float32 ε
        # is summed in float32; a float64 one in float64).
        dots = [
            torch.dot(grad.reshape(-1), eps) if grad.dtype == eps.dtype
            else torch.dot(*(t.to(torch.promote_types(grad.dtype, eps.dtype)) for t in (grad.reshape(-1), eps)))
            for grad, eps in zip(grads, ctx.pieces)
            if grad is not None  # None: the weight took no part in the forward pass
        ]
        grad_sigma = torch.stack(dots).sum(dtype=torch.float64).float() if dots else None
        return (None, grad_sigma, *grads)
