"""No host–device synchronisation in DE ELBO's training step: λ, τ and the logged values stay on the
device, and `.item()`/`float()` happen only when logging, saving or evaluating. Counted on CPU as
calls of `aten._local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)` and `if t:` dispatch to)."""

import traceback

import pytest
import torch
from conftest import build_model, image_dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append([f"{frame.filename}:{frame.name}" for frame in traceback.extract_stack()])
        return func(*args, **(kwargs or {}))


def _caller(stack: list[str]) -> str:
    """Who asked for the value: the innermost frame of hf_deelbo, or of Trainer's loop when none of
    ours is inside it (torch's single-tensor Adam reads its step counter, a host tensor even on a GPU).
    `CombinedOptimizer.step` (a diagonal posterior's ρ has an Adam of its own) only calls the torch
    optimizers' steps, so what they read is attributed past it."""
    for frame in reversed(stack):
        if frame.endswith("/hf_deelbo/methods/deelbo/optimization.py:step"):
            continue
        if "/hf_deelbo/" in frame or frame.endswith(":_inner_training_loop"):
            return frame
    return stack[-2]


class _CountFromStep(TrainerCallback):
    """Counts from the beginning of optimizer step `first` to the beginning of the last step (which
    logs and saves), so the window holds whole steps that neither log, save nor evaluate."""

    def __init__(self, first, last):
        self.first, self.last, self.mode = first, last, _CountSyncs()
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if step == self.first:
            self.mode.__enter__()
        if self.first < step <= self.last:
            self.steps += 1
        if step == self.last:
            self.mode.__exit__(None, None, None)


@pytest.mark.parametrize(
    "mechanism, accumulation, grouping, covariance",
    [
        ("in_place", 1, "backbone", "isotropic"),
        ("in_place", 2, "backbone", "isotropic"),
        ("functional_call", 1, "backbone", "isotropic"),
        ("in_place", 1, "layer", "isotropic"),
        ("functional_call", 1, "layer", "isotropic"),
        ("in_place", 2, "layer", "diagonal"),
        ("functional_call", 1, "backbone", "diagonal"),
    ],
)
def test_training_steps_that_do_not_log_never_synchronise(mechanism, accumulation, grouping, covariance, make_args):
    """Neither DE ELBO nor the divergence check every trainer of the package shares (which reads its
    on-device flags only at steps that log, evaluate or save) synchronises in between."""
    model, _ = build_model("vit")
    args = make_args(
        max_steps=6,
        logging_steps=6,
        sampling_mechanism=mechanism,
        optim="adamw_torch",
        gradient_accumulation_steps=accumulation,
        max_grad_norm=1.0,
        prior_variance_grouping=grouping,
        posterior_covariance=covariance,
        logging_nan_inf_filter=False,
    )  # plain Trainer's own per-micro-batch check of the loss syncs
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(48))
    counter = _CountFromStep(first=2, last=6)
    trainer.add_callback(counter)  # last, so DEELBoCallback's on_step_end falls inside the window
    trainer.train()
    assert counter.steps == 4
    callers = [_caller(stack) for stack in counter.mode.stacks]
    assert [caller for caller in callers if "hf_deelbo" in caller] == []
    # the values stayed on the device and still reached the logs
    assert {"lambda", "tau", "sigma", "kl", "nll"} <= set(trainer.state.log_history[0])  # logged at step 6
