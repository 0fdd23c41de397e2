"""The validation data that TPGM and T1–T2 learn their regularization from.

Both methods need examples the weights are not trained on. They come from `eval_dataset`, or,
with `validation_fraction`, from a stratified part of `train_dataset` that is then held out of
training (the class proportions are kept in both parts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import LABEL_KEYS


def check_validation_fraction(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(
            f"validation_fraction must be None (use eval_dataset) or a fraction in (0, 1), e.g. 0.2; got {value}"
        )


def split_validation(train_dataset, eval_dataset, validation_fraction: float | None, seed: int, trainer_name: str):
    """(training set, validation set) for a trainer that learns from validation data.

    `validation_fraction` set: a stratified part of `train_dataset` (a `datasets.Dataset` with a
    label column) is held out; `eval_dataset` is left for evaluation. Otherwise `eval_dataset` is
    the validation set. Raises a `ValueError` naming the fix when neither is available.
    """
    if validation_fraction is None:
        if eval_dataset is None or isinstance(eval_dataset, dict):
            raise ValueError(
                f"{trainer_name} learns its regularization on validation data: pass eval_dataset=<a dataset>, or set "
                "validation_fraction (e.g. 0.2) to hold out a stratified part of train_dataset."
            )
        return train_dataset, eval_dataset
    if train_dataset is None:
        raise ValueError(f"validation_fraction={validation_fraction} needs a train_dataset to split.")
    column_names = getattr(train_dataset, "column_names", None)
    label_column = next((c for c in LABEL_KEYS if column_names and c in column_names), None)
    if label_column is None:
        raise ValueError(
            f"validation_fraction needs a datasets.Dataset with a label column ({list(LABEL_KEYS)}) to split "
            f"stratified; got {type(train_dataset).__name__}. Pass eval_dataset instead."
        )
    labels = train_dataset.data.column(label_column).to_numpy(zero_copy_only=False)
    train_indices, validation_indices = stratified_split(labels, validation_fraction, seed, trainer_name)
    return train_dataset.select(train_indices), train_dataset.select(validation_indices)


def stratified_split(
    labels, validation_fraction: float, seed: int, trainer_name: str = "The split"
) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), class proportions kept in both."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    num_validation = math.ceil(validation_fraction * len(labels))
    if counts.min() < 2 or num_validation < len(classes) or len(labels) - num_validation < len(classes):
        raise ValueError(
            f"{trainer_name} cannot hold out a stratified validation_fraction={validation_fraction} of {len(labels)} "
            f"examples: {len(classes)} classes, the smallest with {counts.min()} example(s); each part needs every "
            "class. Use a larger validation_fraction or more data, or pass eval_dataset."
        )
    train, validation = train_test_split(
        np.arange(len(labels)), test_size=validation_fraction, random_state=seed, stratify=labels
    )
    return sorted(train.tolist()), sorted(validation.tolist())


def cycle_batches(dataloader) -> Iterator[dict]:
    """The dataloader's batches, pass after pass, for as long as they are asked for."""
    while True:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            raise ValueError("The validation set is empty.")


class ValidationTrainerMixin:
    """For `FineTuningTrainer` subclasses that learn on validation data (TPGM, T1–T2): takes the
    validation set before `Trainer.__init__` runs, serves its batches without end, and counts the
    wall time the regularizer's own work adds (`hyper_seconds`, logged and in the train metrics)."""

    def _check_before_init(self, args, kwargs) -> None:
        train_dataset, self.validation_dataset = split_validation(
            kwargs.get("train_dataset"),
            kwargs.get("eval_dataset"),
            args.validation_fraction,
            args.seed,
            type(self).__name__,
        )
        kwargs["train_dataset"] = train_dataset
        self._validation_batches = None
        self.hyper_seconds = 0.0

    def next_validation_batch(self) -> dict:
        """The next validation batch, on the device (evaluation batch size, passes repeat in order)."""
        if self._validation_batches is None:
            self._validation_batches = cycle_batches(self.get_eval_dataloader(self.validation_dataset))
        return self._prepare_inputs(next(self._validation_batches))

    def validation_loss(self, inputs: dict, parameters: dict | None = None) -> torch.Tensor:
        """Mean cross-entropy of a validation batch, differentiable, with the model in eval mode (at
        `parameters`, name → tensor, if given)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                logits = self._forward(model, inputs, parameters)
            return F.cross_entropy(logits.float(), inputs[self.label_names[0]])
        finally:
            model.train(was_training)

    def logged_values(self, logs: dict) -> dict:
        values = super().logged_values(logs)
        if "loss" in logs or "train_runtime" in logs:
            values["hyper_seconds"] = round(self.hyper_seconds, 4)
        return values

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        output.metrics["hyper_seconds"] = self.hyper_seconds
        return output
