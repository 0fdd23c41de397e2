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
`benchmarks/overhead.py` measure both (docs/benchmarks/protocol-v1.md): in place holds ~1.2× plain training's
peak memory on an 85M-parameter ViT against ~1.8× for functional_call, and draws ε twice per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.anchor import PretrainedAnchor
from ...core.groups import ParameterGroups
from .choices import PosteriorCovariance, PriorVarianceGrouping
from .objective import (
    diagonal_gaussian_kl,
    gaussian_kl,
    mean_prior_variance,
    optimal_diagonal_prior_variance,
    optimal_prior_variance,
)
from .sampling import InPlaceDraw, _Perturb

# A diagonal posterior's ρ, by parameter name, in each checkpoint and next to a saved model's weights.
POSTERIOR_RHO_NAME = "deelbo_posterior_rho.safetensors"


def inverse_softplus(y: float) -> float:
    """ρ such that softplus(ρ) = y, stable for small y (softplus(ρ) ≈ e^ρ there)."""
    return y + math.log(-math.expm1(-y))


class GaussianPosterior(nn.Module):
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

    def __init__(
        self,
        model: nn.Module,
        groups: ParameterGroups,
        sigma_init: float = 1e-4,
        prior_variance_grouping: str = "backbone",
        posterior_covariance: str = "isotropic",
    ):
        super().__init__()
        prior_variance_grouping = PriorVarianceGrouping.check("prior_variance_grouping", prior_variance_grouping)
        posterior_covariance = PosteriorCovariance.check("posterior_covariance", posterior_covariance)
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
        self._backbone_index = torch.tensor(
            [position[id(p)] for p in self.anchor.backbone], dtype=torch.long, device=device
        )
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
        return dict(zip(self.anchor.backbone_names, self.anchor.prior_mean, strict=False))

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
        return {
            name: piece.detach().view(m.shape).clone()
            for name, piece, m in zip(
                self.parameter_names, self.rho.split(self._sizes), self.anchor.trainable, strict=True
            )
        }

    @torch.no_grad()
    def load_rho_pieces(self, pieces: dict[str, torch.Tensor]) -> None:
        """Write a diagonal posterior's ρ from `rho_pieces`'s dict (bit for bit)."""
        missing = [name for name in self.parameter_names if name not in pieces]
        if missing:
            raise ValueError(
                f"The saved ρ lacks the trainable parameters {missing[:5]}{'...' if len(missing) > 5 else ''}."
            )
        for name, target, m in zip(
            self.parameter_names, self.rho.split(self._sizes), self.anchor.trainable, strict=True
        ):
            if pieces[name].shape != m.shape:
                raise ValueError(
                    f"The saved ρ of {name} has shape {tuple(pieces[name].shape)}; the weight has {tuple(m.shape)}."
                )
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
        return mean_prior_variance(
            self.as_backbone_prior_variance(backbone_prior_variance), self._backbone_group_sizes
        )

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
            backbone_kl = diagonal_gaussian_kl(
                backbone_sq,
                self.backbone_group_sizes,
                backbone_s,
                backbone_log_s,
                self.as_backbone_prior_variance(backbone_prior_variance),
            )
            head_kl = diagonal_gaussian_kl(head_sq, self.num_head_params, head_s, head_log_s, head_prior_variance)
            return (backbone_kl.sum() if self.layer_wise else backbone_kl) + head_kl
        variance = self.posterior_variance()
        backbone_kl = gaussian_kl(
            backbone_sq, self.backbone_group_sizes, variance, self.as_backbone_prior_variance(backbone_prior_variance)
        )
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

    def sample_parameters(self, model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
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
        return {name: draw for names, draw in zip(self._names_in(model), draws, strict=False) for name in names}

    def perturb_in_place(
        self, model: nn.Module | None = None, generator: torch.Generator | None = None
    ) -> InPlaceDraw:
        """One draw w̃ = m + σε written into the weights themselves, with the squared distances of m
        (taken first) as `draw.squared_distances`; after the backward pass, `draw.finish()` forms
        dL/dρ and puts the weights back at m (`InPlaceDraw`). ε is the same vector as
        `sample_parameters`'s on CPU: same generator, same numbers, same generator state after.
        `model`, if given, is checked to hold the posterior's parameters."""
        if model is not None:
            self._names_in(model)
        return InPlaceDraw(self, generator)


def __getattr__(name: str):
    # The posterior's earlier name: it implements the diagonal posterior too.
    if name == "IsotropicGaussianPosterior":
        import warnings

        warnings.warn(
            "IsotropicGaussianPosterior is now GaussianPosterior (it also implements the diagonal "
            "posterior); the old name goes in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return GaussianPosterior
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
