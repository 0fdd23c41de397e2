"""Mixed precision, checked on CPU: the gradients DEELBoTrainer forms outside autograd (the in-place
draw's dL/dρ and the prior's pull on m, added after the backward pass) must carry the loss scale
that fp16 training puts on every gradient, and bf16 autocast must give the float32 gradients to
within bfloat16's precision. Both sampling mechanisms, both posteriors.

fp16: `Trainer.training_step` backpropagates through `accelerator.backward`, which scales the
loss by `accelerator.scaler` (a `torch.amp.GradScaler`, as accelerate builds it for fp16); the
optimizer step first unscales every gradient of the optimizer, ρ's included. A gradient added
without the scale would come out divided by it (2^16): the test compares the unscaled gradients
with those of the same step without a scaler."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, image_dataset

from hf_deelbo import DEELBoTrainer

SCALE = 2.0**16
VARIANTS = [
    pytest.param(mechanism, covariance, id=f"{mechanism}-{covariance}")
    for mechanism in ("in_place", "functional_call")
    for covariance in ("isotropic", "diagonal")
]


def _trainer(model, make_args, mechanism, covariance, **overrides):
    return DEELBoTrainer(
        model=model,
        args=make_args(
            sigma_init=0.01,
            num_train_examples=8,
            sampling_mechanism=mechanism,
            posterior_covariance=covariance,
            **overrides,
        ),
    )


def _moved(model, trainer, seed=0):
    """The backbone moved away from μ (so the prior pulls) and λ, τ refreshed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    trainer.deelbo_callback.update()


def _step(trainer, model, batch, seed=123):
    """One `training_step` (forward, backward, the draw's gradients); the gradients of m and ρ."""
    torch.manual_seed(seed)
    model.zero_grad()
    trainer.posterior.rho.grad = None
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    trainer.training_step(model, batch)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return grads, trainer.posterior.rho.grad.detach().clone()


@pytest.mark.parametrize("mechanism, covariance", VARIANTS)
def test_fp16_loss_scaling_reaches_every_gradient_the_trainer_forms(mechanism, covariance, make_args):
    model, _ = build_model("vit")
    trainer = _trainer(model, make_args, mechanism, covariance)
    _moved(model, trainer)
    batch = image_dataset(8).with_format("torch")[:8]
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference, reference_rho = _step(trainer, model, batch)
    with torch.no_grad():  # the in-place draw's restore leaves m within a rounding: start from the same m
        for name, p in model.named_parameters():
            p.copy_(weights[name])

    trainer.create_optimizer()
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    try:
        grads, rho = _step(trainer, model, batch)
        # before the unscale: every gradient carries the scale (a power of two scales exactly)
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, SCALE * reference[name], rtol=1e-6, atol=0, msg=lambda text, name=name: f"{name}: {text}"
            )
        torch.testing.assert_close(rho, SCALE * reference_rho, rtol=1e-6, atol=0)
        # what the optimizer step sees: unscaled, the float32 step's gradients
        trainer.accelerator.scaler.unscale_(trainer.optimizer)
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.grad, reference[name], rtol=1e-6, atol=0, msg=lambda text, name=name: f"{name}: {text}"
            )
        torch.testing.assert_close(trainer.posterior.rho.grad, reference_rho, rtol=1e-6, atol=0)
    finally:
        trainer.accelerator.scaler = None


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("mechanism, covariance", VARIANTS)
def test_bf16_autocast_gives_the_float32_gradients_to_bfloat16_precision(mechanism, covariance, make_args):
    """The same step under bf16 autocast (`bf16=True`) and in float32, from the same weights, μ, ρ
    and draw: the gradients of the weights and of ρ agree to bfloat16's precision (8 bits of
    mantissa: a relative error of a few 2^-8), and the weights are back at m after the step."""
    model, _ = build_model("vit")
    twin = copy.deepcopy(model)
    reference_trainer = _trainer(model, make_args, mechanism, covariance)
    bf16_trainer = _trainer(twin, make_args, mechanism, covariance, bf16=True)
    _moved(model, reference_trainer)
    _moved(twin, bf16_trainer)
    bf16_trainer.posterior.rho.data.copy_(reference_trainer.posterior.rho.data)
    batch = image_dataset(8).with_format("torch")[:8]
    reference, reference_rho = _step(reference_trainer, model, batch)
    before = {name: p.detach().clone() for name, p in twin.named_parameters()}
    grads, rho = _step(bf16_trainer, twin, batch)

    everything = torch.cat([g.flatten() for g in grads.values()])
    everything_reference = torch.cat([g.flatten() for g in reference.values()])
    assert _relative_error(everything, everything_reference) < 4 * 2**-8
    assert _relative_error(rho, reference_rho) < 4 * 2**-8
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-6 if mechanism == "in_place" else 0)


def test_the_in_place_draw_uses_every_device_with_a_generator_and_falls_back_elsewhere(caplog):
    """The in-place draw replays ε from the device's default generator: cpu (and cuda, xpu, mps where
    present) have one; a device without one (`meta`) falls back to functional_call with one warning,
    decided when the trainer is built."""
    from hf_deelbo.methods.deelbo.sampling import default_generator, in_place_supported
    from hf_deelbo.methods.deelbo.trainer import resolve_sampling_mechanism

    assert default_generator("cpu") is torch.default_generator and in_place_supported("cpu")
    assert resolve_sampling_mechanism("in_place", torch.device("cpu")) == "in_place"
    assert not in_place_supported("meta")
    with caplog.at_level("WARNING"):
        assert resolve_sampling_mechanism("in_place", torch.device("meta")) == "functional_call"
    assert sum("using sampling_mechanism='functional_call'" in r.getMessage() for r in caplog.records) == 1
    assert resolve_sampling_mechanism("functional_call", torch.device("meta")) == "functional_call"


@pytest.mark.parametrize("mechanism, covariance", VARIANTS)
def test_float32_accumulation_for_devices_without_float64(mechanism, covariance, make_args, monkeypatch):
    """Apple's MPS has no float64: there the squared distances, the KL, λ, τ and the draw's dL/dσ are
    summed in float32 (HF_DEELBO_ACCUMULATION_DTYPE=float32 takes that path on any device). The
    gradients of m and ρ agree with the float64 path's to float32 precision, nothing of the method
    is float64, and σ's floor keeps σ² a normal float32."""
    model, _ = build_model("vit")
    twin = copy.deepcopy(model)
    reference_trainer = _trainer(model, make_args, mechanism, covariance)
    monkeypatch.setenv("HF_DEELBO_ACCUMULATION_DTYPE", "float32")
    trainer = _trainer(twin, make_args, mechanism, covariance)
    assert (
        trainer.posterior.accumulation_dtype == torch.float32
        and reference_trainer.posterior.accumulation_dtype == torch.float64
    )
    _moved(model, reference_trainer)
    _moved(twin, trainer)
    batch = image_dataset(8).with_format("torch")[:8]
    reference, reference_rho = _step(reference_trainer, model, batch)
    grads, rho = _step(trainer, twin, batch)
    for name in reference:
        assert _relative_error(grads[name], reference[name]) < 1e-5, name
    assert _relative_error(rho, reference_rho) < 1e-4
    distances = trainer.posterior.squared_distances()
    lam, tau = trainer.deelbo_callback.backbone_prior_variance, trainer.deelbo_callback.head_prior_variance
    kl = trainer.posterior.kl(lam, tau)
    assert {t.dtype for t in (*distances, kl, trainer.posterior.posterior_variance())} == {torch.float32}
    assert trainer.metrics._window.dtype == torch.float32
    floor = torch.tensor(trainer.posterior.min_sigma, dtype=torch.float32) ** 2
    assert floor > 0 and torch.isfinite(torch.log(floor)) and floor >= torch.finfo(torch.float32).tiny
