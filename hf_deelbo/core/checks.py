"""Checks of the training data, run before training so bad data fails with one clear message
instead of a stack trace deep inside a forward pass (or, worse, a silently wrong run)."""

from __future__ import annotations

import inspect
import itertools
import random

import numpy as np
import torch
from torch import nn

from .adapters import peft_base_model
from .modeling import LABEL_KEYS as LABEL_COLUMNS
from .modeling import classifier_logits, is_transformers_model


def num_model_labels(model: nn.Module) -> int | None:
    """Number of classes the model predicts: config.num_labels (transformers) or num_classes (timm)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    if getattr(model, "num_classes", None):
        return int(model.num_classes)
    return None


def expected_channels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_channels", None):
        return int(config.num_channels)
    timm_model = model if hasattr(model, "pretrained_cfg") else getattr(model, "timm_model", None)
    input_size = getattr(timm_model, "pretrained_cfg", {}).get("input_size") if timm_model is not None else None
    return int(input_size[0]) if input_size else None


def check_label_column(dataset, num_labels: int | None) -> None:
    """For a `datasets.Dataset`: a label column exists and every label lies in [0, num_labels).
    Reads the Arrow column directly (no image decoding, no transforms)."""
    columns = dataset.column_names
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_column is None:
        raise ValueError(
            f"train_dataset has no label column: expected one of {list(LABEL_COLUMNS)}; its columns are {columns}. "
            "Rename the column holding the class ids to 'labels'."
        )
    values = dataset.data.column(label_column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "iu":
        if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
            # Batched as float targets, cross-entropy would read them as class probabilities.
            raise ValueError(
                f"train_dataset column '{label_column}' holds whole numbers stored as {values.dtype} (first: "
                f"{values[:3].tolist()}); labels must be integer class ids. Cast them: "
                f"dataset.cast_column('{label_column}', datasets.Value('int64'))."
            )
        raise ValueError(
            f"train_dataset column '{label_column}' holds {values.dtype} values (first: {values[:3].tolist()}); "
            "labels must be integer class ids 0..C-1. Map class names to ids (datasets.ClassLabel)."
        )
    if num_labels is None or len(values) == 0:
        return
    bad = np.flatnonzero((values < 0) | (values >= num_labels))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"train_dataset column '{label_column}' has label {int(values[index])} at example {index}, outside "
            f"0..{num_labels - 1} ({bad.size} such examples): the model predicts {num_labels} classes. Fix the labels, "
            f"or build the model with num_labels={int(values.max()) + 1}."
        )


def has_checked_label_column(dataset) -> bool:
    """Whether `check_label_column` covers every label of `dataset` (an Arrow dataset with a label
    column); other datasets have each training batch's labels checked (`check_batch_labels`)."""
    import datasets

    return isinstance(dataset, datasets.Dataset) and any(c in dataset.column_names for c in LABEL_COLUMNS)


def check_batch_labels(labels, num_labels: int, step: int) -> None:
    """One training batch's labels are integer class ids in [0, num_labels) (0: range unknown)."""
    if not isinstance(labels, torch.Tensor):
        return
    if labels.is_floating_point():
        raise ValueError(
            f"The training batch of step {step} holds {labels.dtype} labels (first: {labels[:3].tolist()}); labels "
            "must be integer class ids (torch.long). Convert them in the dataset or the data collator."
        )
    if num_labels and labels.numel():
        bad = ((labels < 0) | (labels >= num_labels)).flatten().nonzero()
        if len(bad):
            index = int(bad[0, 0])
            raise ValueError(
                f"Example {index} of the training batch of step {step} has label {int(labels.flatten()[index])}, "
                f"outside 0..{num_labels - 1}: the model predicts {num_labels} classes. Fix the labels, or build the "
                "model with more classes."
            )


def check_distributed_launch(args) -> None:
    """Refuse a launch whose processes would train without synchronising: started as several ranks
    (torchrun / accelerate launch set WORLD_SIZE), or with a process group already initialised,
    while the Trainer is not in distributed mode. On a CPU machine without `use_cpu=True`, each
    rank then trains alone and the weights and hyperparameters drift apart with no error."""
    import os

    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    initialised = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ranks = max(launched, initialised)
    if ranks > 1 and args.world_size != ranks:
        if not args.use_cpu and not _has_accelerator():
            fix = "On a machine without GPUs, pass use_cpu=True (--use_cpu true): the ranks then train together over gloo"
        else:
            fix = (
                "Launch with torchrun or accelerate launch --multi_gpu and leave setting up the process group to "
                "the Trainer"
            )
        raise ValueError(
            f"This process is one of {ranks} ranks (WORLD_SIZE={launched}), but the Trainer trains as "
            f"{args.world_size} process: each rank would train alone and the weights and learned hyperparameters "
            f"would drift apart. {fix}."
        )


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def check_batch_norm_single_example(model: nn.Module, forward_one, dataset, args) -> None:
    """BatchNorm layers cannot train on a batch of one example where they normalise over a single
    value per channel. When a training batch of 1 can occur (per_device_train_batch_size=1, or an
    epoch's last batch), one training-mode forward of one example finds out, before training;
    the layers' running statistics are restored afterwards."""
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batch_norms or args is None:
        return
    batch_size = args.per_device_train_batch_size
    try:
        size = len(dataset)
    except TypeError:
        size = None
    last = size % batch_size if size is not None else 0
    if not (batch_size == 1 or (last == 1 and not args.dataloader_drop_last)):
        return
    buffers = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in batch_norms]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            forward_one()
    except (ValueError, RuntimeError) as error:
        where = (
            "per_device_train_batch_size=1"
            if batch_size == 1
            else f"the last batch of each epoch holds 1 example (N={size}, per_device_train_batch_size={batch_size})"
        )
        raise ValueError(
            f"The model's BatchNorm layers cannot train on a batch of 1 example ({str(error).splitlines()[0]}), and "
            f"{where}. Set dataloader_drop_last=True or choose another per_device_train_batch_size."
        ) from error
    finally:
        model.train(was_training)
        for m, saved in zip(batch_norms, buffers, strict=True):
            for k, v in saved.items():
                getattr(m, k).copy_(v)


def check_first_batch(batch: dict, model: nn.Module, forward, num_labels: int | None) -> None:
    """The first training batch fits the model: labels present and in range, images with the
    model's channel count and finite values, and a forward pass that yields num_labels logits."""
    labels = next((batch[c] for c in LABEL_COLUMNS if c in batch), None)
    if labels is None:
        raise ValueError(
            f"The training batches carry no labels (keys: {sorted(batch)}). Add a 'labels' column of class ids."
        )
    if num_labels is not None:
        labels = torch.as_tensor(labels)
        bad = ((labels < 0) | (labels >= num_labels)).nonzero()
        if len(bad):
            raise ValueError(
                f"Training example {int(bad[0, 0])} of the first batch has label {int(labels[bad[0, 0]])}, outside "
                f"0..{num_labels - 1}: the model predicts {num_labels} classes."
            )
    pixel_values = batch.get("pixel_values")
    if isinstance(pixel_values, torch.Tensor):
        channels = expected_channels(model)
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be a batch of images [batch, channels, height, width]; got shape "
                f"{list(pixel_values.shape)}."
            )
        if channels is not None and pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values have {pixel_values.shape[1]} channels (shape {list(pixel_values.shape)}), the model "
                f"expects {channels}. Convert the images, e.g. image.convert('RGB') for 3 channels."
            )
        if not torch.isfinite(pixel_values).all():
            index = int((~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(f"Training example {index} of the first batch has non-finite pixel_values (NaN or inf).")
    try:
        with torch.no_grad():
            logits = forward()
    except (RuntimeError, ValueError) as error:
        described = ""
        if isinstance(pixel_values, torch.Tensor):
            weight_dtype = next(model.parameters()).dtype
            described = (
                f" (pixel_values {list(pixel_values.shape)} {pixel_values.dtype}, model weights {weight_dtype})"
            )
        raise ValueError(
            f"The first training batch does not fit the model{described}: {str(error).splitlines()[0]}. "
            "Match the images to the model's input size, channels and dtype."
        ) from error
    if num_labels is not None and logits.shape[-1] != num_labels:
        raise ValueError(f"The model returns {logits.shape[-1]} logits per example but has num_labels={num_labels}.")


def check_training_data(model: nn.Module, dataset, data_collator=None, args=None) -> None:
    """All data checks, before any work: the label column (Arrow datasets), the model's input
    column, a forward pass of the first two examples at the model's current weights, in eval mode,
    and (with `args`) BatchNorm on a batch of one example; RNG states preserved."""
    import datasets
    from transformers import default_data_collator

    num_labels = num_model_labels(model)
    if isinstance(dataset, datasets.Dataset):
        check_label_column(dataset, num_labels)
    transformers_model = is_transformers_model(model)
    accepted = None
    if transformers_model:
        # A PeftModel's forward takes (*args, **kwargs) and passes them to the model it adapts.
        accepted = set(inspect.signature(peft_base_model(model).forward).parameters) | set(LABEL_COLUMNS)
    with preserved_rng():
        if isinstance(dataset, torch.utils.data.IterableDataset):
            examples = list(itertools.islice(iter(dataset), 2))
        else:
            examples = [dataset[i] for i in range(min(2, len(dataset)))]
        if not examples:
            raise ValueError("train_dataset is empty (0 examples); fine-tuning needs N > 0 training examples.")
        # Keep what a batch of the model's inputs can hold (Trainer drops the other columns too).
        examples = [
            {k: v for k, v in e.items() if (accepted is None or k in accepted) and not isinstance(v, (str, bytes))}
            for e in examples
        ]
        if not transformers_model:
            examples = [{k: v for k, v in e.items() if k in ("pixel_values", *LABEL_COLUMNS)} for e in examples]
        input_name = getattr(model, "main_input_name", None) if transformers_model else "pixel_values"
        if input_name and input_name not in examples[0]:
            columns = getattr(dataset, "column_names", None) or sorted(examples[0])
            raise ValueError(
                f"train_dataset has no '{input_name}' column, the model's input (its examples hold {columns}). "
                f"Add one (e.g. dataset.with_transform producing '{input_name}'), or rename the column holding it."
            )
        try:
            batch = (data_collator or default_data_collator)(examples)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"The first training examples cannot be batched (keys {sorted(examples[0])}): "
                f"{str(error).splitlines()[0]}"
            ) from error
        was_training = model.training
        model.eval()
        try:
            check_first_batch(
                batch, model, lambda: classifier_logits(model, batch, None, transformers_model), num_labels
            )
        finally:
            model.train(was_training)
        one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        check_batch_norm_single_example(
            model, lambda: classifier_logits(model, one, None, transformers_model), dataset, args
        )


class preserved_rng:
    """Context manager: leaves the Python, NumPy and torch RNG states as they were, so a check that
    draws (random crops in a transform) does not change the run."""

    def __enter__(self):
        self._python = random.getstate()
        self._numpy = np.random.get_state()
        self._torch = torch.random.fork_rng()
        self._torch.__enter__()

    def __exit__(self, *exc):
        self._torch.__exit__(*exc)
        random.setstate(self._python)
        np.random.set_state(self._numpy)
        return False
