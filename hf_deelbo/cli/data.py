"""Image-classification data for the command line: Hub datasets or image folders, turned into
`pixel_values` by `with_transform`, with the same options as transformers'
`examples/pytorch/image-classification/run_image_classification.py`."""

from __future__ import annotations

import os

from datasets import ClassLabel, DatasetDict, load_dataset


def load_image_datasets(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | None,
    validation_dir: str | None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> DatasetDict:
    """A DatasetDict from the Hub (`dataset_name`) or from image folders (`train_dir`,
    `validation_dir`: one sub-folder per class)."""
    if dataset_name is not None:
        return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    data_files = {}
    for split, directory, flag in (
        ("train", train_dir, "--train_dir"),
        ("validation", validation_dir, "--validation_dir"),
    ):
        if directory is not None:
            if not os.path.isdir(directory):
                raise FileNotFoundError(
                    f"{flag} {directory!r} is not a directory; pass a folder with one sub-folder per class."
                )
            data_files[split] = os.path.join(directory, "**")
    return load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)


def held_out_split(
    train,
    evaluation,
    train_val_split: float,
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
):
    """`(train, evaluation)` as `hf-deelbo train` builds them, and `hf-deelbo evaluate` rebuilds
    them from the run's `data_split.json`: without an evaluation split, `train_val_split` of the
    training split is held out (seeded); then each part is cut to its maximum (shuffled, seeded)."""
    if evaluation is None and train is not None and train_val_split > 0:
        parts = train.train_test_split(test_size=train_val_split, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if train is not None and max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if evaluation is not None and max_eval_samples is not None:
        evaluation = evaluation.shuffle(seed=seed).select(range(min(max_eval_samples, len(evaluation))))
    return train, evaluation


# The record of the data a run trained and was evaluated on, written into its output directory.
SPLIT_RECORD_NAME = "data_split.json"
SPLIT_RECORD_VERSION = 1


def write_split_record(output_dir: str, **record) -> dict:
    """Write `data_split.json`: where the data came from (`source`: "embedded digits", "dataset" or
    "image folder", with its name or folders and columns), how the evaluation part was made
    (`evaluation`: "held out" of the training data with `seed` and `test_fraction`, "validation"
    split, or None) and the sizes, so that `hf-deelbo evaluate` scores the same held-out examples."""
    import json

    record = {"format_version": SPLIT_RECORD_VERSION, **record}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, SPLIT_RECORD_NAME), "w") as f:
        json.dump(dict(sorted(record.items())), f, indent=2)
    return record


def read_split_record(path_or_repo: str, token: str | None = None, revision: str | None = None) -> dict | None:
    """The `data_split.json` of a run (a local output directory or a Hub repo), or None if it has none."""
    import json

    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, SPLIT_RECORD_NAME)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(path_or_repo, SPLIT_RECORD_NAME, token=token, revision=revision)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise _bad_record(path, f"not readable JSON: {str(error).splitlines()[0]}") from None
    problem = split_record_problem(record)
    if problem:
        raise _bad_record(path, problem)
    return record


SPLIT_SOURCES = ("embedded digits", "dataset", "image folder")


def split_record_problem(record) -> str | None:
    """What makes `record` no valid `data_split.json` (a field missing or of the wrong type), or None."""
    if not isinstance(record, dict):
        return f"it holds {type(record).__name__}, not a JSON object"
    if record.get("source") not in SPLIT_SOURCES:
        return f"source is {record.get('source')!r}, not one of {list(SPLIT_SOURCES)}"
    checks = {
        "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "test_fraction": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
    }
    for name, valid in checks.items():
        if not valid(record.get(name)):
            return f"{name} is {record.get(name)!r}"
    for name in ("max_train_samples", "max_eval_samples"):
        value = record.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return f"{name} is {value!r}, not an int >= 1 or null"
    names = ["dataset_name", "dataset_config_name", "train_dir", "validation_dir"]
    if record["source"] != "embedded digits":
        names += ["image_column_name", "label_column_name"]
        if not isinstance(record.get("image_column_name"), str) or not isinstance(
            record.get("label_column_name"), str
        ):
            return "image_column_name or label_column_name is missing"
    for name in names:
        if record.get(name) is not None and not isinstance(record.get(name), str):
            return f"{name} is {record.get(name)!r}, not a string or null"
    return None


def _bad_record(path: str, problem: str) -> Exception:
    from .common import UsageError

    return UsageError(
        f"{path} is no valid record of the run's data ({problem}); restore it, or delete it and pass the "
        "data to score with --dataset_name or --validation_dir."
    )


def check_columns(dataset, image_column: str, label_column: str) -> None:
    """Raises a ValueError naming the flag when a column is missing."""
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(
            f"--image_column_name {image_column!r} not found in the dataset; its columns are {columns}. "
            "Pass --image_column_name with the column holding the images."
        )
    if label_column not in columns:
        raise ValueError(
            f"--label_column_name {label_column!r} not found in the dataset; its columns are {columns}. "
            "Pass --label_column_name with the column holding the labels."
        )


def label_names(dataset, label_column: str) -> list[str]:
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[label_column]))]


def image_transforms(model, image_processor=None):
    """(train_transform, eval_transform) mapping a PIL image to a tensor, following the model's
    preprocessing: the transformers image processor's size/mean/std, or timm's data config."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        Lambda,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )

    if image_processor is not None:
        size = image_processor.size
        size = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
        normalize = Normalize(mean=mean, std=std) if mean is not None and std is not None else Lambda(lambda x: x)
        to_rgb = Lambda(lambda img: img.convert("RGB"))
        train = Compose([to_rgb, RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
        evaluation = Compose([to_rgb, Resize(size), CenterCrop(size), ToTensor(), normalize])
        return train, evaluation
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    to_rgb = Lambda(lambda img: img.convert("RGB"))
    train = Compose([to_rgb, timm.data.create_transform(**config, is_training=True)])
    evaluation = Compose([to_rgb, timm.data.create_transform(**config, is_training=False)])
    return train, evaluation


def with_pixel_values(dataset, transform, image_column: str, label_column: str):
    """`dataset.with_transform` producing `pixel_values` and `labels`."""

    def apply(batch):
        return {"pixel_values": [transform(image) for image in batch[image_column]], "labels": batch[label_column]}

    return dataset.with_transform(apply)
