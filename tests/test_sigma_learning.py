"""σ learns under the user's optimizer: ρ's own learning rate, its update under SGD and AdamW
against the optimizers' update rules written out by hand, the warning when σ never grew, and
hf_deelbo's messages reaching transformers' logging."""

import logging

import pytest
import torch
import transformers
from conftest import TinyNet, build_model, image_dataset, run_benchmark, with_benchmark_backbone
from datasets import Dataset

from hf_deelbo import DEELBoTrainer


def _vector_dataset(num_examples: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_examples, 3, 1, 2, generator=generator)  # an "image" of 6 numbers
    y = torch.randint(0, 3, (num_examples,), generator=generator)
    return Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def _one_step(make_args, optim: str, sigma_learning_rate):
    """One optimizer step of TinyNet, unclipped; returns (trainer, ρ before, ρ's gradient, a weight
    before, its gradient, the weight after)."""
    torch.manual_seed(0)
    model = TinyNet()
    args = make_args(
        optim=optim,
        learning_rate=1e-3,
        sigma_learning_rate=sigma_learning_rate,
        max_steps=1,
        per_device_train_batch_size=16,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        sigma_init=0.05,
        head_modules=["head"],
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=_vector_dataset())
    rho = trainer.posterior.rho
    rho_before, weight_before = rho.detach().clone(), model.body[0].weight.detach().clone()
    grads = {}

    class Gradients(transformers.TrainerCallback):
        # The gradients the optimizer steps with (the in-place draw adds parts of them after backward).
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update(rho=rho.grad.detach().clone(), weight=model.body[0].weight.grad.detach().clone())

    trainer.add_callback(Gradients())
    trainer.train()
    return trainer, rho_before, grads["rho"], weight_before, grads["weight"], model.body[0].weight.detach()


@pytest.mark.parametrize("sigma_learning_rate", [0.1, None], ids=["own-lr", "weights-lr"])
@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_rho_update_follows_the_optimizer_at_its_own_learning_rate(optim, sigma_learning_rate, make_args):
    trainer, rho0, g_rho, w0, g_w, w1 = _one_step(make_args, optim, sigma_learning_rate)
    rho1 = trainer.posterior.rho.detach()
    rho_lr = 1e-3 if sigma_learning_rate is None else sigma_learning_rate
    if optim == "sgd":
        # The weights: plain SGD, θ ← θ − η g. ρ with its own lr: Nesterov at `sigma_momentum` 0.9
        # (first step: b = g, θ ← θ − η(g + 0.9 b)); tied to the weights' lr: their plain SGD.
        rho_step = g_rho * (1.9 if sigma_learning_rate is not None else 1.0)
        expected_rho, expected_w = rho0 - rho_lr * rho_step, w0 - 1e-3 * g_w
    else:
        # Adam's first step with bias correction: m̂ = g, v̂ = g², θ ← θ − η g / (|g| + 1e-8); no
        # weight decay on either (weight_decay is 0 for the weights, and ρ's group has none).
        expected_rho = rho0 - rho_lr * g_rho / (g_rho.abs() + 1e-8)
        expected_w = w0 - 1e-3 * g_w / (g_w.abs() + 1e-8)
    torch.testing.assert_close(rho1, expected_rho, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1, expected_w, rtol=1e-6, atol=1e-7)
    assert g_rho.abs() > 0 and (rho1 - rho0).abs() > 0


@pytest.mark.parametrize("sigma_momentum", [0.9, None], ids=["own-momentum", "weights-momentum"])
def test_rho_momentum_under_sgd_without_momentum(sigma_momentum, make_args):
    """Under SGD without momentum, `sigma_momentum` gives ρ Nesterov momentum of its own while the
    weights keep plain SGD; two steps against torch's update rules written out by hand."""
    torch.manual_seed(0)
    model = TinyNet()
    args = make_args(
        optim="sgd",
        learning_rate=1e-3,
        sigma_learning_rate=0.1,
        sigma_momentum=sigma_momentum,
        max_steps=2,
        per_device_train_batch_size=8,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        sigma_init=0.05,
        head_modules=["head"],
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=_vector_dataset())
    rho, weight = trainer.posterior.rho, model.body[0].weight
    seen = [(rho.detach().clone(), weight.detach().clone())]

    class Record(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append((rho.grad.detach().clone(), weight.grad.detach().clone()))

        def on_optimizer_step(self, args, state, control, **kwargs):
            seen.append((rho.detach().clone(), weight.detach().clone()))

    trainer.add_callback(Record())
    trainer.train()
    (rho0, w0), (g1, gw1), (rho1, w1), (g2, gw2), (rho2, w2) = seen
    if sigma_momentum is None:  # ρ follows the weights' plain SGD
        expected_rho1, expected_rho2 = rho0 - 0.1 * g1, rho0 - 0.1 * g1 - 0.1 * g2
    else:  # Nesterov: b₁ = g₁, θ₁ = θ₀ − η(g₁ + μ b₁); b₂ = μ b₁ + g₂, θ₂ = θ₁ − η(g₂ + μ b₂)
        b1 = g1
        expected_rho1 = rho0 - 0.1 * (g1 + 0.9 * b1)
        b2 = 0.9 * b1 + g2
        expected_rho2 = expected_rho1 - 0.1 * (g2 + 0.9 * b2)
    torch.testing.assert_close(rho1, expected_rho1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rho2, expected_rho2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1, w0 - 1e-3 * gw1, rtol=1e-6, atol=1e-7)  # the weights: plain SGD
    torch.testing.assert_close(w2, w1 - 1e-3 * gw2, rtol=1e-6, atol=1e-7)
    assert g1.abs() > 0 and g2.abs() > 0


def _learning_rates_per_step(trainer) -> list[list[float]]:
    """Trains `trainer`; every optimizer group's learning rate after each step."""
    seen = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([group["lr"] for group in optimizer.param_groups])

    trainer.add_callback(Record())
    trainer.train()
    return seen


def test_rho_group_follows_the_schedule(make_args):
    model, _ = build_model("vit")
    args = make_args(
        optim="adamw_torch", learning_rate=5e-5, sigma_learning_rate=0.2, max_steps=4, lr_scheduler_type="linear"
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16))
    seen = _learning_rates_per_step(trainer)
    rho_group = [
        i for i, g in enumerate(trainer.optimizer.param_groups) if any(p is trainer.posterior.rho for p in g["params"])
    ]
    assert len(rho_group) == 1 and trainer.optimizer.param_groups[rho_group[0]]["weight_decay"] == 0.0
    for step, lrs in enumerate(seen, start=1):
        factor = 1 - step / 4  # linear decay to 0 over 4 steps, no warmup
        assert lrs[0] == pytest.approx(5e-5 * factor)
        assert lrs[rho_group[0]] == pytest.approx(0.2 * factor)


@pytest.mark.parametrize("passed", ["optimizer and scheduler", "optimizer only", "optimizer class"])
def test_rho_follows_the_schedule_with_a_user_optimizer(passed, make_args):
    """With a user's optimizer (and scheduler), ρ's group follows the schedule like the weights'."""
    model, _ = build_model("vit")
    args = make_args(learning_rate=5e-5, sigma_learning_rate=0.2, max_steps=4, lr_scheduler_type="linear")
    if passed == "optimizer class":
        kwargs = {"optimizer_cls_and_kwargs": (torch.optim.AdamW, {"lr": 5e-5, "weight_decay": 0.0})}
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
        scheduler = (
            transformers.get_linear_schedule_with_warmup(optimizer, 0, 4)
            if passed == "optimizer and scheduler"
            else None
        )
        kwargs = {"optimizers": (optimizer, scheduler)}
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16), **kwargs)
    seen = _learning_rates_per_step(trainer)
    assert trainer.optimizer.param_groups[-1]["params"] == [trainer.posterior.rho]  # after the weights' group(s)
    for step, (*weights_lrs, rho_lr) in enumerate(seen, start=1):
        assert weights_lrs == pytest.approx([5e-5 * (1 - step / 4)] * len(weights_lrs))
        assert rho_lr == pytest.approx(0.2 * (1 - step / 4))


def test_a_scheduler_that_cannot_take_rho_is_refused_before_training(make_args, tmp_path):
    model, _ = build_model("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    args = make_args(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=1, save_strategy="steps")
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16), optimizers=(optimizer, scheduler))
    with pytest.raises(ValueError, match=r"optimizers: .*\(StepLR\).*optimizers=\(optimizer, None\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Records(logging.Handler):
    """What reaches transformers' library logger, as a user's handler there would see it."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.DEBUG):
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def transformers_records():
    handler = _Records()
    verbosity = transformers.logging.get_verbosity()
    # `hf-deelbo` (run in-process by other tests) sets its own logger's level; here hf_deelbo's
    # loggers must follow transformers' verbosity, as in a user's script.
    package_logger = logging.getLogger("hf_deelbo")
    package_level = package_logger.level
    package_logger.setLevel(logging.NOTSET)
    transformers.logging.add_handler(handler)
    yield handler
    transformers.logging.remove_handler(handler)
    transformers.logging.set_verbosity(verbosity)
    package_logger.setLevel(package_level)


def _train_vit(make_args, **overrides):
    model, _ = build_model("vit")
    args = make_args(
        optim="adamw_torch",
        learning_rate=5e-5,
        max_steps=20,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        **overrides,
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16))
    trainer.train()
    return trainer


def test_warning_when_sigma_never_grew(make_args, transformers_records):
    # The paper's tie of ρ to the weights' learning rate under AdamW at transformers' default lr:
    # ρ moves by ~5e-5 per step and σ stays at sigma_init.
    trainer = _train_vit(make_args, sigma_learning_rate=None)
    assert trainer.posterior.sigma().item() < 3 * trainer.args.sigma_init
    warnings = [m for m in transformers_records.messages(logging.WARNING) if "σ ended the run" in m]
    assert len(warnings) == 1
    assert "sigma_learning_rate" in warnings[0] and "learning_rate=5e-05" in warnings[0]


def test_no_warning_when_sigma_learned(make_args, transformers_records):
    trainer = _train_vit(make_args)  # sigma_learning_rate at its default
    assert trainer.posterior.sigma().item() > 3 * trainer.args.sigma_init
    assert not [m for m in transformers_records.messages(logging.WARNING) if "σ ended the run" in m]


def test_info_messages_follow_transformers_verbosity(make_args, transformers_records):
    model, _ = build_model("vit")
    transformers.logging.set_verbosity_warning()
    DEELBoTrainer(model=model, args=make_args(), train_dataset=image_dataset(8))
    assert not [m for m in transformers_records.messages() if m.startswith("DE ELBO: D_b=")]
    transformers.logging.set_verbosity_info()  # what transformers' example scripts call
    DEELBoTrainer(model=model, args=make_args(), train_dataset=image_dataset(8))
    assert [m for m in transformers_records.messages(logging.INFO) if m.startswith("DE ELBO: D_b=")]


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_sigma_learning_rate_is_refused(value, make_args):
    with pytest.raises(ValueError, match=r"sigma_learning_rate must be a finite number > 0.*got"):
        make_args(sigma_learning_rate=value)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_bad_sigma_momentum_is_refused(value, make_args):
    with pytest.raises(ValueError, match=r"sigma_momentum must be in \[0, 1\).*got"):
        make_args(sigma_momentum=value)


@pytest.mark.slow
def test_dropin_benchmark_quick_mode_writes_its_outputs(tmp_path, benchmark_backbone):
    import json

    with_benchmark_backbone(tmp_path, benchmark_backbone)
    run_benchmark("dropin.py", "--quick", "--workers", 1, "--output-dir", tmp_path)
    saved = json.loads((tmp_path / "dropin.json").read_text())
    assert {r["optimizer"] for r in saved["records"]} == {"AdamW 5e-5 linear", "SGD-Nesterov 0.1 cosine"}
    for record in saved["records"]:  # both trainers ran, with the same data and seed
        assert 0 <= record["Trainer"]["accuracy"] <= 1 and record["DEELBoTrainer"]["sigma"] > 0
    assert (tmp_path / "dropin.png").is_file()
    assert "Drop-in: DEELBoTrainer against Trainer" in (tmp_path / "benchmarks.md").read_text()


def test_sigma_learning_rate_none_is_the_paper_recipe(make_args):
    """`sigma_learning_rate=None` trains ρ at `learning_rate`, as the paper does: the run is
    identical, step for step, to one that names the same value explicitly."""
    runs = []
    # sigma_momentum is ignored when ρ trains at the weights' learning rate.
    for overrides in (
        {"sigma_learning_rate": 0.1, "sigma_momentum": None},
        {"sigma_learning_rate": None, "sigma_momentum": 0.5},
    ):
        model, _ = build_model("resnet")
        args = make_args(
            optim="sgd",
            optim_args="momentum=0.9,nesterov=True",
            learning_rate=0.1,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            max_steps=6,
            logging_steps=1,
            **overrides,
        )
        trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16))
        trainer.train()
        runs.append(([e["sigma"] for e in trainer.state.log_history if "sigma" in e], model.state_dict()))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 6
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name
