"""The equations against independent float64 references."""

import math

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch.distributions import Normal, kl_divergence

from hf_deelbo.methods.deelbo.objective import (
    deelbo_loss,
    effective_l2sp_strengths,
    gaussian_kl,
    max_prior_pull,
    optimal_prior_variance,
    resolve_kappa,
    sigma_for_prior_pull,
)
from hf_deelbo.methods.deelbo.posterior import inverse_softplus


def _reference_kl(m, mu, sigma, prior_variance):
    q = Normal(m, torch.full_like(m, sigma))
    p = Normal(mu, torch.full_like(mu, math.sqrt(prior_variance)))
    return kl_divergence(q, p).sum()


@pytest.mark.parametrize("sigma, prior_variance, scale", [(1e-4, 3e-3, 0.05), (0.3, 2.0, 1.0), (1e-2, 1e-4, 1e-3)])
def test_kl_matches_torch_distributions(sigma, prior_variance, scale):
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(1000, dtype=torch.float64, generator=generator) * scale
    mu = torch.randn(1000, dtype=torch.float64, generator=generator) * scale
    ours = gaussian_kl(((m - mu) ** 2).sum(), m.numel(), sigma**2, prior_variance)
    reference = _reference_kl(m, mu, sigma, prior_variance)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma, scale", [(1e-4, 0.05), (0.3, 1.0), (1e-2, 1e-5)])
def test_optimal_prior_variance_is_the_numerical_minimiser(sigma, scale):
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(500, dtype=torch.float64, generator=generator) * scale
    mu = torch.zeros_like(m)
    sq, d = float(((m - mu) ** 2).sum()), m.numel()
    closed_form = optimal_prior_variance(sq, d, sigma**2)

    def kl_of_log_variance(log_variance):
        return float(_reference_kl(m, mu, sigma, math.exp(log_variance)))

    numerical = minimize_scalar(kl_of_log_variance, bracket=(-40, 5), tol=1e-14)
    assert math.exp(numerical.x) == pytest.approx(closed_form, rel=1e-6)
    at_optimum = kl_of_log_variance(math.log(closed_form))
    for factor in (0.5, 0.9, 0.999, 1.001, 1.1, 2.0):
        assert kl_of_log_variance(math.log(closed_form * factor)) > at_optimum
    # Plugged in: KL* = (D/2) log(λ*/σ²)
    assert at_optimum == pytest.approx(d / 2 * math.log(closed_form / sigma**2), rel=1e-6)


def test_optimal_prior_variance_keeps_sigma_term_at_the_pretrained_weights():
    # At step 0, m_b = μ: λ* must be σ², not 0.
    assert optimal_prior_variance(0.0, 10, 1e-8) == 1e-8


def test_kl_gradients_match_autograd_of_reference():
    generator = torch.Generator().manual_seed(2)
    m = (torch.randn(50, dtype=torch.float64, generator=generator) * 0.1).requires_grad_()
    rho = torch.tensor(inverse_softplus(0.05), dtype=torch.float64, requires_grad=True)
    sigma = torch.nn.functional.softplus(rho)
    ours = gaussian_kl((m**2).sum(), m.numel(), sigma**2, 0.02)
    grad_m, grad_rho = torch.autograd.grad(ours, (m, rho))
    ref_m = m.detach().clone().requires_grad_()
    ref_rho = rho.detach().clone().requires_grad_()
    ref = kl_divergence(
        Normal(ref_m, torch.nn.functional.softplus(ref_rho).expand(50)),
        Normal(torch.zeros(50, dtype=torch.float64), torch.full((50,), math.sqrt(0.02), dtype=torch.float64)),
    ).sum()
    ref_grad_m, ref_grad_rho = torch.autograd.grad(ref, (ref_m, ref_rho))
    torch.testing.assert_close(grad_m, ref_grad_m, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_rho, ref_grad_rho, rtol=1e-10, atol=0)


def test_resolve_kappa_defaults_to_d_over_n():
    assert resolve_kappa(None, 1000, 50) == 20.0
    assert resolve_kappa(1.0, 1000, 50) == 1.0


def test_deelbo_loss_and_effective_strengths():
    assert deelbo_loss(2.0, 300.0, kappa=3.0, num_train_examples=10) == pytest.approx(12.0)
    alpha, beta = effective_l2sp_strengths(1e-3, 1e-1, 1000)
    assert alpha == pytest.approx(1.0) and beta == pytest.approx(0.01)


@pytest.mark.parametrize("sigma", [1e-30, 1e-4, 0.5, 3.0])
def test_inverse_softplus(sigma):
    rho = torch.tensor(inverse_softplus(sigma), dtype=torch.float64)
    assert float(torch.nn.functional.softplus(rho)) == pytest.approx(sigma, rel=1e-9)


def test_max_prior_pull_is_the_largest_gradient_of_the_profiled_prior_term():
    """Sweep the distance d = ‖m_b − μ‖ in float64: the gradient norm of KL_b/(κN), written out with
    torch.distributions at λ = λ* (held fixed: envelope theorem), peaks at √D_b/(2κNσ), at d = σ√D_b."""
    torch.manual_seed(0)
    num_backbone, kappa_n, sigma = 400, 400.0 + 20, 3e-3  # κN = D (κ = D/N) with a 20-parameter head
    direction = torch.randn(num_backbone, dtype=torch.float64)
    direction /= direction.norm()
    mu = torch.randn(num_backbone, dtype=torch.float64)
    norms, distances = [], torch.logspace(-4, 0, 801, dtype=torch.float64) * sigma * num_backbone**0.5 * 100
    for d in distances:
        m = (mu + d * direction).requires_grad_(True)
        lam = float(((m.detach() - mu) ** 2).mean() + sigma**2)  # λ*, held fixed (envelope theorem)
        q = torch.distributions.Normal(m, torch.full_like(m, sigma))
        p = torch.distributions.Normal(mu, torch.full_like(mu, lam**0.5))
        kl = torch.distributions.kl_divergence(q, p).sum() / kappa_n
        (gradient,) = torch.autograd.grad(kl, m)
        norms.append(float(gradient.norm()))
    peak = max(range(len(norms)), key=norms.__getitem__)
    expected = max_prior_pull(sigma, num_backbone, kappa_n, 1)
    assert norms[peak] == pytest.approx(expected, rel=1e-4)
    assert float(distances[peak]) == pytest.approx(sigma * num_backbone**0.5, rel=0.02)
    assert sigma_for_prior_pull(expected, num_backbone, kappa_n, 1) == pytest.approx(sigma, rel=1e-12)
    # the paper's setting: σ = 1e-4 on ResNet-50 (23.5M backbone parameters, κ = D/N) pulls with about 1
    assert max_prior_pull(1e-4, 23_500_000, 23_520_490, 1) == pytest.approx(1.03, abs=0.01)
