"""Trains a tiny ViT with TPGMTrainer or T1T2Trainer; launched with 1 or 2 processes by
tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ddp_validation_methods.py METHOD OUTPUT_DIR PER_DEVICE_BATCH

METHOD is tpgm or t1t2. Each rank writes rank{R}.json with its weights and learned values.
"""

import hashlib
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import ViTConfig, ViTForImageClassification

from hf_deelbo import T1T2Trainer, T1T2TrainingArguments, TPGMTrainer, TPGMTrainingArguments


def _data(seed, size):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(size, 3, 32, 32, generator=generator).numpy(),
            "labels": torch.randint(0, 5, (size,), generator=generator).numpy(),
        }
    ).with_format("torch")


def main():
    method, output_dir, per_device_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    model = ViTForImageClassification(config)
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        max_steps=6,
        learning_rate=0.05,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        ddp_find_unused_parameters=False,
    )
    if method == "tpgm":
        args = TPGMTrainingArguments(projection_steps=2, radius_learning_rate=1e-3, **common)
        trainer = TPGMTrainer(model=model, args=args, train_dataset=_data(0, 32), eval_dataset=_data(1, 16))
    else:
        args = T1T2TrainingArguments(hyper_steps=2, hyper_learning_rate=100.0, per_layer_strengths=True, **common)
        trainer = T1T2Trainer(model=model, args=args, train_dataset=_data(0, 32), eval_dataset=_data(1, 16))
    trainer.train()
    trainer.save_model()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    learned = (
        trainer.balls.radii.tolist()
        if method == "tpgm"
        else (trainer.backbone_strengths.tolist() + trainer.head_strengths.tolist())
    )
    record = {
        "world_size": trainer.args.world_size,
        "weights_sha": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "weights": weights.tolist(),
        "learned": learned,
        "config_entry": trainer.config_entry(),
    }
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
