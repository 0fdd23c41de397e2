"""Trains a tiny ViT with DEELBoTrainer; launched with 1 or 2 processes by tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH [SAMPLING_MECHANISM [PRIOR_VARIANCE_GROUPING [POSTERIOR_COVARIANCE]]]
    accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH

Each rank writes rank{R}.json with checksums of its weights and its λ, τ, σ, ρ.
"""

import hashlib
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import ViTConfig, ViTForImageClassification

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments


def tiny_vit_and_data(num_examples: int):
    """The tiny ViT (seed 0) and `num_examples` random images with labels of 5 classes (seed 0)."""
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
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "pixel_values": torch.randn(num_examples, 3, 32, 32, generator=generator).numpy(),
            "labels": torch.randint(0, 5, (num_examples,), generator=generator).numpy(),
        }
    ).with_format("torch")
    return model, data


def main():
    output_dir, per_device_batch = sys.argv[1], int(sys.argv[2])
    model, data = tiny_vit_and_data(32)
    args = DEELBoTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
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
        sigma_init=1e-3,
        sampling_mechanism=sys.argv[3] if len(sys.argv) > 3 else "in_place",
        prior_variance_grouping=sys.argv[4] if len(sys.argv) > 4 else "backbone",
        posterior_covariance=sys.argv[5] if len(sys.argv) > 5 else "isotropic",
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    rank = trainer.args.process_index
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    record = {
        "world_size": trainer.args.world_size,
        "weights_sha": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "weights": weights.tolist(),
        "rho": trainer.posterior.rho.tolist(),
        "learned": trainer.learned_hyperparameters(),
        "log_history": trainer.state.log_history,
    }
    if trainer.posterior.diagonal:  # the parameter each ρ_i belongs to
        record["rho_names"] = [
            name for name, piece in trainer.posterior.rho_pieces().items() for _ in range(piece.numel())
        ]
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
