"""Checks of the TrainingArguments fields every trainer of the package shares, called by each
arguments class's `__post_init__` right after the parent's: values that would make a run
meaningless while it still exits 0 are refused, naming the field, the value and the fix."""

from __future__ import annotations

import math


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training_arguments(args) -> None:
    """Raises ValueError for: a learning_rate that is not a finite number > 0; a max_grad_norm
    that is NaN, infinite or negative (Trainer silently skips clipping for NaN); fp16 where there
    is no accelerator (Trainer accepts it on CPU and trains in float32); a per-device batch size
    below 1."""
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
            "(bfloat16 autocast works on CPU)."
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
