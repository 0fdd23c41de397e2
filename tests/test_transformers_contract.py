"""The private `Trainer` methods the package overrides, and what of transformers' behaviour each
override relies on: they exist, take the arguments the package passes on, and Trainer calls them
when the package needs it. Run on both ends of the supported range (.ci/run), this is what fails
first when a transformers release moves them."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import build_model, image_dataset
from transformers import Trainer, TrainerCallback

from hf_deelbo import DEELBoTrainer

# name -> (its parameters in Trainer, what the override relies on)
OVERRIDES = {
    "_save": (
        ["output_dir", "state_dict"],
        "writes a model's files for save_model and every checkpoint: the "
        "config entry goes into the config first, timm/PEFT files after",
    ),
    "_save_checkpoint": (
        ["model", "trial"],
        "writes checkpoint-<step> whole: the completeness manifest goes after it",
    ),
    "_load_from_checkpoint": (
        ["resume_from_checkpoint", "model"],
        "loads a checkpoint's weights on resume: replaced "
        "by a strict load (Trainer's skips ViT's legacy key names, transformers issue 43701)",
    ),
    "_load_best_model": ([], "loads the best checkpoint at the end: the method's state goes with its weights"),
    "_load_callback_state": ([], "rebuilds stateful callbacks on resume: the new instance is bound to the method"),
    "_maybe_log_save_evaluate": (
        ["tr_loss", "grad_norm", "model", "trial", "epoch", "ignore_keys_for_eval", "start_time", "learning_rate"],
        "runs after every optimizer step, before its log, evaluation or save: the divergence and preemption checks",
    ),
    "_push_from_checkpoint": (["checkpoint_folder"], "pushes a checkpoint in the background: its future is kept"),
    "_set_signature_columns_if_needed": ([], "decides which dataset columns reach the model: timm's inputs"),
    "_clip_grad_norm": (["model"], "clips the gradients before the step: ρ is clipped jointly with the weights"),
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_each_overridden_private_method_exists_with_the_arguments_used(name):
    parameters, _ = OVERRIDES[name]
    method = getattr(Trainer, name, None)
    assert method is not None, f"Trainer.{name} is gone: {OVERRIDES[name][1]}"
    assert list(inspect.signature(method).parameters)[1:] == parameters, name


def test_every_private_override_is_listed():
    overridden = {
        name
        for cls in DEELBoTrainer.__mro__[: DEELBoTrainer.__mro__.index(Trainer)]  # FineTuningTrainer and its mixins
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and callable(getattr(Trainer, name, None))
    }
    assert overridden == set(OVERRIDES)


class Calls(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_trainer_calls_the_overrides_when_the_package_needs_it(make_args):
    """Per optimizer step, `_clip_grad_norm` then `_maybe_log_save_evaluate` (after the step's
    on_step_end, before anything of it is saved); `_save_checkpoint` then `_save` at each save."""
    calls = []

    class Recording(DEELBoTrainer):
        def _clip_grad_norm(self, model):
            calls.append(("clip", self.state.global_step))
            return super()._clip_grad_norm(model)

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            calls.append(("after_step", self.state.global_step))
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            calls.append(("checkpoint", self.state.global_step))
            return super()._save_checkpoint(model, trial)

        def _save(self, output_dir=None, state_dict=None):
            calls.append(("save", self.state.global_step))
            return super()._save(output_dir, state_dict)

    model, _ = build_model("resnet")
    trainer = Recording(
        model=model,
        args=make_args(max_steps=2, save_strategy="steps", save_steps=2, max_grad_norm=1.0),
        train_dataset=image_dataset(16),
    )
    trainer.train()
    assert calls[:4] == [("clip", 0), ("after_step", 1), ("clip", 1), ("after_step", 2)], calls
    checkpoint = calls.index(("checkpoint", 2))
    assert checkpoint > 3 and calls[checkpoint + 1] == ("save", 2), calls  # saved from within the step's check
    assert torch.isfinite(trainer.posterior.rho).all()
