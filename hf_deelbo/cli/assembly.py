"""What `hf-deelbo train` trains on, assembled from its arguments: the embedded digits task, or a
Hub / local model and an image dataset or folder (`assemble`); and the record of the split
(`record_split`) that `hf-deelbo evaluate` rebuilds."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .common import EMBEDDED_TEST_FRACTION, UsageError, check_model_source, load_pretrained_classifier, require_hub
from .train_arguments import EMBEDDED_MAX_TRAIN_SAMPLES


@dataclass
class TrainingInputs:
    """The model and data of a run: `model_init` gives the pretrained model with its new head (the
    loaded one first, fresh ones for a learning-rate selection); `objective_view` is the training
    set without augmentation (the training objective's); `base_model` and `dataset_name` name them
    on the model card."""

    model_init: Callable[[], object]
    train: object
    objective_view: object
    evaluation: object | None
    base_model: str
    dataset_name: str | None
    processor: object | None = None


def assemble(embedded: bool, model_args, data_args, training_args) -> TrainingInputs:
    if embedded:
        return embedded_inputs(data_args, training_args)
    return hub_inputs(model_args, data_args, training_args)


def embedded_inputs(data_args, training_args) -> TrainingInputs:
    from ..demo import digits

    num_train = data_args.max_train_samples if data_args.max_train_samples is not None else EMBEDDED_MAX_TRAIN_SAMPLES
    num_classes = len(digits.TARGET_CLASSES)
    if num_train < num_classes:
        raise UsageError(
            f"--max_train_samples {num_train} is fewer than the embedded task's {num_classes} classes "
            f"(digits 5-9): the stratified split keeps every class; pass at least {num_classes}."
        )
    print("Embedded default: a resnet10t pretrained on digits 0-4, fine-tuned on digits 5-9 (scikit-learn's digits).")
    backbone = digits.pretrained_backbone_path(seed=0)

    def model_init():
        return digits.load_backbone_with_new_head(backbone, len(digits.TARGET_CLASSES), seed=training_args.seed)

    train, test = digits.split(
        digits.digits_dataset(digits.TARGET_CLASSES),
        num_train,
        seed=training_args.seed,
        test_fraction=EMBEDDED_TEST_FRACTION,
    )
    if data_args.max_eval_samples is not None:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    train = digits.with_pixel_values(train)
    # no augmentation here, so the training objective is computed on the training set itself
    return TrainingInputs(
        model_init, train, train, digits.with_pixel_values(test), backbone, "digits 5-9 (scikit-learn)"
    )


def _check_dataset_source(name: str | None) -> None:
    """A Hub dataset id needs the Hub in reach, or datasets' offline mode (its cache)."""
    import datasets

    if name is not None and not os.path.exists(name) and not datasets.config.HF_HUB_OFFLINE:
        require_hub(f"--dataset_name {name!r}", "--train_dir DIR (an image folder, one sub-folder per class)")


def _dataset_not_cached(name: str, error: Exception) -> str:
    return (
        f"--dataset_name {name!r} is not in the local cache, and datasets is offline (HF_HUB_OFFLINE or "
        f"HF_DATASETS_OFFLINE is 1: {str(error).splitlines()[0]}); unset it with the Hub in reach, or pass "
        "--train_dir DIR."
    )


def hub_inputs(model_args, data_args, training_args) -> TrainingInputs:
    from . import data as data_lib

    check_model_source(model_args.model_name_or_path)  # before any download or dataset build
    _check_dataset_source(data_args.dataset_name)
    try:
        datasets = data_lib.load_image_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_dir,
            data_args.validation_dir,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except ConnectionError as error:  # offline mode, and the dataset is not in the cache
        raise UsageError(_dataset_not_cached(data_args.dataset_name, error)) from None
    if "train" not in datasets:
        raise UsageError(
            f"The dataset has no 'train' split (splits: {list(datasets)}); pass --train_dir or another --dataset_name."
        )
    data_lib.check_columns(datasets["train"], data_args.image_column_name, data_args.label_column_name)
    names = data_lib.label_names(datasets["train"], data_args.label_column_name)
    train, evaluation = data_lib.held_out_split(
        datasets["train"],
        datasets.get("validation"),
        data_args.train_val_split,
        training_args.seed,
        data_args.max_train_samples,
        data_args.max_eval_samples,
    )
    model, processor, head_modules = load_pretrained_classifier(model_args, len(names), dict(enumerate(names)))
    train_tf, eval_tf = data_lib.image_transforms(model, processor)
    # The trainer checks the whole label column before training; it reads it under the name `labels`.
    train, evaluation = (_labels_named_labels(d, data_args.label_column_name) for d in (train, evaluation))
    cols = (data_args.image_column_name, "labels")
    objective_view = data_lib.with_pixel_values(train, eval_tf, *cols)  # the training set without augmentation
    train = data_lib.with_pixel_values(train, train_tf, *cols)
    evaluation = data_lib.with_pixel_values(evaluation, eval_tf, *cols) if evaluation is not None else None
    if training_args.head_modules is None and head_modules is not None:
        training_args.head_modules = head_modules
    loaded = [model]

    def model_init():  # the loaded model first, then fresh loads (learning-rate selection)
        if loaded:
            return loaded.pop()
        return load_pretrained_classifier(model_args, len(names), dict(enumerate(names)))[0]

    return TrainingInputs(
        model_init, train, objective_view, evaluation, model_args.model_name_or_path, data_args.dataset_name, processor
    )


def _labels_named_labels(dataset, label_column: str):
    """`dataset` with its label column `label_column` renamed `labels` (None stays None)."""
    if dataset is None or label_column == "labels":
        return dataset
    if "labels" in dataset.column_names:
        dataset = dataset.remove_columns("labels")
    return dataset.rename_column(label_column, "labels")


def record_split(embedded: bool, data_args, training_args, train, evaluation) -> None:
    """`data_split.json` in output_dir: the data and the held-out split, for `hf-deelbo evaluate`."""
    from .data import write_split_record

    if embedded:
        source = dict(source="embedded digits", evaluation="held out", test_fraction=EMBEDDED_TEST_FRACTION)
    else:
        names = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name")
        source = {name: getattr(data_args, name) for name in (*names, "label_column_name")}
        source.update(
            source="dataset" if data_args.dataset_name else "image folder",
            # as `data.held_out_split` makes it: the validation split, else held out of train
            evaluation=None if evaluation is None else "validation or held out",
            test_fraction=data_args.train_val_split,
        )
    write_split_record(
        training_args.output_dir,
        **source,
        seed=training_args.seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        num_train_examples=len(train),
        num_eval_examples=len(evaluation) if evaluation is not None else 0,
    )
