"""The L2-SP baseline: its loss against the formula, its neutrality at α = β = 0, its config."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, image_dataset
from transformers import Trainer, TrainingArguments

from hf_deelbo import L2SPTrainer, L2SPTrainingArguments


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    values.update(overrides)
    return L2SPTrainingArguments(**values)


def test_loss_and_gradients_match_the_formula(tmp_path):
    model, _ = build_model("resnet")
    pretrained = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = L2SPTrainer(model=model, args=_args(tmp_path, alpha=0.3, beta=0.05), train_dataset=image_dataset(8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = image_dataset(8)[:]
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    model.zero_grad()
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = copy.deepcopy(model)
    logits = reference(pixel_values=batch["pixel_values"]).logits
    penalty = 0.0
    for name, p in reference.named_parameters():
        if name.startswith("classifier."):
            penalty = penalty + 0.05 / 2 * (p**2).sum()
        else:
            penalty = penalty + 0.3 / 2 * ((p - pretrained[name]) ** 2).sum()
    expected = F.cross_entropy(logits, batch["labels"]) + penalty
    reference.zero_grad()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_zero_strengths_equal_plain_trainer(tmp_path):
    model, _ = build_model("vit")
    plain_model = copy.deepcopy(model)
    dataset = image_dataset(8)
    common = dict(
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    Trainer(
        model=plain_model, args=TrainingArguments(output_dir=str(tmp_path / "p"), **common), train_dataset=dataset
    ).train()
    L2SPTrainer(model=model, args=_args(tmp_path, alpha=0.0, beta=0.0), train_dataset=dataset).train()
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)


def test_config_and_logs(tmp_path):
    model, _ = build_model("timm")
    trainer = L2SPTrainer(
        model=model, args=_args(tmp_path, max_steps=2, alpha=1e-3, beta=1e-4), train_dataset=image_dataset(8)
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("nll" in e and "penalty" in e and e["penalty"] >= 0 for e in logs)
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["l2sp"]
    assert saved["alpha"] == 1e-3 and saved["beta"] == 1e-4 and saved["head_modules"] == ["fc"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0; got -1.0"),
        ({"beta": float("nan")}, "beta must be a finite number >= 0"),
        ({"weight_decay": 0.1}, "weight_decay must be 0 with L2SPTrainer"),
    ],
)
def test_bad_arguments(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _args(tmp_path, **overrides)
