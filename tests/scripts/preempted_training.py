"""Trains a tiny ViT with DEELBoTrainer for 12 steps through the Python API; launched by
tests/test_preemption.py with 1 process or with torchrun (2 processes).

    python tests/scripts/preempted_training.py OUTPUT_DIR straight|signalled|resume

`signalled`: the main process sends itself a real SIGTERM at the end of step 5 (the other ranks get
none: they must stop after the same step); the run must stop with `TrainingPreempted` and a complete
checkpoint. `resume`: `train(resume_from_checkpoint=True)`. Each rank writes rank{R}.json with its
weights' checksum, σ and how the run ended.
"""

import hashlib
import json
import os
import signal
import sys

import torch
from ddp_train import tiny_vit_and_data  # the script's own folder is on sys.path, under torchrun too
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, TrainingPreempted


class SignalAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGTERM)


def main():
    output_dir, mode = sys.argv[1], sys.argv[2]
    model, data = tiny_vit_and_data(48)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = DEELBoTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=8 // world_size,
        max_steps=12,
        learning_rate=0.05,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        logging_steps=4,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        ddp_find_unused_parameters=False,
        sigma_init=1e-3,
    )
    callbacks = [SignalAtStep(5)] if mode == "signalled" else []
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    record = {"ended": "finished"}
    try:
        trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    except TrainingPreempted as error:
        record = {"ended": "preempted", "message": str(error), "checkpoint": error.checkpoint}
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    record.update(
        step=trainer.state.global_step,
        weights_sha=hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        sigma=trainer.learned_hyperparameters()["sigma"],
    )
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
