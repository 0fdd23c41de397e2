"""`hf-deelbo evaluate`: accuracy, NLL and ECE of a saved model, at the posterior mean or with --bma_samples."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .common import (
    DEFAULT_SEED,
    EMBEDDED_TEST_FRACTION,
    DataTrainingArguments,
    ModelArguments,
    UsageError,
    hf_argument_parser,
    load_pretrained_classifier,
    refuse_unknown_flags,
)


@dataclass
class EvaluateArguments:
    model_name_or_path: str = field(
        metadata={"help": "Output directory or Hub repo of a model trained with hf-deelbo."}
    )
    bma_samples: int = field(default=0, metadata={"help": "0: posterior mean; S > 0: average over S posterior draws."})
    batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the posterior draws (--bma_samples). Default: the run's seed, as train used."},
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Dataset split to evaluate. Default: the examples the run held out from training "
            "(its data_split.json: train's seed and fraction), or the dataset's validation split."
        },
    )


def make_parser():
    return hf_argument_parser((EvaluateArguments, DataTrainingArguments), "hf-deelbo evaluate")


def main(argv: list[str]) -> int:
    from transformers import default_data_collator

    from ..evaluation.metrics import classification_metrics
    from ..methods.deelbo.prediction import posterior_from_config, predictive_log_probs
    from . import data as data_lib

    parser = make_parser()
    refuse_unknown_flags(parser, argv)
    eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    if eval_args.bma_samples < 0:
        raise UsageError(
            f"--bma_samples must be >= 0 (0 predicts with the posterior mean); got {eval_args.bma_samples}"
        )
    margs = ModelArguments(model_name_or_path=eval_args.model_name_or_path)
    model, processor, _ = load_pretrained_classifier(margs)
    model.eval()
    record = data_lib.read_split_record(eval_args.model_name_or_path)
    dataset, description = evaluation_data(record, data_args, eval_args.split, model, processor)
    if eval_args.seed is None:
        eval_args.seed = record["seed"] if record else DEFAULT_SEED
    local_dir = eval_args.model_name_or_path if os.path.isdir(eval_args.model_name_or_path) else None
    posterior = posterior_from_config(model, local_dir) if eval_args.bma_samples else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=eval_args.batch_size, collate_fn=default_data_collator)
    log_probs, labels = [], []
    for batch in loader:
        log_probs.append(
            predictive_log_probs(
                model, {"pixel_values": batch["pixel_values"]}, posterior, eval_args.bma_samples, eval_args.seed
            )
        )
        labels.append(batch["labels"])
    metrics = classification_metrics(torch.cat(log_probs), torch.cat(labels))
    if not all(math.isfinite(v) for v in metrics.values()):
        raise UsageError(
            f"{eval_args.model_name_or_path!r} predicts non-finite probabilities (NLL {metrics['nll']}): its weights "
            "or its config.deelbo hold NaN or inf; evaluate another checkpoint."
        )
    how = f"BMA over {eval_args.bma_samples} draws" if eval_args.bma_samples else "posterior mean"
    print(
        f"{eval_args.model_name_or_path} ({how}, {len(dataset)} examples: {description}): "
        f"accuracy {metrics['accuracy']:.4f}  NLL {metrics['nll']:.4f}  ECE {metrics['ece']:.4f}"
    )
    return 0


def evaluation_data(record: dict | None, data_args, split: str | None, model, processor):
    """`(dataset, description)`: what `hf-deelbo evaluate` scores.

    Without data flags, the examples the run held out from training, rebuilt from its
    `data_split.json` (`record`) with train's source, seed, fraction and sizes, so that no
    training example is scored. With --dataset_name / --validation_dir naming the run's data, the
    same held-out part; naming other data, its `split` (default: validation). A run without a
    record (trained before it was written, or not by `hf-deelbo train`) is scored on the digits
    5-9 held out with train's default seed."""
    from ..demo import digits
    from . import data as data_lib

    given = data_args.dataset_name is not None or data_args.validation_dir is not None
    if not given and (record is None or record["source"] == "embedded digits"):
        if split is not None:
            raise UsageError(
                f"--split {split!r} names a split of --dataset_name or --validation_dir data, and none is "
                "given: the run's own held-out digits are scored. Drop --split, or name the data."
            )
        seed = record["seed"] if record else DEFAULT_SEED
        fraction = record["test_fraction"] if record else EMBEDDED_TEST_FRACTION
        _, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), None, seed=seed, test_fraction=fraction)
        limit = record.get("max_eval_samples") if record else None
        if limit is not None:
            test = test.select(range(min(limit, len(test))))
        origin = "held out by the run" if record else "no data_split.json: train's default split"
        return digits.with_pixel_values(test), f"digits 5-9, {fraction:.0%} {origin}, seed {seed}"
    if given:
        names = (data_args.dataset_name, data_args.dataset_config_name, data_args.validation_dir)
        columns = (data_args.image_column_name, data_args.label_column_name)
        same_data = record is not None and names == (
            record.get("dataset_name"),
            record.get("dataset_config_name"),
            record.get("validation_dir"),
        )
    else:
        names = (record.get("dataset_name"), record.get("dataset_config_name"), record.get("validation_dir"))
        columns = (record["image_column_name"], record["label_column_name"])
        same_data = True
    train_dir = record.get("train_dir") if same_data else None
    try:
        datasets = data_lib.load_image_datasets(names[0], names[1], train_dir, names[2])
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if split is not None:
        if split not in datasets:
            raise UsageError(
                f"--split {split!r} is not a split of the data (splits: {list(datasets)}); pass one of them."
            )
        dataset, description = datasets[split], f"split {split!r}"
    elif same_data:
        _, dataset = data_lib.held_out_split(
            datasets.get("train"),
            datasets.get("validation"),
            record["test_fraction"],
            record["seed"],
            record.get("max_train_samples"),
            record.get("max_eval_samples"),
        )
        if dataset is None:
            raise UsageError(
                "the run held out no evaluation data (--train_val_split 0, no validation split); "
                "pass --split, or --dataset_name / --validation_dir with other data."
            )
        description = "held out by the run" if "validation" not in datasets else "the validation split"
    elif "validation" in datasets:
        dataset, description = datasets["validation"], "the validation split"
    else:
        raise UsageError(f"the data has no 'validation' split (splits: {list(datasets)}); pass --split NAME.")
    data_lib.check_columns(dataset, *columns)
    _, eval_tf = data_lib.image_transforms(model, processor)
    return data_lib.with_pixel_values(dataset, eval_tf, *columns), description
