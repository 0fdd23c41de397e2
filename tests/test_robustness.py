"""Exact resume, mixed precision, numerical faults and bad data."""

import json
import math

import pytest
import safetensors.torch
import torch
from conftest import NUM_LABELS, build_model, image_dataset, training_args
from datasets import Dataset
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer
from hf_deelbo.methods.deelbo.posterior import POSTERIOR_RHO_NAME


class StopAt(TrainerCallback):
    """Simulates an interruption: save and stop after `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


class _RestoredLambda(TrainerCallback):
    """Records λ as the resumed run's first step finds it (restored from the checkpoint)."""

    trainer = None  # set by `_run`

    def on_step_begin(self, args, state, control, **kwargs):
        if not hasattr(self, "value"):
            self.value = self.trainer.deelbo_callback._variances[0]


class _RestoredRho(TrainerCallback):
    """Records ρ as the resumed run's first step finds it (restored from the checkpoint)."""

    trainer = None  # set by `_run`

    def on_step_begin(self, args, state, control, **kwargs):
        if not hasattr(self, "value"):
            self.value = self.trainer.posterior.rho.detach().clone()


def _run(kind, out, resume=None, stop_at=None, extra_callbacks=(), **overrides):
    model, _ = build_model(kind)
    pretrained = {k: v.detach().clone() for k, v in model.named_parameters()}
    values = dict(
        max_steps=8, save_strategy="steps", save_steps=100, per_device_train_batch_size=4, learning_rate=0.05
    )
    args = training_args(out, **{**values, **overrides})
    trainer = DEELBoTrainer(
        model=model,
        args=args,
        train_dataset=image_dataset(16),
        callbacks=[*([StopAt(stop_at)] if stop_at else []), *extra_callbacks] or None,
    )
    for callback in extra_callbacks:
        callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, pretrained


def _rho_optimizer_state(trainer):
    state = trainer.optimizer.state[trainer.posterior.rho]
    return {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}


@pytest.mark.parametrize(
    "kind, grouping, covariance",
    [
        ("vit", "backbone", "isotropic"),
        ("resnet", "backbone", "isotropic"),
        ("timm", "backbone", "isotropic"),
        ("resnet", "layer", "isotropic"),
        ("resnet", "layer", "diagonal"),
    ],
)
def test_resume_is_exact(kind, grouping, covariance, tmp_path):
    options = dict(prior_variance_grouping=grouping, posterior_covariance=covariance)
    straight, straight_model, _ = _run(kind, tmp_path / "straight", **options)
    interrupted, _, _ = _run(kind, tmp_path / "interrupted", stop_at=4, **options)
    checkpoint = tmp_path / "interrupted" / "out" / "checkpoint-4"
    if covariance == "diagonal":  # ρ, one per weight, is in the checkpoint's safetensors file, not in the JSON state
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["DEELBoCallback"]
        assert saved["attributes"]["posterior_rho"] is None
        saved_rho = safetensors.torch.load_file(str(checkpoint / POSTERIOR_RHO_NAME))
        assert torch.equal(
            torch.cat([saved_rho[n].reshape(-1) for n in interrupted.posterior.parameter_names]),
            interrupted.posterior.rho.detach(),
        )
        assert interrupted.posterior.rho.unique().numel() > 1
        restored = _RestoredRho()
        resumed, resumed_model, pretrained = _run(
            kind, tmp_path / "interrupted", resume=str(checkpoint), extra_callbacks=[restored], **options
        )
        assert torch.equal(restored.value, interrupted.posterior.rho.detach())
    elif grouping == "layer":  # the checkpoint holds one λ_l per backbone tensor, restored as a float64 vector
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["DEELBoCallback"]
        saved_lam = saved["attributes"]["backbone_prior_variance"]
        restored = _RestoredLambda()
        resumed, resumed_model, pretrained = _run(
            kind, tmp_path / "interrupted", resume=str(checkpoint), extra_callbacks=[restored], **options
        )
        assert restored.value.dtype == torch.float64 and restored.value.tolist() == saved_lam
        assert len(saved_lam) == len(resumed.posterior.backbone_names)
    else:
        resumed, resumed_model, pretrained = _run(kind, tmp_path / "interrupted", resume=str(checkpoint), **options)

    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    assert straight.learned_hyperparameters() == resumed.learned_hyperparameters()
    assert torch.equal(straight.posterior.rho, resumed.posterior.rho)
    for key, value in _rho_optimizer_state(straight).items():
        assert torch.equal(value, _rho_optimizer_state(resumed)[key]), key
    # μ is still the pretrained backbone, not the checkpoint's weights
    for name, mu in resumed.posterior.prior_mean.items():
        assert torch.equal(mu, pretrained[name]), name
    assert not torch.equal(
        resumed_model.state_dict()[resumed.posterior.backbone_names[0]],
        pretrained[resumed.posterior.backbone_names[0]],
    )


def test_bf16_stays_finite_and_close_to_fp32(tmp_path):
    results = {}
    for bf16 in (False, True):
        trainer, _, _ = _run("vit", tmp_path / str(bf16), bf16=bf16)
        results[bf16] = trainer.learned_hyperparameters()
        assert trainer.posterior.rho.dtype == torch.float32
        assert all(math.isfinite(e["kl"]) for e in trainer.state.log_history if "kl" in e)
    for key in ("lambda", "tau", "sigma"):
        assert math.isfinite(results[True][key])
        assert results[True][key] == pytest.approx(results[False][key], rel=0.15), key


class Explode(TrainerCallback):
    """lr 1e30 for optimizer step `at` + 1 (it makes the weights non-finite)."""

    def __init__(self, at: int = 2):
        self.at = at

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.at:
            for group in optimizer.param_groups:
                group["lr"] = 1e30


def test_divergence_stops_with_step_and_hint_and_keeps_last_checkpoint(make_args, tmp_path):
    model, _ = build_model("resnet")
    args = make_args(max_steps=6, save_strategy="steps", save_steps=1, optim="sgd", learning_rate=0.01)
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16), callbacks=[Explode()])
    with pytest.raises(FloatingPointError, match=r"diverged at step 3.*Lower learning_rate.*kappa"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    from transformers import AutoModelForImageClassification

    reloaded = AutoModelForImageClassification.from_pretrained(out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    assert math.isfinite(reloaded.config.deelbo["lambda"])


def test_weights_that_diverge_between_checkpoints_stop_the_run_at_the_next_step(make_args, tmp_path):
    # Step 3 neither logs nor saves, so the weights it makes non-finite are not inspected there;
    # step 4's loss, computed at those weights, is non-finite and stops the run before step 4's
    # checkpoint is written.
    model, _ = build_model("resnet")
    args = make_args(
        max_steps=8, save_strategy="steps", save_steps=2, logging_steps=2, optim="sgd", learning_rate=0.01
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16), callbacks=[Explode()])
    with pytest.raises(FloatingPointError, match=r"diverged at step 4"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the step-3 weights


def test_sigma_cannot_underflow(make_args):
    model, _ = build_model("resnet")
    trainer = DEELBoTrainer(model=model, args=make_args(max_steps=2, optim="sgd"), train_dataset=image_dataset(8))
    trainer.posterior.rho.data.fill_(-1e4)  # softplus(-1e4) is 0 in float32 and float64
    trainer.train()
    assert trainer.posterior.sigma().item() >= trainer.posterior.min_sigma * 0.99
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def _images(n=8, channels=3, size=32, labels=None, nan_at=None):
    pixel_values = torch.randn(n, channels, size, size)
    if nan_at is not None:
        pixel_values[nan_at, 0, 0, 0] = float("nan")
    labels = torch.randint(0, NUM_LABELS, (n,)) if labels is None else torch.tensor(labels)
    return Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": labels.numpy()}).with_format("torch")


BAD_INPUTS = [
    # (kind, training-argument overrides, dataset factory, error type, message)
    ("resnet", {"kappa": 0.0}, None, ValueError, "kappa must be > 0 or None (None means D/N); got 0.0"),
    ("resnet", {"kappa": -1.0}, None, ValueError, "kappa must be > 0 or None"),
    ("resnet", {"sigma_init": 0.0}, None, ValueError, "sigma_init must be a finite number > 0"),
    ("resnet", {"sigma_init": float("inf")}, None, ValueError, "sigma_init must be a finite number > 0"),
    ("resnet", {"weight_decay": 0.01}, None, ValueError, "weight_decay must be 0 with DEELBoTrainer"),
    ("resnet", {"bma_samples": -2}, None, ValueError, "bma_samples must be >= 0"),
    ("resnet", {"num_train_examples": -5}, None, ValueError, "num_train_examples must be a positive int"),
    ("resnet", {"head_modules": ["nothing_here"]}, _images, ValueError, "matches no trainable parameter"),
    ("resnet", {"head_modules": ["resnet", "classifier"]}, _images, ValueError, "matches every trainable parameter"),
    ("resnet", {}, lambda: _images().select([]), ValueError, "train_dataset is empty (0 examples)"),
    (
        "resnet",
        {},
        lambda: _images(labels=[0, 1, 2, 3, 4, 5, 0, 1]),
        ValueError,
        "column 'labels' has label 5 at example 5, outside 0..4",
    ),
    (
        "resnet",
        {},
        lambda: _images(labels=[0, -1, 2, 3, 4, 0, 0, 1]),
        ValueError,
        "column 'labels' has label -1 at example 1, outside 0..4",
    ),
    ("resnet", {}, lambda: _images().remove_columns("labels"), ValueError, "train_dataset has no label column"),
    (
        "resnet",
        {},
        lambda: _images().map(lambda e: {"labels": float(e["labels"]) + 0.5}),
        ValueError,
        "labels must be integer class ids",
    ),
    ("resnet", {}, lambda: _images(channels=1), ValueError, "pixel_values have 1 channels"),
    ("vit", {}, lambda: _images(size=16), ValueError, "The first training batch does not fit the model"),
    ("resnet", {}, lambda: _images(nan_at=0), ValueError, "has non-finite pixel_values"),
    ("timm", {}, lambda: _images(channels=4), ValueError, "pixel_values have 4 channels"),
]


@pytest.mark.parametrize("kind, overrides, dataset, error, message", BAD_INPUTS)
def test_bad_input_fails_before_training(kind, overrides, dataset, error, message, tmp_path):
    model, _ = build_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as raised:
        args = training_args(tmp_path, max_steps=2, remove_unused_columns=False, **overrides)
        trainer = DEELBoTrainer(model=model, args=args, train_dataset=(dataset or _images)())
        trainer.train()
    assert message in str(raised.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_config_written_once_per_checkpoint_with_rho(make_args, tmp_path):
    trainer, _, _ = _run("resnet", tmp_path / "run", save_steps=4)
    state = json.loads((tmp_path / "run" / "out" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["DEELBoCallback"]["attributes"]["posterior_rho"] == trainer.posterior.rho.item()


def test_a_loss_that_turns_non_finite_between_checks_is_reported_with_its_step(make_args, tmp_path):
    # The flags are read only where a step logs or saves (steps 3 and 6 here): the loss of step 5,
    # computed at the weights step 4 blew up, is found at step 6, before step 6's checkpoint exists.
    model, _ = build_model("resnet")
    args = make_args(
        max_steps=8, save_strategy="steps", save_steps=3, logging_steps=3, optim="sgd", learning_rate=0.01
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16), callbacks=[Explode(at=3)])
    with pytest.raises(FloatingPointError, match=r"diverged at step 5, found at step 6"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]
