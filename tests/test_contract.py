"""One table of every trainer's config entry through save → load → equal, for a transformers
model and a raw timm model."""

import logging

import pytest
import torch
from conftest import build_model, image_dataset
from transformers import AutoModelForImageClassification

from hf_deelbo import (
    DEELBoTrainer,
    DEELBoTrainingArguments,
    L2SPTrainer,
    L2SPTrainingArguments,
    T1T2Trainer,
    T1T2TrainingArguments,
    TPGMTrainer,
    TPGMTrainingArguments,
)
from hf_deelbo.hub import load_timm_model
from hf_deelbo.hub.config import read_config_entry

TRAINERS = {
    "deelbo": (DEELBoTrainer, DEELBoTrainingArguments, {}),
    "l2sp": (L2SPTrainer, L2SPTrainingArguments, {"alpha": 1e-3, "beta": 1e-4}),
    "tpgm": (TPGMTrainer, TPGMTrainingArguments, {"projection_steps": 1, "norm": "mars"}),
    "t1t2": (T1T2Trainer, T1T2TrainingArguments, {"hyper_steps": 1, "per_layer_strengths": True}),
}


@pytest.mark.parametrize("kind", ["vit", "timm"])
@pytest.mark.parametrize("key", list(TRAINERS))
def test_config_entry_survives_save_and_load(key, kind, tmp_path, caplog):
    trainer_class, args_class, extra = TRAINERS[key]
    model, _ = build_model(kind)
    args = args_class(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2,
                      learning_rate=0.05, optim="sgd", report_to="none", save_strategy="no", disable_tqdm=True,
                      use_cpu=True, seed=0, **extra)
    trainer = trainer_class(model=model, args=args, train_dataset=image_dataset(16),
                            eval_dataset=image_dataset(16, seed=1))
    trainer.train()
    trainer.save_model()
    entry = trainer.config_entry()
    assert entry and all(v is not None for v in entry.values()), entry  # learned values exist after training
    if kind == "vit":
        reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))
        assert getattr(reloaded.config, key) == entry
    else:
        reloaded = load_timm_model(str(tmp_path / "out"))
        assert getattr(reloaded, f"{key}_config") == entry
    for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=name)
