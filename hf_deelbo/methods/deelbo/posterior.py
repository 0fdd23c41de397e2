"""The Gaussian posterior q(w) = N(m, σ²I) over the trainable weights.

m are the network's ordinary weights; one scalar σ = softplus(ρ) is shared by every coordinate.
ρ is the only new trainable parameter; it stays in float32 whatever the model's precision.

With `posterior_covariance="diagonal"`, q(w) = N(m, diag(s)), s_i = σ_i², σ_i = softplus(ρ_i): ρ
is one flat float32 vector of D numbers, split over the trainable tensors in `named_parameters()`
order as ε is, each ρ_i initialised so that σ_i = `sigma_init`. The draw is w̃ = m + σ ⊙ ε and

    dL/dρ_i = (dL/dw̃_i · ε_i) σ'(ρ_i) + ∂(KL/(κN))/∂ρ_i,    σ'(ρ) = sigmoid(ρ).

Sampling mechanisms (`DEELBoTrainingArguments.sampling_mechanism`):

- in place (`perturb_in_place`, `InPlaceDraw`, the default): σε is added to the weights before the
  forward pass and subtracted after the backward pass; ε is drawn tensor by tensor and replayed
  from the generator's saved state, never stored, so the step needs plain training's memory plus
  μ and one tensor's ε. dL/dm = dL/dw̃ comes from backward; dL/dρ = Σ ⟨dL/dw̃, ε⟩ · σ'(ρ) and the KL's
  gradients to m are formed after the restore. Works on DDP modules and on parameters sharded by
  FSDP2's `fully_shard` (each rank perturbs its own shard; sums over shards are all-reduced). The
  restore is exact up to the rounding of m + σε (`InPlaceDraw`).
- `functional_call` (`sample_parameters`): the model runs through `torch.func.functional_call` with
  w̃ = m + σε as separate tensors, autograd carrying the gradients to m and ρ (`_Perturb`). One more
  copy of the weights and one of ε during the step; m is never touched. It must be called on the
  *wrapped* model: on the DDP wrapper the gradient all-reduce still happens (on the unwrapped module
  it is silently skipped); FSDP's unshard hooks overwrite its substitutions, so it refuses sharded
  parameters.

Both draw the same ε (one standard-normal vector of length D from the same generator, split in
`named_parameters()` order; on CPU the very same numbers). `benchmarks/sampling.py` and
`benchmarks/overhead.py` measure both (docs/benchmarks.md): in place holds ~1.2× plain training's
peak memory on an 85M-parameter ViT against ~1.8× for functional_call, and draws ε twice per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.anchor import DeferredDistanceGradients, PretrainedAnchor, accumulation_dtype, local
from ...core.groups import ParameterGroups
from .objective import (
    diagonal_gaussian_kl,
    gaussian_kl,
    mean_prior_variance,
    optimal_diagonal_prior_variance,
    optimal_prior_variance,
)

# How the backbone's prior variance is shared (`DEELBoTrainingArguments.prior_variance_grouping`):
# one λ for the whole backbone, or one λ_l per backbone tensor.
PRIOR_VARIANCE_GROUPINGS = ("backbone", "layer")
# The posterior's covariance (`DEELBoTrainingArguments.posterior_covariance`): σ²I with one σ, or
# diag(σ_i²) with one σ_i per weight.
POSTERIOR_COVARIANCES = ("isotropic", "diagonal")
# A diagonal posterior's ρ, by parameter name, in each checkpoint and next to a saved model's weights.
POSTERIOR_RHO_NAME = "deelbo_posterior_rho.safetensors"


def inverse_softplus(y: float) -> float:
    """ρ such that softplus(ρ) = y, stable for small y (softplus(ρ) ≈ e^ρ there)."""
    return y + math.log(-math.expm1(-y))


class IsotropicGaussianPosterior(nn.Module):
    """q(w) = N(m, σ²I) with σ = softplus(ρ), plus the prior mean μ of the backbone.

    Args:
        model: the model being fine-tuned; its trainable parameters are m.
        groups: backbone and head parameter names (`split_parameters`).
        sigma_init: initial σ (the paper uses 1e-4).
        prior_variance_grouping: `"backbone"`, one prior variance λ for the whole backbone
            (p(w_b) = N(μ, λI)), or `"layer"`, one λ_l per backbone tensor l (p(w_b,l) =
            N(μ_l, λ_l I)), in `backbone_names` order; the head keeps one τ either way.
        posterior_covariance: `"isotropic"`, q(w) = N(m, σ²I) with ρ a scalar, or `"diagonal"`,
            q(w) = N(m, diag(σ_i²)) with ρ a vector of D (not with FSDP2-sharded parameters).

    The prior mean μ is a snapshot of the backbone weights taken here, so it stays the
    pretrained weights when a checkpoint is later loaded into the model.

    With `"layer"` grouping the backbone's squared distances, sizes and prior variances are
    float64 vectors over its G tensors (‖m_l − μ_l‖², D_l, λ_l), and KL_b = Σ_l KL_l:

        KL_b = Σ_l ½ [ D_l σ²/λ_l + ‖m_l − μ_l‖²/λ_l − D_l + D_l log λ_l − D_l log σ² ]
        λ_l* = ‖m_l − μ_l‖² / D_l + σ²

    With the diagonal posterior, every group g (the backbone or each backbone tensor, and the head)
    of D_g coordinates with prior N(μ_g, λ_g I) has (`objective.diagonal_gaussian_kl`)

        KL_g = ½ [ Σ_{i∈g} s_i/λ_g + ‖m_g − μ_g‖²/λ_g − D_g + D_g log λ_g − Σ_{i∈g} log s_i ]
        λ_g* = (‖m_g − μ_g‖² + Σ_{i∈g} s_i) / D_g

    (τ alike with μ = 0); with all σ_i equal to σ these are the isotropic formulas.
    """

    # σ never goes below this (ρ is projected after each step): σ² stays a normal number of the
    # accumulation dtype (float64: 1e-60; float32, on devices without float64: 1e-36), so the KL's
    # log σ² and λ* = ‖m_b − μ‖²/D_b + σ² stay finite and positive.
    min_sigma = 1e-30
    min_sigma_float32 = 1e-18

    def __init__(self, model: nn.Module, groups: ParameterGroups, sigma_init: float = 1e-4,
                 prior_variance_grouping: str = "backbone", posterior_covariance: str = "isotropic"):
        super().__init__()
        if prior_variance_grouping not in PRIOR_VARIANCE_GROUPINGS:
            raise ValueError(
                f"prior_variance_grouping must be one of {PRIOR_VARIANCE_GROUPINGS} ('backbone': one λ for the "
                f"backbone, 'layer': one λ_l per backbone tensor); got {prior_variance_grouping!r}"
            )
        if posterior_covariance not in POSTERIOR_COVARIANCES:
            raise ValueError(
                f"posterior_covariance must be one of {POSTERIOR_COVARIANCES} ('isotropic': one σ, 'diagonal': one "
                f"σ_i per weight); got {posterior_covariance!r}"
            )
        self.anchor = PretrainedAnchor(model, groups)
        self.accumulation_dtype = self.anchor.accumulation_dtype
        if self.accumulation_dtype != torch.float64:
            self.min_sigma = self.min_sigma_float32
        if posterior_covariance == "diagonal" and self.anchor.process_group is not None:
            raise NotImplementedError(
                "posterior_covariance='diagonal' does not support parameters sharded by FSDP2's fully_shard (ρ would "
                "have to be sharded like each weight): use posterior_covariance='isotropic', or DDP."
            )
        device = self.anchor.trainable[0].device
        self.posterior_covariance = posterior_covariance
        shape = (self.anchor.num_params,) if posterior_covariance == "diagonal" else ()
        self.rho = nn.Parameter(torch.full(shape, inverse_softplus(sigma_init), dtype=torch.float32, device=device))
        self._wrapped_names: dict[int, list[str]] = {}
        self._sizes = [m.numel() for m in self.anchor.trainable]
        # Where each backbone and head tensor sits in `anchor.trainable` (the order of ρ's pieces).
        position = {id(p): i for i, p in enumerate(self.anchor.trainable)}
        self._backbone_index = torch.tensor([position[id(p)] for p in self.anchor.backbone], dtype=torch.long,
                                            device=device)
        self._head_index = torch.tensor([position[id(p)] for p in self.anchor.head], dtype=torch.long, device=device)
        self.prior_variance_grouping = prior_variance_grouping
        self._backbone_group_sizes = None
        if self.layer_wise:
            sizes = [p.numel() for p in self.anchor.backbone]  # the global size of an FSDP2-sharded tensor
            self._backbone_group_sizes = torch.tensor(sizes, dtype=self.accumulation_dtype, device=device)

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

    @property
    def diagonal(self) -> bool:
        """Whether each weight has a σ_i of its own (`posterior_covariance="diagonal"`)."""
        return self.posterior_covariance == "diagonal"

    @property
    def parameter_names(self) -> list[str]:
        """The trainable parameters' names in the order of ε and of a diagonal ρ's pieces."""
        return list(self.anchor.parameter_names)

    def rho_pieces(self) -> dict[str, torch.Tensor]:
        """A diagonal posterior's ρ by parameter name, each piece shaped like its weight (copies: ready
        for `safetensors.torch.save_file`, which refuses views of one storage)."""
        return {name: piece.detach().view(m.shape).clone()
                for name, piece, m in zip(self.parameter_names, self.rho.split(self._sizes), self.anchor.trainable,
                                          strict=True)}

    @torch.no_grad()
    def load_rho_pieces(self, pieces: dict[str, torch.Tensor]) -> None:
        """Write a diagonal posterior's ρ from `rho_pieces`'s dict (bit for bit)."""
        missing = [name for name in self.parameter_names if name not in pieces]
        if missing:
            raise ValueError(f"The saved ρ lacks the trainable parameters {missing[:5]}{'...' if len(missing) > 5 else ''}.")
        for name, target, m in zip(self.parameter_names, self.rho.split(self._sizes), self.anchor.trainable,
                                   strict=True):
            if pieces[name].shape != m.shape:
                raise ValueError(f"The saved ρ of {name} has shape {tuple(pieces[name].shape)}; the weight has "
                                 f"{tuple(m.shape)}.")
            target.copy_(pieces[name].reshape(-1))

    def root_mean_square_sigma(self) -> torch.Tensor:
        """The scalar σ that is logged and stored: σ itself, or for a diagonal posterior the root mean
        square √(Σ_i σ_i² / D) over all D weights (float32, on the device; no synchronisation)."""
        if not self.diagonal:
            return self.sigma()
        return self.posterior_variance().detach().mean().sqrt().float()

    def summed_posterior_variances(self):
        """A diagonal posterior's (Σ s_i, Σ log s_i) per group as the prior variances are grouped:
        ((backbone Σ s_i, head Σ s_i), (backbone Σ log s_i, head Σ log s_i)), float64 and
        differentiable w.r.t. ρ; the backbone's are vectors over its tensors with "layer" grouping."""
        variance = self.posterior_variance()
        per_tensor = torch.stack([piece.sum() for piece in variance.split(self._sizes)])
        logs = torch.stack([piece.log().sum() for piece in variance.split(self._sizes)])

        def grouped(values):
            backbone, head = values[self._backbone_index], values[self._head_index].sum()
            return (backbone if self.layer_wise else backbone.sum()), head

        return grouped(per_tensor), grouped(logs)

    @property
    def layer_wise(self) -> bool:
        """Whether each backbone tensor has a prior variance λ_l of its own (`prior_variance_grouping="layer"`)."""
        return self.prior_variance_grouping == "layer"

    @property
    def backbone_group_names(self) -> list[str] | None:
        """The backbone tensors λ_l belong to, in order ("layer" grouping); None for one λ."""
        return list(self.backbone_names) if self.layer_wise else None

    @property
    def backbone_group_sizes(self):
        """D_b (an int) for one λ; the float64 vector of the tensors' sizes D_l ("layer" grouping)."""
        return self._backbone_group_sizes if self.layer_wise else self.num_backbone_params

    def grouped_distances(self, per_tensor: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone, head) squared distances as the prior variances are grouped, from the per-tensor
        vectors of `PretrainedAnchor.squared_distances_per_tensor`: the backbone's summed to one
        scalar ("backbone") or kept per tensor ("layer"); the head's summed."""
        backbone, head = per_tensor
        return (backbone if self.layer_wise else backbone.sum()), head.sum()

    def as_backbone_prior_variance(self, value):
        """λ as `kl` takes it: a vector given as a list (restored from JSON) becomes a float64 tensor
        on the weights' device; anything else is returned as it is."""
        if self.layer_wise and not isinstance(value, torch.Tensor):
            return torch.tensor(value, dtype=self.accumulation_dtype, device=self.rho.device)
        return value

    def mean_backbone_prior_variance(self, backbone_prior_variance):
        """λ itself for one λ; for layer-wise λ_l their D-weighted harmonic mean λ̄ = D_b / Σ_l (D_l/λ_l)
        (`objective.mean_prior_variance`), the scalar that is logged and stored as `lambda`."""
        if not self.layer_wise:
            return backbone_prior_variance
        return mean_prior_variance(self.as_backbone_prior_variance(backbone_prior_variance), self._backbone_group_sizes)

    def sigma(self) -> torch.Tensor:
        """σ = softplus(ρ) (at least `min_sigma`), float32, differentiable; the vector of σ_i for a
        diagonal posterior."""
        return F.softplus(self.rho).clamp_min(self.min_sigma)

    def posterior_variance(self) -> torch.Tensor:
        """σ² (σ at least `min_sigma`), float64, differentiable; the vector of s_i = σ_i² for a
        diagonal posterior."""
        return F.softplus(self.rho.to(self.accumulation_dtype)).clamp_min(self.min_sigma) ** 2

    def squared_distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖m_b − μ‖², ‖m_h‖²) as float64 scalars (`PretrainedAnchor.squared_distances`); with "layer"
        grouping the backbone's is the vector of ‖m_l − μ_l‖² (`grouped_distances`)."""
        if self.layer_wise:
            return self.grouped_distances(self.anchor.squared_distances_per_tensor())
        return self.anchor.squared_distances()

    def kl(self, backbone_prior_variance, head_prior_variance, squared_distances=None) -> torch.Tensor:
        """KL(q ‖ p_{λ,τ}) = KL_b + KL_h (float64, differentiable w.r.t. m and ρ) at fixed λ, τ;
        `squared_distances` = `self.squared_distances()` when the caller already has them. With
        "layer" grouping λ is the vector of λ_l and KL_b = Σ_l KL_l. A diagonal posterior's KL is
        `objective.diagonal_gaussian_kl`, group by group."""
        backbone_sq, head_sq = squared_distances if squared_distances is not None else self.squared_distances()
        if self.diagonal:
            (backbone_s, head_s), (backbone_log_s, head_log_s) = self.summed_posterior_variances()
            backbone_kl = diagonal_gaussian_kl(backbone_sq, self.backbone_group_sizes, backbone_s, backbone_log_s,
                                               self.as_backbone_prior_variance(backbone_prior_variance))
            head_kl = diagonal_gaussian_kl(head_sq, self.num_head_params, head_s, head_log_s, head_prior_variance)
            return (backbone_kl.sum() if self.layer_wise else backbone_kl) + head_kl
        variance = self.posterior_variance()
        backbone_kl = gaussian_kl(backbone_sq, self.backbone_group_sizes, variance,
                                  self.as_backbone_prior_variance(backbone_prior_variance))
        if self.layer_wise:
            backbone_kl = backbone_kl.sum()
        return backbone_kl + gaussian_kl(head_sq, self.num_head_params, variance, head_prior_variance)

    @torch.no_grad()
    def optimal_prior_variances(self, squared_distances=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ*, τ*) = (‖m_b − μ‖²/D_b + σ², ‖m_h‖²/K + σ²) for the current m and σ (from
        `squared_distances` = `self.squared_distances()` when the caller already has them), as
        float64 scalar tensors on the weights' device: reading them needs no synchronisation.
        With "layer" grouping λ* is the vector of λ_l* = ‖m_l − μ_l‖²/D_l + σ². A diagonal posterior's
        are λ_g* = (‖m_g − μ_g‖² + Σ_{i∈g} s_i)/D_g (`objective.optimal_diagonal_prior_variance`)."""
        backbone_sq, head_sq = squared_distances if squared_distances is not None else self.squared_distances()
        if self.diagonal:
            backbone_s, head_s = self.summed_posterior_variances()[0]
            lam = optimal_diagonal_prior_variance(backbone_sq.detach(), self.backbone_group_sizes, backbone_s)
            return lam, optimal_diagonal_prior_variance(head_sq.detach(), self.num_head_params, head_s)
        variance = self.posterior_variance()
        lam = optimal_prior_variance(backbone_sq.detach(), self.backbone_group_sizes, variance)
        tau = optimal_prior_variance(head_sq.detach(), self.num_head_params, variance)
        return lam, tau

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
        if self.anchor.process_group is not None:
            raise NotImplementedError(
                "The model's parameters are sharded (FSDP2), and functional_call substitutions are overwritten by "
                "FSDP's unshard hooks: use perturb_in_place (DEELBoTrainingArguments(sampling_mechanism='in_place'))."
            )
        noise = torch.randn(self.num_params, device=tensors[0].device, generator=generator)
        draws = _Perturb.apply(noise.split(self._sizes), self.sigma(), *tensors)
        return {name: draw for names, draw in zip(self._names_in(model), draws) for name in names}

    def perturb_in_place(self, model: nn.Module | None = None, generator: torch.Generator | None = None) -> InPlaceDraw:
        """One draw w̃ = m + σε written into the weights themselves, with the squared distances of m
        (taken first) as `draw.squared_distances`; after the backward pass, `draw.finish()` forms
        dL/dρ and puts the weights back at m (`InPlaceDraw`). ε is the same vector as
        `sample_parameters`'s on CPU: same generator, same numbers, same generator state after.
        `model`, if given, is checked to hold the posterior's parameters."""
        if model is not None:
            self._names_in(model)
        return InPlaceDraw(self, generator)


def default_generator(device: torch.device | str) -> torch.Generator | None:
    """The generator `torch.randn(..., device=device)` uses when given none (the one Trainer's
    checkpoints save the state of), or None for a device torch gives none for (`meta`): the
    in-place draw replays ε from it, so it needs one. cpu; cuda, xpu and the other accelerators
    with `torch.<device>.default_generators`; mps."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    generators = getattr(module, "default_generators", None)
    if generators:
        index = device.index if device.index is not None else module.current_device()
        return generators[index]
    if device.type == "mps" and hasattr(torch.mps, "_get_default_mps_generator"):
        return torch.mps._get_default_mps_generator()
    return None


def in_place_supported(device: torch.device | str) -> bool:
    """Whether `sampling_mechanism='in_place'` can draw on `device` (it has a default generator)."""
    return default_generator(device) is not None


def _default_generator(device: torch.device) -> torch.Generator:
    generator = default_generator(device)
    if generator is None:
        raise NotImplementedError(
            f"sampling_mechanism='in_place' draws ε from the device's default generator, and torch has none for "
            f"{device}. Use sampling_mechanism='functional_call'."
        )
    return generator


def _noise_pieces(sizes: list[int], generator: torch.Generator, device: torch.device):
    """ε = torch.randn(sum(sizes), generator=generator) split into pieces of `sizes`, yielded one at a
    time without ever holding ε whole.

    torch's CPU normal sampler fills a float32 tensor of at least 16 numbers with one uniform draw per
    number, in order, transforms consecutive blocks of 16 (Box–Muller), and, if the length is not a
    multiple of 16, redraws the last 16. Drawn in chunks that start at multiples of 16 (the last one
    at least 16 long), ε is therefore the same numbers and leaves the generator in the same state as
    one call (tests/test_in_place.py checks both). On CUDA (Philox) the chunks are a different,
    equally valid draw: the same in `InPlaceDraw`'s two passes, not the same as `sample_parameters`'s.
    """
    total, produced, start = sum(sizes), 0, 0
    leftover = torch.empty(0, device=device)
    for size in sizes:
        stop = start + size
        if stop > produced:
            target = min(-(-stop // 16) * 16, total)
            if total - target < 16:  # no chunk shorter than 16 at the end: the sampler treats those differently
                target = total
            chunk = torch.empty(target - start, device=device)
            chunk[: produced - start].copy_(leftover)
            chunk[produced - start :].normal_(generator=generator)
            produced = target
        else:
            chunk = leftover
        yield chunk[:size]
        leftover = chunk[size:].clone()  # what the next piece starts with (fewer than 16 numbers, or the tail)
        start = stop


def _add_scaled_noise(m: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, sign: int) -> None:
    """m += σε (sign 1), rounded as `_Perturb.forward` rounds m + σε (one fused addcmul in float32),
    or m −= σε (sign −1) with σε rounded first: a weight at 0 (a fresh bias) comes back exactly 0,
    and w̃ = m whenever σε is below half an ulp of m, so the restore is exact as σ → 0; a fused
    subtraction would leave the product's rounding error behind instead. The restore scales ε in
    place (its last use), so it needs no tensor of its own."""
    if sign > 0 and m.dtype == eps.dtype:
        m.addcmul_(eps, sigma)
    elif m.dtype == eps.dtype:
        m.sub_(eps.mul_(sigma))
    else:
        m.add_((sigma * eps).to(m.dtype), alpha=sign)


def _shard_of(m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """ε_l (flat, for the whole tensor m_l) as m_l's local shard: all of it, or under FSDP2 the rows
    [offset, offset + local rows) this rank holds, so every rank perturbs its shard with the same
    numbers a single process would."""
    if type(m).__name__ != "DTensor":
        return eps.view_as(m)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(m.shape, m.device_mesh, m.placements)
    return eps.view(m.shape).narrow(0, offset[0], shape[0])


def _noise_dot(grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """⟨grad, ε⟩ in the wider of the two dtypes, as `_Perturb.backward` forms it."""
    if grad.dtype == eps.dtype:
        return torch.dot(grad.reshape(-1), eps.reshape(-1))
    dtype = torch.promote_types(grad.dtype, eps.dtype)
    return torch.dot(grad.reshape(-1).to(dtype), eps.reshape(-1).to(dtype))


def _noise_product(grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """grad ⊙ ε in float32 (or float64 for a float64 gradient), shaped like grad: a diagonal
    posterior's dL/dσ_l, as `_Perturb.backward` forms it."""
    dtype = torch.promote_types(grad.dtype, eps.dtype)
    return grad.to(dtype) * eps.view(grad.shape).to(dtype)


class InPlaceDraw:
    """One draw w̃ = m + σε held in the model's own weights for one forward and backward pass.

    The memory of the step is the memory of plain training plus μ and one tensor's ε at a time:
    neither ε nor w̃ exists as a second copy of the weights. The steps:

    1. the squared distances ‖m_b − μ‖² (per tensor with "layer" grouping), ‖m_h‖² at m
       (`squared_distances`), whose gradients to m are
       deferred to step 4 (in backward the weights are w̃, not m);
    2. the generator's state is saved, and for each trainable tensor l, in `named_parameters()` order:
       ε_l, the next piece of ε; ⟨grad_l, ε_l⟩ if l already holds a gradient (gradient accumulation);
       m_l ← m_l + σε_l in place;
    3. the caller runs forward and backward: grad_l gains dNLL/dw̃_l (DDP all-reduces it, as usual);
    4. `finish()` replays ε from the saved state, tensor by tensor: dL/dσ = Σ_l ⟨grad_l, ε_l⟩ (minus the
       part from step 2), w̃_l ← w̃_l − σε_l, then adds the KL's 2c(m − μ) to grad_l and sends dL/dσ
       through σ = softplus(ρ) to ρ.grad by autograd.

    Step 4's subtraction restores m up to the rounding of w̃ (|m' − m| ≤ 2⁻²³·max(|m|, |σε|); exact
    for about 99 % of weights at σ = 1e-4, for weights at 0, and whenever σε is below half an ulp of
    m). Where σε is large next to m, m + σε has lost m's low bits and no restore can be exact. The
    draw is deterministic, so resume and DDP stay exact. `restore()` puts the weights back without
    gradients (an aborted step, or a forward pass without backward).

    With a diagonal posterior the draw is m_l ± σ_l ⊙ ε_l (σ_l the piece of the vector σ belonging
    to tensor l), and step 4 forms the vector dL/dσ_l = grad_l ⊙ ε_l instead of the dot product
    (step 2 subtracts the earlier micro-batches' grad_l ⊙ ε_l from a D-sized buffer, so nothing
    else is stored), sent through σ = softplus(ρ) to ρ.grad by autograd.
    """

    def __init__(self, posterior: IsotropicGaussianPosterior, generator: torch.Generator | None = None):
        anchor = posterior.anchor
        self._tensors, self._sizes = anchor.trainable, posterior._sizes
        self._device = self._tensors[0].device
        self._rho = posterior.rho
        self._dtype = posterior.accumulation_dtype
        self._group = anchor.process_group
        self._sharded = dict(zip(map(id, self._tensors), anchor.sharded))
        self._deferred = DeferredDistanceGradients(anchor)
        self.squared_distances = posterior.grouped_distances(anchor.squared_distances_per_tensor(self._deferred))
        self.sigma = posterior.sigma()  # differentiable: finish() sends dL/dσ through it
        self._diagonal = posterior.diagonal
        generator = generator if generator is not None else _default_generator(self._device)
        self._state = generator.get_state()
        self._earlier_dots = []
        self._grad_sigma = None  # diagonal: the D-sized dL/dσ, formed in place
        with torch.no_grad():
            for m, eps, sigma in self._with_sigma(zip(self._tensors, _noise_pieces(self._sizes, generator,
                                                                                   self._device), strict=True)):
                eps = _shard_of(m, eps)
                if m.grad is not None:
                    if self._diagonal:
                        self._grad_sigma_of(m).sub_(_noise_product(local(m.grad), eps))
                    else:
                        self._earlier_dots.append((_noise_dot(local(m.grad), eps), m))
                _add_scaled_noise(local(m), eps, sigma, 1)
        self.pending = True

    def _with_sigma(self, pieces):
        """(m_l, ε_l, σ) per tensor: the scalar σ, or a diagonal posterior's σ_l shaped like m_l."""
        sigma = self.sigma.detach()
        if not self._diagonal:
            return ((m, eps, sigma) for m, eps in pieces)
        return ((m, eps, s.view(m.shape)) for (m, eps), s in zip(pieces, sigma.split(self._sizes), strict=True))

    def _grad_sigma_of(self, m: torch.Tensor) -> torch.Tensor:
        """The piece of the diagonal dL/dσ buffer that belongs to tensor m, shaped like m."""
        if self._grad_sigma is None:
            self._grad_sigma = torch.zeros_like(self.sigma, dtype=torch.float32)
            self._pieces_by_id = {id(t): (piece, t.shape) for t, piece in
                                  zip(self._tensors, self._grad_sigma.split(self._sizes), strict=True)}
        piece, shape = self._pieces_by_id[id(m)]
        return piece.view(shape)

    def _replay(self):
        generator = torch.Generator(device=self._device)
        generator.set_state(self._state)
        return zip(self._tensors, _noise_pieces(self._sizes, generator, self._device))

    def finish(self) -> None:
        """After the backward pass: dL/dρ into ρ.grad, the weights back at m, the KL's gradients to m."""
        if not self.pending:
            raise RuntimeError("This in-place draw was already finished or restored.")
        dots = []
        with torch.no_grad():
            for m, eps, sigma in self._with_sigma(self._replay()):
                eps = _shard_of(m, eps)
                if m.grad is not None:
                    if self._diagonal:
                        self._grad_sigma_of(m).add_(_noise_product(local(m.grad), eps))
                    else:
                        dots.append((_noise_dot(local(m.grad), eps), m))
                _add_scaled_noise(local(m), eps, sigma, -1)
            self.pending = False
            self._deferred.add_to_grads()
        if self._diagonal:
            if self._grad_sigma is not None:
                self.sigma.backward(self._grad_sigma)
            return
        if dots or self._group is not None:
            grad_sigma = self._sum_dots(dots)
            if self._earlier_dots:
                grad_sigma = grad_sigma - self._sum_dots(self._earlier_dots)
            self.sigma.backward(grad_sigma.float())

    def _sum_dots(self, dots: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Σ_l ⟨grad_l, ε_l⟩ in float64; under FSDP2 the sharded tensors' shares summed over ranks
        (FSDP has averaged their gradients over ranks already, as DDP averages whole ones)."""
        if self._group is None:
            return torch.stack([d for d, _ in dots]).sum(dtype=self._dtype)
        values = torch.stack([d.to(self._dtype) for d, _ in dots]) if dots else torch.zeros(0, dtype=self._dtype,
                                                                                             device=self._device)
        sharded = torch.tensor([self._sharded[id(m)] for _, m in dots], dtype=torch.bool, device=values.device)
        shards = torch.where(sharded, values, 0.0).sum()
        torch.distributed.all_reduce(shards, group=self._group)
        return torch.where(sharded, 0.0, values).sum() + shards

    @torch.no_grad()
    def restore(self) -> None:
        """The weights back at m, no gradients formed."""
        if self.pending:
            for m, eps, sigma in self._with_sigma(self._replay()):
                _add_scaled_noise(local(m), _shard_of(m, eps), sigma, -1)
            self.pending = False


class _Perturb(torch.autograd.Function):
    """w̃_l = m_l + σ ε_l for every tensor l, one fused pass per tensor (`addcmul`).

    Backward passes dL/dw̃_l to m_l unchanged and forms dL/dσ = Σ_l ⟨dL/dw̃_l, ε_l⟩ with one dot
    product per tensor. With a diagonal posterior σ is the vector of σ_i (split over the tensors
    as ε is), w̃_l = m_l + σ_l ⊙ ε_l and dL/dσ_l = dL/dw̃_l ⊙ ε_l. Plain autograd of `m + σ * ε` would also write σε, concatenate the
    gradients and multiply them by ε: three more weight-sized passes per step, which dominate the
    step when the batch's activations are small next to the weights.
    """

    @staticmethod
    def forward(ctx, pieces, sigma, *tensors):
        ctx.set_materialize_grads(False)
        ctx.pieces = pieces  # flat views of one noise vector
        ctx.diagonal = sigma.ndim > 0
        sigmas = [s.view(m.shape) for s, m in zip(sigma.split([p.numel() for p in pieces]), tensors, strict=True)] if (
            ctx.diagonal) else [sigma] * len(tensors)
        # σε is formed in ε's precision (float32) and then added in the weight's; the fused
        # addcmul does exactly that for float32 weights.
        return tuple(
            torch.addcmul(m, eps.view_as(m), s) if m.dtype == eps.dtype else m + (s * eps.view_as(m)).to(m.dtype)
            for m, eps, s in zip(tensors, pieces, sigmas, strict=True)
        )

    @staticmethod
    def backward(ctx, *grads):
        if ctx.diagonal:  # dL/dσ_l = dL/dw̃_l ⊙ ε_l; zero for a weight the forward pass did not use
            grad_sigma = torch.cat([
                _noise_product(grad, eps).reshape(-1).float() if grad is not None else torch.zeros_like(eps)
                for grad, eps in zip(grads, ctx.pieces, strict=True)
            ])
            return (None, grad_sigma, *grads)
        # Each dot product in the wider of the two dtypes (a bfloat16 gradient against float32 ε
        # is summed in float32; a float64 one in float64).
        dots = [
            torch.dot(grad.reshape(-1), eps) if grad.dtype == eps.dtype
            else torch.dot(*(t.to(torch.promote_types(grad.dtype, eps.dtype)) for t in (grad.reshape(-1), eps)))
            for grad, eps in zip(grads, ctx.pieces)
            if grad is not None  # None: the weight took no part in the forward pass
        ]
        grad_sigma = torch.stack(dots).sum(dtype=accumulation_dtype(dots[0].device)).float() if dots else None
        return (None, grad_sigma, *grads)
