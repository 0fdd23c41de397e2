"""Checks of the training data, run before training so bad data fails with one clear message
instead of a stack trace deep inside a forward pass (or, worse, a silently wrong run)."""

from __future__ import annotations

import inspect
import itertools
import random

import numpy as np
import torch
from torch import nn

from .prediction import LABEL_KEYS as LABEL_COLUMNS
from .prediction import classifier_logits, is_transformers_model


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
            values = values.astype(np.int64)
        else:
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
            described = f" (pixel_values {list(pixel_values.shape)} {pixel_values.dtype}, model weights {weight_dtype})"
        raise ValueError(
            f"The first training batch does not fit the model{described}: {str(error).splitlines()[0]}. "
            "Match the images to the model's input size, channels and dtype."
        ) from error
    if num_labels is not None and logits.shape[-1] != num_labels:
        raise ValueError(f"The model returns {logits.shape[-1]} logits per example but has num_labels={num_labels}.")


def check_training_data(model: nn.Module, dataset, data_collator=None) -> None:
    """All data checks, before any work: the label column (Arrow datasets) and a forward pass of
    the first two examples at the model's current weights, in eval mode, RNG states preserved."""
    import datasets
    from transformers import default_data_collator

    num_labels = num_model_labels(model)
    if isinstance(dataset, datasets.Dataset):
        check_label_column(dataset, num_labels)
    transformers_model = is_transformers_model(model)
    accepted = None
    if transformers_model:
        accepted = set(inspect.signature(model.forward).parameters) | set(LABEL_COLUMNS)
    with preserved_rng():
        if isinstance(dataset, torch.utils.data.IterableDataset):
            examples = list(itertools.islice(iter(dataset), 2))
        else:
            examples = [dataset[i] for i in range(min(2, len(dataset)))]
        if not examples:
            raise ValueError("train_dataset is empty (0 examples); DE ELBO needs N > 0 training examples.")
        # Keep what a batch of the model's inputs can hold (Trainer drops the other columns too).
        examples = [
            {k: v for k, v in e.items() if (accepted is None or k in accepted) and not isinstance(v, (str, bytes))}
            for e in examples
        ]
        if not transformers_model:
            examples = [{k: v for k, v in e.items() if k in ("pixel_values", *LABEL_COLUMNS)} for e in examples]
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
            check_first_batch(batch, model, lambda: classifier_logits(model, batch, None, transformers_model), num_labels)
        finally:
            model.train(was_training)


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
