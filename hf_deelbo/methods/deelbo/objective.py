"""The data-emphasized ELBO, as pure functions.

Harvey, Petrov, Hughes, "Learning the Regularization Strength for Deep Fine-Tuning via a
Data-Emphasized Variational Objective" (arXiv:2410.19675) and "Learning Hyperparameters via a
Data-Emphasized Variational Objective" (arXiv:2502.01861).

Symbols, used the same way in every docstring of the package:

    D_b  number of trainable backbone parameters (prior N(μ, λI), μ = pretrained weights)
    K    number of trainable head parameters     (prior N(0, τI))
    D    D_b + K
    N    number of training examples
    σ    the posterior's shared standard deviation, q(w) = N(m, σ²I); with the diagonal
         posterior q(w) = N(m, diag(s)), s_i = σ_i², one σ_i per weight
    κ    data emphasis; κ = 1 is the ordinary ELBO, the DE ELBO uses κ = D/N

The loss minimised on a minibatch B is

    mean_{i∈B} CE(f(x_i; m + σε), y_i)  +  KL(q ‖ p_{λ,τ}) / (κ N)

Every function accepts tensors (autograd flows through them) or Python floats.
"""

from __future__ import annotations

import math

import torch


def _log(x):
    return torch.log(x) if isinstance(x, torch.Tensor) else math.log(x)


def gaussian_kl(squared_distance, num_params, posterior_variance, prior_variance):
    """KL(N(m, σ²I) ‖ N(μ, λI)) over `num_params` coordinates, in closed form:

        KL = ½ [ D σ²/λ + ‖m − μ‖²/λ − D + D log λ − D log σ² ]

    Elementwise over tensors: with vectors of per-group ‖m_l − μ_l‖², D_l and λ_l (layer-wise
    prior variances) it returns the vector of the groups' KLs, whose sum is the KL of the whole.

    Args:
        squared_distance: ‖m − μ‖² (for the head, μ = 0 so it is ‖m‖²).
        num_params: D, the number of coordinates (an int, or a tensor of group sizes D_l).
        posterior_variance: σ².
        prior_variance: λ (or τ for the head).
    """
    d = num_params
    return 0.5 * (
        d * posterior_variance / prior_variance
        + squared_distance / prior_variance
        - d
        + d * _log(prior_variance)
        - d * _log(posterior_variance)
    )


def optimal_prior_variance(squared_distance, num_params, posterior_variance):
    """The prior variance that minimises `gaussian_kl` for a fixed posterior:

        λ* = ‖m − μ‖² / D + σ²

    Elementwise over tensors of groups: λ_l* = ‖m_l − μ_l‖² / D_l + σ² minimises each group's KL
    and so their sum (each λ_l enters one term only).

    Setting ∂KL/∂λ = ½ [ −D σ²/λ² − ‖m − μ‖²/λ² + D/λ ] to zero gives λ*; the σ² term keeps
    λ* > 0 when m = μ (at the first step). Plugged back in, KL* = (D/2) log(λ*/σ²).
    """
    return squared_distance / num_params + posterior_variance


def diagonal_gaussian_kl(
    squared_distance, num_params, summed_posterior_variance, summed_log_posterior_variance, prior_variance
):
    """KL(N(m, diag(s)) ‖ N(μ, λI)) over a group of D coordinates, s_i = σ_i² (diagonal posterior):

        KL = ½ [ Σ_i s_i/λ + ‖m − μ‖²/λ − D + D log λ − Σ_i log s_i ]

    the sum over coordinates of KL(N(m_i, s_i) ‖ N(μ_i, λ)). With every s_i = σ² it is `gaussian_kl`.
    Elementwise over tensors of groups, as `gaussian_kl`.

    Args:
        squared_distance: ‖m − μ‖² (for the head, μ = 0).
        num_params: D, the number of coordinates (an int, or a tensor of group sizes D_l).
        summed_posterior_variance: Σ_i s_i over the group.
        summed_log_posterior_variance: Σ_i log s_i over the group.
        prior_variance: λ (or τ for the head).
    """
    d = num_params
    return 0.5 * (
        summed_posterior_variance / prior_variance
        + squared_distance / prior_variance
        - d
        + d * _log(prior_variance)
        - summed_log_posterior_variance
    )


def optimal_diagonal_prior_variance(squared_distance, num_params, summed_posterior_variance):
    """The prior variance that minimises `diagonal_gaussian_kl` for a fixed posterior:

        λ* = (‖m − μ‖² + Σ_i s_i) / D

    from ∂KL/∂λ = ½ [ −(Σ_i s_i + ‖m − μ‖²)/λ² + D/λ ] = 0; with every s_i = σ² it is
    `optimal_prior_variance`'s ‖m − μ‖²/D + σ². Elementwise over tensors of groups.
    """
    return (squared_distance + summed_posterior_variance) / num_params


def mean_prior_variance(prior_variances, num_params):
    """The isotropic prior variance with the same mean precision as per-group variances λ_l over
    groups of D_l coordinates, their D-weighted harmonic mean:

        λ̄ = Σ_l D_l / Σ_l (D_l / λ_l)

    N(μ, λ̄I) and N(μ, diag(λ_l)) have the same trace of the precision, so α_eff = 1/(D λ̄) is the
    L2-SP strength ‖m_b − μ‖²/(2λ̄) would apply if every coordinate moved alike. One group: λ̄ = λ.
    """
    return num_params.sum() / (num_params / prior_variances).sum()


def resolve_kappa(kappa: float | None, num_params: int, num_train_examples: int) -> float:
    """κ as given, or the DE ELBO's recommended κ = D/N when `kappa` is None."""
    if kappa is None:
        return num_params / num_train_examples
    return float(kappa)


def deelbo_loss(nll, kl, kappa: float, num_train_examples: int):
    """The per-example training objective: NLL + KL / (κ N).

    With κ = D/N the prior term is KL / D, which keeps the prior from overwhelming the data when
    D ≫ N (the ordinary ELBO, κ = 1, collapses toward uniform predictions there).
    """
    return nll + kl / (kappa * num_train_examples)


def effective_l2sp_strengths(backbone_prior_variance: float, head_prior_variance: float, num_params: int):
    """The L2-SP strengths the learned prior acts like: α_eff = 1/(D λ), β_eff = 1/(D τ).

    L2-SP minimises mean CE + (α/2)‖w_b − μ‖² + (β/2)‖w_h‖²; the DE ELBO's prior term
    ‖m_b − μ‖²/(2λ D) + ‖m_h‖²/(2τ D) has the same form.
    """
    return 1.0 / (num_params * backbone_prior_variance), 1.0 / (num_params * head_prior_variance)


def max_prior_pull(posterior_std: float, num_backbone_params: int, kappa: float, num_train_examples: int) -> float:
    """The largest gradient norm with which the backbone's prior term can hold m_b back:

        sup over m_b of ‖∇_{m_b} KL*_b / (κN)‖ = √D_b / (2 κ N σ),  reached at ‖m_b − μ‖ = σ √D_b

    With λ at its optimum the term is KL*_b/(κN) = (D_b/2) log(‖m_b − μ‖²/D_b + σ²)/(κN) + const;
    its gradient has norm d / (κN (d²/D_b + σ²)) at distance d, largest at d = σ√D_b. Until σ
    grows, the backbone leaves its pretrained weights only where the data's gradient beats this
    barrier. It scales as 1/(σ√D) under κ = D/N: σ = 1e-4 on the paper's ResNet-50 (D_b = 23.5M)
    gives 1.03, about the clipping norm of its recipe; on a network of 0.4M parameters it gives 8.
    """
    return math.sqrt(num_backbone_params) / (2.0 * kappa * num_train_examples * posterior_std)


def sigma_for_prior_pull(pull: float, num_backbone_params: int, kappa: float, num_train_examples: int) -> float:
    """The σ at which `max_prior_pull` equals `pull`: σ = √D_b / (2 κ N pull) (≈ 1/(2√D_b) for pull 1, κ = D/N)."""
    return math.sqrt(num_backbone_params) / (2.0 * kappa * num_train_examples * pull)
