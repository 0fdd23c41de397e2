"""The arguments every fine-tuning method shares, set once: the backbone/head split
(`head_modules`), `weight_decay` kept at 0 (each method's regularizer replaces it), the refused
engines, the checks of TrainingArguments fields that would make a run meaningless while it still
exits 0 (naming the field, the value and the fix), and, for methods whose learned state lives in
callback state, `restore_callback_states_from_checkpoint` kept at `True`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class FineTuningArguments(TrainingArguments):
    r"""
    Base of the methods' arguments. Every [`~transformers.TrainingArguments`] field is accepted;
    `weight_decay` must stay `0.0`, and FSDP and DeepSpeed are refused (Trainer's paths for them do
    not carry the methods' state; DDP is supported).

    Parameters:
        head_modules (`list[str]`, *optional*, defaults to `None`):
            Module-name prefixes of the new classification head; every other trainable parameter is
            backbone. `None` detects the head: `classifier`/`score` in transformers models,
            `get_classifier()` in timm models.
    """

    # Set by each method's arguments: its trainer's name and what replaces weight decay, for the
    # error messages; `sharding_note` says why sharded engines are refused, if there is more to say.
    trainer_name: ClassVar[str] = "FineTuningTrainer"
    replaces_weight_decay: ClassVar[str] = "the regularizer"
    sharding_note: ClassVar[str] = "Trainer's FSDP and DeepSpeed paths do not carry the method's state"

    head_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name prefixes of the new head; the rest is backbone. "
            "Default: detected (classifier/score, or timm's get_classifier())."
        },
    )

    def __post_init__(self):
        # Before the parent: its DeepSpeed/FSDP set-up fails with unrelated messages (a missing
        # package) before ours could say what to use instead.
        if self.fsdp or self.deepspeed:
            engine = "FSDP" if self.fsdp else "DeepSpeed"
            raise ValueError(
                f"{engine} is not supported by {self.trainer_name}: {self.sharding_note}. Train with DDP instead "
                "(torchrun --nproc_per_node N, or accelerate launch --multi_gpu), which is supported."
            )
        super().__post_init__()
        check_training_arguments(self)
        if self.weight_decay != 0:
            raise ValueError(
                f"weight_decay must be 0 with {self.trainer_name}: {self.replaces_weight_decay} replaces it; "
                f"got {self.weight_decay}"
            )
        if self.head_modules is not None:
            if isinstance(self.head_modules, str):
                self.head_modules = [self.head_modules]
            if not self.head_modules or not all(isinstance(m, str) and m for m in self.head_modules):
                raise ValueError(
                    f"head_modules must be None (detect) or a non-empty list of module names; got {self.head_modules!r}"
                )


@dataclass
class StatefulFineTuningArguments(FineTuningArguments):
    r"""
    Base of the arguments of methods that learn state kept in a callback (`core.callback`):
    `restore_callback_states_from_checkpoint` defaults to `True` and is kept there (`False` is
    overridden with a warning), since resuming without that state would restart what was learned.
    """

    # What the method keeps in callback state, for the warning ("the radii").
    callback_state: ClassVar[str] = "the learned values"

    # Overridden TrainingArguments default (see the class docstring).
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={
            "help": "Restore callback states from checkpoints. Always True here: the learned values live there."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.restore_callback_states_from_checkpoint:
            logger.warning(
                f"restore_callback_states_from_checkpoint=False is overridden to True: {self.callback_state} live in "
                "callback state, and resuming without them would restart the learned values."
            )
            self.restore_callback_states_from_checkpoint = True


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_types(args, numbers: tuple[str, ...] = (), ints: tuple[str, ...] = ()) -> None:
    """ValueError naming the field when one of `numbers` is not a real number (None passes) or one of
    `ints` is not an int: a typed value from Python or a file (`kappa="3"`, `bma_samples=2.5`) is
    refused before it reaches arithmetic."""
    for name in numbers:
        value = getattr(args, name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    for name in ints:
        value = getattr(args, name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{name} must be an int; got {value!r} ({type(value).__name__})")


def check_training_arguments(args) -> None:
    """Raises ValueError for: a learning_rate that is not a finite number > 0; a max_grad_norm
    that is NaN, infinite or negative (Trainer silently skips clipping for NaN); fp16 where there
    is no accelerator (Trainer accepts it on CPU and trains in float32); a per-device batch size
    below 1."""
    check_types(
        args,
        numbers=("learning_rate", "num_train_epochs", "max_grad_norm"),
        ints=(
            "max_steps",
            "gradient_accumulation_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "seed",
        ),
    )
    if args.gradient_accumulation_steps < 1:
        raise ValueError(
            f"gradient_accumulation_steps must be an int >= 1 (1 takes an optimizer step after every batch); "
            f"got {args.gradient_accumulation_steps}"
        )
    if not (_is_finite_number(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(
            f"learning_rate must be a finite number > 0 (the paper searches 0.1, 0.01, 0.001, 0.0001); "
            f"got {args.learning_rate}"
        )
    if args.max_grad_norm is not None and not (_is_finite_number(args.max_grad_norm) and args.max_grad_norm >= 0):
        raise ValueError(
            f"max_grad_norm must be a finite number >= 0 (0 turns clipping off; the paper clips at 1.0); "
            f"got {args.max_grad_norm}"
        )
    if args.fp16 and _runs_on_cpu(args):
        raise ValueError(
            "fp16=True needs a GPU: on CPU, Trainer accepts it and trains in float32. Drop fp16, or use bf16=True "
            "with use_cpu=True (bfloat16 autocast works on CPU; on the command line: --bf16 true --use_cpu true)."
        )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value}")


def _runs_on_cpu(args) -> bool:
    import torch

    if args.use_cpu:
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()
