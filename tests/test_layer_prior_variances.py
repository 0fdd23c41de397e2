"""Layer-wise prior variances (`prior_variance_grouping="layer"`): one λ_l per backbone tensor,
against float64 references written per tensor with torch.distributions; the config entry."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, build_model, image_dataset
from torch.distributions import Normal, kl_divergence
from transformers import AutoModelForImageClassification

from hf_deelbo import DEELBoTrainer
from hf_deelbo.core.groups import split_parameters
from hf_deelbo.hub.config import read_config_entry
from hf_deelbo.methods.deelbo.callback import DEELBoCallback
from hf_deelbo.methods.deelbo.config import DEELBO, deelbo_config
from hf_deelbo.methods.deelbo.objective import gaussian_kl, mean_prior_variance, optimal_prior_variance
from hf_deelbo.methods.deelbo.posterior import GaussianPosterior


def _moved_posterior(grouping="layer", sigma=0.03, seed=0):
    """A float64 TinyNet whose tensors moved from μ by different amounts, so each λ_l* differs."""
    torch.manual_seed(seed)
    model = TinyNet().double()
    posterior = GaussianPosterior(
        model, split_parameters(model, ["head"]), sigma_init=sigma, prior_variance_grouping=grouping
    )
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1) * torch.randn_like(p))
    return model, posterior


def _reference_kl(model, posterior, sigma, lam_by_name, tau):
    """Σ over tensors of KL(N(m_l, σ²) ‖ N(μ_l, λ_l)) (head: N(0, τ)), elementwise from torch.distributions."""
    mu = posterior.prior_mean
    kl = 0.0
    for name, m in model.named_parameters():
        mean, var = (mu[name], lam_by_name[name]) if name in mu else (torch.zeros_like(m), tau)
        var = torch.as_tensor(var, dtype=torch.float64)
        kl = kl + kl_divergence(Normal(m, sigma.expand_as(m)), Normal(mean, var.sqrt().expand_as(m))).sum()
    return kl


def test_layerwise_kl_matches_a_per_tensor_reference():
    model, posterior = _moved_posterior()
    names = posterior.backbone_group_names
    assert names == posterior.backbone_names and len(names) == 4  # two Linear layers, weight and bias
    lam = torch.tensor([3e-3, 2e-4, 5e-2, 1e-3], dtype=torch.float64)
    tau = 0.02
    ours = posterior.kl(lam, tau)
    sigma = F.softplus(posterior.rho.double())
    reference = _reference_kl(model, posterior, sigma, dict(zip(names, lam, strict=True)), tau)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    # the same from λ given as the JSON list a checkpoint restores
    torch.testing.assert_close(posterior.kl(lam.tolist(), tau), reference, rtol=1e-12, atol=0)
    # and its gradients to m and ρ
    ours_grads = torch.autograd.grad(posterior.kl(lam, tau), [*model.parameters(), posterior.rho])
    ref_grads = torch.autograd.grad(
        _reference_kl(model, posterior, F.softplus(posterior.rho.double()), dict(zip(names, lam, strict=True)), tau),
        [*model.parameters(), posterior.rho],
    )
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-10, atol=1e-14)


def test_layerwise_optimum_minimises_the_reference_kl():
    model, posterior = _moved_posterior()
    names = posterior.backbone_group_names
    lam_star, tau_star = posterior.optimal_prior_variances()
    sigma = F.softplus(posterior.rho.double()).detach()
    mu = posterior.prior_mean
    params = dict(model.named_parameters())
    expected = [((params[n] - mu[n]) ** 2).mean().item() + sigma.item() ** 2 for n in names]
    torch.testing.assert_close(lam_star, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert len(set(lam_star.tolist())) == len(names)  # the tensors really have different optima

    # ∂KL/∂λ_l (autograd of the reference) vanishes at λ*, and is negative below, positive above
    def gradient_at(lam):
        lam = lam.clone().requires_grad_()
        kl = _reference_kl(model, posterior, sigma, dict(zip(names, lam, strict=True)), tau_star)
        (grad,) = torch.autograd.grad(kl, lam)
        return grad

    scale = torch.tensor([p.numel() for n, p in params.items() if n in mu], dtype=torch.float64) / lam_star
    assert (gradient_at(lam_star).abs() < 1e-9 * scale).all()
    assert (gradient_at(lam_star * 0.9) < 0).all() and (gradient_at(lam_star * 1.1) > 0).all()
    at_optimum = posterior.kl(lam_star, tau_star).item()
    for i in range(len(names)):
        for factor in (0.5, 0.99, 1.01, 2.0):
            moved = lam_star.clone()
            moved[i] *= factor
            assert posterior.kl(moved, tau_star).item() > at_optimum
    # plugged in: KL_b* = Σ_l (D_l/2) log(λ_l*/σ²)
    sizes = posterior.backbone_group_sizes
    backbone_kl = gaussian_kl(posterior.squared_distances()[0], sizes, sigma**2, lam_star).sum()
    torch.testing.assert_close(backbone_kl, (sizes / 2 * torch.log(lam_star / sigma**2)).sum(), rtol=1e-10, atol=0)


def test_one_group_is_the_one_lambda_kl():
    generator = torch.Generator().manual_seed(3)
    sq, d, var, lam = torch.rand(1, dtype=torch.float64, generator=generator), 37, 1e-4, 2e-3
    vector = gaussian_kl(sq, torch.tensor([d], dtype=torch.float64), var, torch.tensor([lam], dtype=torch.float64))
    torch.testing.assert_close(vector.sum(), gaussian_kl(sq[0], d, var, lam), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        optimal_prior_variance(sq, torch.tensor([float(d)], dtype=torch.float64), var)[0],
        optimal_prior_variance(sq[0], d, var),
        rtol=1e-15,
        atol=0,
    )
    # a backbone of one tensor: "layer" and "backbone" grouping give the same λ* and KL
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2))
    groups = split_parameters(model, ["1"])
    one, layer = (GaussianPosterior(model, groups, 0.01, grouping) for grouping in ("backbone", "layer"))
    with torch.no_grad():
        model[0].weight.add_(0.1)
        model[1].weight.mul_(2)
    (lam, tau), (lam_layer, tau_layer) = one.optimal_prior_variances(), layer.optimal_prior_variances()
    assert lam_layer.shape == (1,) and float(lam_layer[0]) == pytest.approx(float(lam), rel=1e-14)
    assert layer.kl(lam_layer, tau_layer).item() == pytest.approx(one.kl(lam, tau).item(), rel=1e-14)


def test_mean_prior_variance_is_the_d_weighted_harmonic_mean():
    lam, sizes = (
        torch.tensor([1e-3, 4e-3, 1e-1], dtype=torch.float64),
        torch.tensor([10.0, 30.0, 60.0], dtype=torch.float64),
    )
    expected = 100 / (10 / 1e-3 + 30 / 4e-3 + 60 / 1e-1)
    assert float(mean_prior_variance(lam, sizes)) == pytest.approx(expected, rel=1e-14)
    # the isotropic prior with the same total precision: Σ_l D_l/λ_l = D_b/λ̄
    assert float((sizes / lam).sum()) == pytest.approx(100 / expected, rel=1e-14)
    same = torch.full((3,), 2e-3, dtype=torch.float64)
    assert float(mean_prior_variance(same, sizes)) == pytest.approx(2e-3, rel=1e-14)


def test_a_restored_lambda_of_the_wrong_grouping_is_recomputed():
    model, posterior = _moved_posterior()
    callback = DEELBoCallback(backbone_prior_variance=1e-3, head_prior_variance=1e-2, posterior_rho=-3.0)
    callback.bind(posterior)  # a one-λ checkpoint resumed with "layer" grouping
    lam, _ = callback.prior_variances()
    torch.testing.assert_close(lam, posterior.optimal_prior_variances()[0], rtol=0, atol=0)
    restored = DEELBoCallback(backbone_prior_variance=[1e-3, 2e-3, 3e-3, 4e-3], head_prior_variance=1e-2)
    restored.bind(posterior)
    lam, _ = restored.prior_variances()
    assert lam.dtype == torch.float64 and lam.tolist() == [1e-3, 2e-3, 3e-3, 4e-3]
    assert restored.backbone_prior_variance == [1e-3, 2e-3, 3e-3, 4e-3]


def test_layerwise_config_entry_survives_save_and_load(make_args, tmp_path):
    model, _ = build_model("vit")
    pretrained = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = DEELBoTrainer(
        model=model,
        args=make_args(max_steps=4, learning_rate=0.05, prior_variance_grouping="layer"),
        train_dataset=image_dataset(12),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    entry = json.loads((tmp_path / "saved" / "config.json").read_text())["deelbo"]
    assert entry == trainer.config_entry()
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.config.deelbo == entry
    assert read_config_entry(reloaded.config, DEELBO.key) == entry

    # every λ_l* from the saved weights, independently; `lambda` is their D-weighted harmonic mean
    saved = dict(reloaded.named_parameters())
    backbone = [k for k in saved if not k.startswith("classifier.")]
    sigma2 = entry["sigma"] ** 2
    expected = {k: ((saved[k].double() - pretrained[k].double()) ** 2).mean().item() + sigma2 for k in backbone}
    assert entry["prior_variance_grouping"] == "layer"
    assert sorted(entry["backbone_prior_variances"]) == sorted(backbone)  # config.json sorts the keys
    for k in backbone:
        assert entry["backbone_prior_variances"][k] == pytest.approx(expected[k], rel=1e-6), k
    d_b = sum(saved[k].numel() for k in backbone)
    harmonic = d_b / sum(saved[k].numel() / expected[k] for k in backbone)
    assert entry["lambda"] == pytest.approx(harmonic, rel=1e-6)
    assert entry["alpha_eff"] == pytest.approx(
        1 / (entry["num_backbone_params"] + entry["num_head_params"]) / harmonic, rel=1e-6
    )
    assert max(expected.values()) > 10 * min(expected.values())  # the check sees the tensors differ
    # the model card names λ̄ as the harmonic mean, in an unbroken table
    card = (tmp_path / "saved" / "README.md").read_text().splitlines()
    row = next(i for i, line in enumerate(card) if line.startswith("| λ̄ |"))
    assert "harmonic mean" in card[row] and f"{entry['lambda']:.4g}" in card[row] and card[row + 1].startswith("| τ |")
    # the logs carry the harmonic mean as a float
    logged = [e["lambda"] for e in trainer.state.log_history if "lambda" in e]
    assert logged and all(isinstance(v, float) and 0 < v < 1 for v in logged)


def test_one_lambda_entry_and_old_entries_still_read(make_args):
    trainer = DEELBoTrainer(model=build_model("vit")[0], args=make_args(max_steps=1), train_dataset=image_dataset(8))
    entry = trainer.config_entry()
    assert entry["prior_variance_grouping"] == "backbone" and "backbone_prior_variances" not in entry
    old = {k: v for k, v in entry.items() if k != "prior_variance_grouping"}  # written before the grouping existed
    assert read_config_entry({"deelbo": old}, DEELBO.key) == old
    values = dict(
        backbone_prior_variance=1e-3,
        head_prior_variance=1e-2,
        sigma=1e-4,
        kappa=2.0,
        num_train_examples=4,
        num_backbone_params=10,
        num_head_params=2,
        head_modules=["classifier"],
    )
    bad = deelbo_config(**values, prior_variance_grouping="layer", backbone_prior_variances={"a.weight": -1.0})
    with pytest.raises(ValueError, match=r"deelbo\.backbone_prior_variances must be a non-empty dict .* > 0"):
        read_config_entry({"deelbo": bad}, DEELBO.key)
    good = deelbo_config(**values, prior_variance_grouping="layer", backbone_prior_variances={"a.weight": 1e-3})
    assert read_config_entry({"deelbo": good}, DEELBO.key)["backbone_prior_variances"] == {"a.weight": 1e-3}
    assert math.isclose(good["lambda"], 1e-3)
