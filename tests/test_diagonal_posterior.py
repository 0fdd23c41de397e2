"""The diagonal posterior (`posterior_covariance="diagonal"`): q(w) = N(m, diag(σ_i²)), against float64
references written coordinate by coordinate with torch.distributions; its draw, config entry and saved ρ."""

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import TinyNet, _free_port, build_model, image_dataset
from torch.distributions import Normal, kl_divergence
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer
from hf_deelbo.core.groups import split_parameters
from hf_deelbo.hub.config import read_config_entry
from hf_deelbo.methods.deelbo.config import DEELBO
from hf_deelbo.methods.deelbo.posterior import POSTERIOR_RHO_NAME, GaussianPosterior, inverse_softplus

GROUPINGS = ["backbone", "layer"]


def _posterior(model, grouping, covariance="diagonal", sigma=0.03):
    return GaussianPosterior(
        model,
        split_parameters(model, ["head"]),
        sigma_init=sigma,
        prior_variance_grouping=grouping,
        posterior_covariance=covariance,
    )


def _moved(grouping, seed=0):
    """A float64 TinyNet moved from μ by different amounts per tensor, with σ_i that differ."""
    torch.manual_seed(seed)
    model = TinyNet().double()
    posterior = _posterior(model, grouping)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1) * torch.randn_like(p))
        posterior.rho.add_(0.5 * torch.randn_like(posterior.rho))
    return model, posterior


def _reference_kl(model, posterior, lam, tau):
    """Σ_i KL(N(m_i, σ_i²) ‖ N(μ_i, λ_g)) over every coordinate i (head: N(0, τ)), σ = softplus(ρ) in float64,
    ρ split over the parameters in `named_parameters()` order; `lam` a number or one per backbone tensor by name."""
    sigma = F.softplus(posterior.rho.double())
    mu, kl, offset = posterior.prior_mean, 0.0, 0
    for name, m in model.named_parameters():
        s = sigma[offset : offset + m.numel()].view_as(m)
        offset += m.numel()
        mean, var = (
            (mu[name], lam[name] if isinstance(lam, dict) else lam) if name in mu else (torch.zeros_like(m), tau)
        )
        var = torch.as_tensor(var, dtype=torch.float64)
        kl = kl + kl_divergence(Normal(m, s), Normal(mean, var.sqrt().expand_as(m))).sum()
    assert offset == posterior.rho.numel()
    return kl


def _by_name(posterior, lam):
    return dict(zip(posterior.backbone_names, lam, strict=True)) if posterior.layer_wise else lam


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_diagonal_kl_matches_a_per_coordinate_reference(grouping):
    model, posterior = _moved(grouping)
    assert posterior.rho.shape == (posterior.num_params,) and posterior.rho.dtype == torch.float32
    lam = torch.tensor([3e-3, 2e-4, 5e-2, 1e-3], dtype=torch.float64) if grouping == "layer" else 3e-3
    tau = 0.02
    ours = posterior.kl(lam, tau)
    reference = _reference_kl(model, posterior, _by_name(posterior, lam), tau)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    # and its gradients to m and to every ρ_i
    parameters = [*model.parameters(), posterior.rho]
    ours_grads = torch.autograd.grad(posterior.kl(lam, tau), parameters)
    ref_grads = torch.autograd.grad(_reference_kl(model, posterior, _by_name(posterior, lam), tau), parameters)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-10, atol=1e-14)
    assert ours_grads[-1].abs().min() > 0


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_diagonal_optimum_minimises_the_reference_kl(grouping):
    model, posterior = _moved(grouping)
    lam_star, tau_star = posterior.optimal_prior_variances()
    # written out independently: λ_g* = (‖m_g − μ_g‖² + Σ_{i∈g} σ_i²) / D_g
    s = F.softplus(posterior.rho.double()).detach() ** 2
    mu, offset, sums = posterior.prior_mean, 0, {}
    for name, p in model.named_parameters():
        centre = mu[name] if name in mu else torch.zeros_like(p)
        sums[name] = (
            ((p.detach() - centre) ** 2).sum().item(),
            s[offset : offset + p.numel()].sum().item(),
            p.numel(),
        )
        offset += p.numel()
    head = [n for n in sums if n not in mu]

    def optimum(names):
        return sum(sums[n][0] + sums[n][1] for n in names) / sum(sums[n][2] for n in names)

    expected = [optimum([n]) for n in posterior.backbone_names] if grouping == "layer" else optimum(list(mu))
    torch.testing.assert_close(lam_star, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(tau_star) == pytest.approx(optimum(head), rel=1e-12)

    # ∂KL/∂λ_g and ∂KL/∂τ (autograd of the reference) vanish at the optimum, negative below, positive above
    def gradients_at(factor):
        lam = (lam_star * factor).clone().requires_grad_()
        tau = (tau_star * factor).clone().requires_grad_()
        return torch.autograd.grad(_reference_kl(model, posterior, _by_name(posterior, lam), tau), [lam, tau])

    at, below, above = gradients_at(1.0), gradients_at(0.9), gradients_at(1.1)
    for value, grad in zip((lam_star, tau_star), at, strict=True):
        assert (grad.abs() * value < 1e-9 * posterior.num_params).all()
    assert all((g < 0).all() for g in below) and all((g > 0).all() for g in above)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_equal_sigmas_give_the_isotropic_kl(grouping):
    torch.manual_seed(1)
    model = TinyNet().double()
    isotropic, diagonal = _posterior(model, grouping, "isotropic"), _posterior(model, grouping, "diagonal")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert torch.equal(diagonal.rho, torch.full_like(diagonal.rho, inverse_softplus(0.03)))  # σ_i = sigma_init
    (lam, tau), (lam_d, tau_d) = isotropic.optimal_prior_variances(), diagonal.optimal_prior_variances()
    torch.testing.assert_close(lam_d, lam, rtol=1e-12, atol=0)
    torch.testing.assert_close(tau_d, tau, rtol=1e-12, atol=0)
    torch.testing.assert_close(diagonal.kl(lam, tau), isotropic.kl(lam, tau), rtol=1e-10, atol=0)
    # dKL/dρ of the shared σ is the sum of the per-weight dKL/dρ_i
    (grad,) = torch.autograd.grad(isotropic.kl(lam, tau), [isotropic.rho])
    (grad_d,) = torch.autograd.grad(diagonal.kl(lam, tau), [diagonal.rho])
    torch.testing.assert_close(grad_d.double().sum(), grad.double(), rtol=1e-5, atol=0)
    assert float(diagonal.root_mean_square_sigma()) == pytest.approx(0.03, rel=1e-6)


def test_both_draws_are_m_plus_sigma_times_eps_per_weight():
    """`sample_parameters` and the in-place draw write w̃_i = m_i + σ_i ε_i with the documented ε."""
    torch.manual_seed(0)
    model = TinyNet()
    posterior = _posterior(model, "backbone")
    with torch.no_grad():
        posterior.rho.add_(torch.randn_like(posterior.rho))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sigma = F.softplus(posterior.rho.detach())
    eps = torch.randn(posterior.num_params, generator=torch.Generator().manual_seed(5))
    expected, offset = {}, 0
    for name, p in weights.items():
        piece = slice(offset, offset + p.numel())
        expected[name] = p.double() + (sigma[piece] * eps[piece]).view_as(p).double()  # one rounding away
        offset += p.numel()
    sampled = posterior.sample_parameters(model, torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    draw = posterior.perturb_in_place(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sampled[name].double(), expected[name], rtol=1.2e-7, atol=1e-9)
        assert torch.equal(p.detach(), sampled[name].detach()), name
    draw.restore()  # m back up to one rounding of w̃ (σ_i ~ 1 here: |σε| is as large as m)
    for name, p in model.named_parameters():
        bound = 2**-23 * torch.maximum(weights[name].abs(), (sampled[name] - weights[name]).detach().abs())
        assert ((p.detach() - weights[name]).abs() <= bound).all(), name


def test_config_entry_logs_and_saved_rho(make_args, tmp_path):
    model, _ = build_model("vit")
    trainer = DEELBoTrainer(
        model=model,
        args=make_args(max_steps=3, learning_rate=0.05, logging_steps=1, posterior_covariance="diagonal"),
        train_dataset=image_dataset(12),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    entry = json.loads((tmp_path / "saved" / "config.json").read_text())["deelbo"]
    assert entry == trainer.config_entry() and entry["posterior_covariance"] == "diagonal"
    assert read_config_entry({"deelbo": entry}, DEELBO.key) == entry
    sigma = F.softplus(trainer.posterior.rho.detach().double())
    assert sigma.std() > 0  # the σ_i moved apart
    assert entry["sigma"] == pytest.approx(float(sigma.pow(2).mean().sqrt()), rel=1e-6)  # root mean square
    assert all(isinstance(e["sigma"], float) for e in trainer.state.log_history if "sigma" in e)
    saved = safetensors.torch.load_file(str(tmp_path / "saved" / POSTERIOR_RHO_NAME))
    assert list(saved) == sorted(trainer.posterior.parameter_names) or set(saved) == set(
        trainer.posterior.parameter_names
    )
    assert torch.equal(
        torch.cat([saved[n].reshape(-1) for n in trainer.posterior.parameter_names]), trainer.posterior.rho.detach()
    )
    # the isotropic default writes its covariance too, and entries from before the key still read
    isotropic = DEELBoTrainer(model=build_model("vit")[0], args=make_args(max_steps=1), train_dataset=image_dataset(8))
    old = {k: v for k, v in isotropic.config_entry().items() if k != "posterior_covariance"}
    assert isotropic.config_entry()["posterior_covariance"] == "isotropic"
    assert read_config_entry({"deelbo": old}, DEELBO.key) == old


def test_a_saved_diagonal_posterior_is_rebuilt_with_its_sigmas(make_args, tmp_path, caplog):
    import logging

    from transformers import AutoModelForImageClassification

    from hf_deelbo.methods.deelbo.prediction import posterior_from_config, predictive_log_probs

    trainer = DEELBoTrainer(
        model=build_model("vit")[0],
        args=make_args(max_steps=3, learning_rate=0.05, posterior_covariance="diagonal"),
        train_dataset=image_dataset(12),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    posterior = posterior_from_config(reloaded, str(tmp_path / "saved"))
    assert posterior.diagonal and torch.equal(posterior.rho.detach(), trainer.posterior.rho.detach())
    inputs = {"pixel_values": image_dataset(4)[:]["pixel_values"]}
    torch.testing.assert_close(
        predictive_log_probs(reloaded, inputs, posterior, num_samples=3, seed=1),
        predictive_log_probs(trainer.model, inputs, trainer.posterior, num_samples=3, seed=1),
    )
    with caplog.at_level(logging.WARNING):  # without the file: one σ for all, said in a warning
        fallback = posterior_from_config(reloaded)
    assert not fallback.diagonal and any("root-mean-square σ" in r.getMessage() for r in caplog.records)


def test_diagonal_with_fully_shard_is_refused():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = TinyNet()
        fully_shard(model)
        with pytest.raises(
            NotImplementedError,
            match=r"posterior_covariance='diagonal' does not support .*fully_shard"
            r".*posterior_covariance='isotropic'",
        ):
            _posterior(model, "backbone")
        _posterior(model, "backbone", "isotropic")  # the isotropic posterior still accepts it
    finally:
        dist.destroy_process_group()


class _RhoRecorder(TrainerCallback):
    """ρ, its gradient (after clipping, as the optimizer sees it) and every group's learning rate at each
    step, in float64."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.before, self.grads, self.after, self.lrs = trainer_ref, [], [], [], []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        rho = self.trainer_ref[0].posterior.rho
        self.before.append(rho.detach().double().clone())
        self.grads.append(rho.grad.detach().double().clone())
        self.lrs.append([group["lr"] for group in optimizer.param_groups])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after.append(self.trainer_ref[0].posterior.rho.detach().double().clone())


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_a_diagonal_rho_takes_adams_steps_on_the_weights_schedule(optim, make_args):
    """Whatever the weights' optimizer, each ρ_i follows Adam (β = 0.9, 0.999, ε = 1e-12) at
    diagonal_sigma_learning_rate × the schedule, against the update written out in float64."""
    ref = []
    recorder = _RhoRecorder(ref)
    lr, steps = 0.02, 3
    trainer = DEELBoTrainer(
        model=build_model("vit")[0],
        train_dataset=image_dataset(12),
        callbacks=[recorder],
        args=make_args(
            max_steps=steps,
            learning_rate=0.05,
            optim=optim,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            posterior_covariance="diagonal",
            diagonal_sigma_learning_rate=lr,
        ),
    )
    ref.append(trainer)
    trainer.train()
    assert len(recorder.grads) == steps
    first, second = torch.zeros_like(recorder.grads[0]), torch.zeros_like(recorder.grads[0])
    for k, (before, grad, after, lrs) in enumerate(
        zip(recorder.before, recorder.grads, recorder.after, recorder.lrs, strict=False), start=1
    ):
        scheduled = lr * (1 - (k - 1) / steps)  # linear decay, no warm-up
        assert lrs[-1] == pytest.approx(scheduled, rel=1e-12)  # ρ's group is last, on the weights' schedule
        assert lrs[0] == pytest.approx(0.05 * (1 - (k - 1) / steps), rel=1e-12)
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        step = scheduled * (first / (1 - 0.9**k)) / ((second / (1 - 0.999**k)).sqrt() + 1e-12)
        # ρ is float32 (|ρ| ≈ 9): its rounding, 2 ulp, and Adam's float32 arithmetic on the step
        torch.testing.assert_close(after, before - step, rtol=2 * 2**-23, atol=1e-5 * scheduled)
        assert (after - before).abs().max() > 0.5 * scheduled  # each ρ_i moves by about a learning rate


def test_the_sigmas_of_a_diagonal_posterior_grow_under_sgd(make_args):
    """The failure the Adam fixes: in the weights' SGD at sigma_learning_rate, dL/dρ_i is ~1/D of the
    isotropic ρ's and the σ_i stay at sigma_init; with ρ's own Adam they move."""

    def rms_sigma(**overrides):
        trainer = DEELBoTrainer(
            model=build_model("resnet")[0],
            train_dataset=image_dataset(16),
            args=make_args(
                max_steps=20,
                learning_rate=0.1,
                optim="sgd",
                max_grad_norm=1.0,
                posterior_covariance="diagonal",
                **overrides,
            ),
        )
        trainer.train()
        return trainer.learned_hyperparameters()["sigma"]

    assert rms_sigma(diagonal_sigma_learning_rate=0.1) > 2e-4  # 2 × sigma_init
    assert rms_sigma(diagonal_sigma_learning_rate=None) < 1.1e-4


def test_the_combined_optimizer_round_trips_its_state_and_refuses_anothers():
    from hf_deelbo.methods.deelbo.optimization import CombinedOptimizer, diagonal_rho_optimizer

    def build():
        torch.manual_seed(0)
        weights, rho = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.full((3,), -9.0))
        return (
            weights,
            rho,
            CombinedOptimizer([torch.optim.SGD([weights], lr=0.1, momentum=0.9), diagonal_rho_optimizer(rho, 0.01)]),
        )

    weights, rho, optimizer = build()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(2):
        (weights.sum() + rho.pow(2).sum()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 / 3, 0.01 / 3])  # both groups scheduled
    assert rho.grad is None and weights.grad is None
    saved = optimizer.state_dict()
    weights2, rho2, restored = build()
    restored.load_state_dict(saved)
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert torch.equal(restored.state[rho2]["exp_avg_sq"], optimizer.state[rho]["exp_avg_sq"])
    assert torch.equal(restored.state[weights2]["momentum_buffer"], optimizer.state[weights]["momentum_buffer"])
    with pytest.raises(ValueError, match="combines 2 optimizers .* the state to load holds none"):
        restored.load_state_dict(torch.optim.SGD([weights2], lr=0.1).state_dict())
