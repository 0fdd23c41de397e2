"""TPGM: the balls hold after every step, the radius gradient against finite differences (float64),
the radii through checkpoints, save, push and load, and the validation data it learns from."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, build_model, image_dataset
from torch.func import functional_call
from transformers import AutoModelForImageClassification, TrainerCallback

from hf_deelbo import TPGMTrainer, TPGMTrainingArguments, split_parameters
from hf_deelbo.core.anchor import PretrainedAnchor
from hf_deelbo.hub import load_timm_model
from hf_deelbo.methods.tpgm import ProjectionBalls


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=8,
        learning_rate=0.1,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=2,
        projection_steps=2,
        radius_learning_rate=5e-3,
    )
    values.update(overrides)
    return TPGMTrainingArguments(**values)


def _reference_distance(delta: torch.Tensor, norm: str) -> float:
    """Written out independently of the package: ‖Δ‖₂, or the largest row's L1 norm (rows = dim 0)."""
    if norm == "l2":
        return float(torch.sqrt((delta.double() ** 2).sum()))
    rows = delta.double().reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.double().reshape(1, -1)
    return float(rows.abs().sum(dim=1).max())


class _BallChecker(TrainerCallback):
    """After each step: every backbone tensor lies in its ball; counts tensors on the boundary."""

    def __init__(self, norm):
        self.norm, self.trainer, self.steps_checked, self.on_boundary = norm, None, 0, 0

    def on_step_end(self, args, state, control, **kwargs):
        balls = self.trainer.balls
        if balls.radii is None:
            return
        self.steps_checked += 1
        for name, p, mu, radius in zip(
            balls.anchor.backbone_names,
            balls.anchor.backbone,
            balls.anchor.prior_mean,
            balls.radii.tolist(),
            strict=False,
        ):
            distance = _reference_distance(p.detach() - mu, self.norm)
            # θ̃ = μ + ratio·Δ is rounded to float32: each element may be off by an ulp of |θ|
            rounding = 2 * torch.finfo(p.dtype).eps * _reference_distance(p.detach(), self.norm)
            assert distance <= radius * (1 + 1e-6) + rounding, (state.global_step, name, distance, radius)
            self.on_boundary += radius > 0 and distance >= radius * (1 - 1e-4)


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_every_backbone_tensor_stays_in_its_ball(norm, tmp_path):
    model, head = build_model("resnet")
    before = copy.deepcopy(model.state_dict())
    checker = _BallChecker(norm)
    trainer = TPGMTrainer(
        model=model,
        args=_args(tmp_path, norm=norm),
        train_dataset=image_dataset(16),
        eval_dataset=image_dataset(16, seed=1),
        callbacks=[checker],
    )
    checker.trainer = trainer
    trainer.train()
    assert checker.steps_checked == 7  # radii exist from step 2 on; the projection runs at steps 2..8
    assert checker.on_boundary > 0  # the balls did bind
    head_names = set(split_parameters(model, head).head)
    assert head_names.isdisjoint(trainer.anchor.backbone_names)
    assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("nll" in e and e["hyper_seconds"] > 0 for e in logs)


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_radius_gradient_matches_finite_differences(norm):
    torch.manual_seed(0)
    model = TinyNet().double()
    anchor = PretrainedAnchor(model, split_parameters(model, ["head"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    balls = ProjectionBalls(anchor, norm)
    balls.initialize()
    radii = (0.6 * balls.distances()).double().requires_grad_(True)  # every ball binds
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))

    def validation_loss(r):
        return F.cross_entropy(functional_call(model, balls.projected_parameters(r), (x,)), y)

    (gradient,) = torch.autograd.grad(validation_loss(radii), radii)
    step = 1e-6
    for i in range(len(radii)):
        shift = torch.zeros_like(radii)
        shift[i] = step
        with torch.no_grad():
            numeric = (validation_loss(radii + shift) - validation_loss(radii - shift)) / (2 * step)
        assert float(gradient[i]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9), i
    assert gradient.abs().max() > 0

    # outside the binding region (radius beyond the distance) the radius has no effect
    loose = (2.0 * balls.distances()).double().requires_grad_(True)
    (gradient,) = torch.autograd.grad(validation_loss(loose), loose)
    assert torch.all(gradient == 0)


def test_radii_survive_a_checkpoint(tmp_path):
    data, validation = image_dataset(16), image_dataset(16, seed=1)
    model, _ = build_model("resnet")
    straight = TPGMTrainer(
        model=copy.deepcopy(model),
        args=_args(tmp_path / "a", max_steps=8),
        train_dataset=data,
        eval_dataset=validation,
    )
    straight.train()

    args = _args(tmp_path / "b", max_steps=8, save_strategy="steps", save_steps=4)
    first = TPGMTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, eval_dataset=validation)
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["TPGMCallback"]
    assert len(saved["attributes"]["radii"]) == len(first.anchor.backbone)
    assert set(saved["attributes"]["radius_optimizer"]) == {"step", "exp_avg", "exp_avg_sq"}

    resumed = TPGMTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, eval_dataset=validation)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.balls.radii.tolist() == straight.balls.radii.tolist()
    for (name, p), q in zip(resumed.model.named_parameters(), straight.model.parameters(), strict=False):
        assert torch.equal(p, q), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "timm"])
def test_radii_round_trip_save_push_load(kind, hub, tmp_path):
    model, _ = build_model(kind)
    args = _args(tmp_path, max_steps=4, norm="mars", hub_model_id=f"tester/tpgm-{kind}")
    trainer = TPGMTrainer(
        model=model, args=args, train_dataset=image_dataset(16), eval_dataset=image_dataset(16, seed=1)
    )
    trainer.train()
    entry = trainer.config_entry()
    radii = dict(zip(trainer.anchor.backbone_names, trainer.balls.radii.tolist(), strict=False))
    assert entry["radii"] == radii and entry["norm"] == "mars" and len(radii) == len(trainer.anchor.backbone)
    trainer.push_to_hub()
    from huggingface_hub import snapshot_download

    local = snapshot_download(f"tester/tpgm-{kind}")
    config = json.loads(open(f"{local}/config.json").read())
    assert config["tpgm"] == entry
    card = open(f"{local}/README.md").read()
    assert "## TPGM: hyperparameters" in card and "Trainable Projected Gradient Method" in card
    assert f"| radii | {len(radii)} values, " in card and "`config.json` under `tpgm`" in card
    if kind == "vit":
        reloaded = AutoModelForImageClassification.from_pretrained(f"tester/tpgm-{kind}")
        assert reloaded.config.tpgm == entry
    else:
        assert load_timm_model(local).tpgm_config == entry


def test_validation_data_is_required_and_checked(tmp_path):
    model, _ = build_model("resnet")
    with pytest.raises(ValueError, match="pass eval_dataset=<a dataset>, or set validation_fraction"):
        TPGMTrainer(model=model, args=_args(tmp_path), train_dataset=image_dataset(16))
    assert not (tmp_path / "out").exists()  # nothing was written
    with pytest.raises(ValueError, match=r"validation_fraction must be None .* got 1.5"):
        _args(tmp_path, validation_fraction=1.5)
    with pytest.raises(ValueError, match="cannot hold out a stratified validation_fraction=0.05 of 16 examples"):
        TPGMTrainer(model=model, args=_args(tmp_path, validation_fraction=0.05), train_dataset=image_dataset(16))
    with pytest.raises(ValueError, match="norm must be 'l2' or 'mars'; got 'l1'"):
        _args(tmp_path, norm="l1")
    with pytest.raises(ValueError, match="projection_steps must be an int >= 1; got 0"):
        _args(tmp_path, projection_steps=0)


def test_validation_fraction_holds_out_a_stratified_part(tmp_path):
    model, _ = build_model("resnet")
    data = image_dataset(40)
    trainer = TPGMTrainer(model=model, args=_args(tmp_path, validation_fraction=0.25, max_steps=2), train_dataset=data)
    assert len(trainer.train_dataset) == 30 and len(trainer.validation_dataset) == 10
    train_ids = {tuple(x.flatten()[:4].tolist()) for x in trainer.train_dataset["pixel_values"]}
    validation_ids = {tuple(x.flatten()[:4].tolist()) for x in trainer.validation_dataset["pixel_values"]}
    assert train_ids.isdisjoint(validation_ids)
    assert set(trainer.validation_dataset.with_format(None)["labels"]) == set(data.with_format(None)["labels"])
    trainer.train()
