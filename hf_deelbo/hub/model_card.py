"""The model card: one builder, a template (`method_card_template.md`: the method's values as a
table; a method may bring its own, as DE ELBO does) plus the run's data. The method's title, tags
and citation come from its `MethodSpec` (`hf_deelbo.registry`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..registry import MethodSpec

METHOD_TEMPLATE_PATH = Path(__file__).parent / "method_card_template.md"
# The task of a model transformers does not map to one (a raw timm model): image classification.
DEFAULT_TASK = "image-classification"
# The Auto class that loads a classifier of each task, for the card's "How to use".
AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "audio-classification": "AutoModelForAudioClassification",
}


def _usage(
    library_name: str,
    repo_id: str | None,
    local_path: str | None,
    config_key: str,
    comment: str,
    base_model: str | None = None,
    values_file: str = "config.json",
    task: str = DEFAULT_TASK,
) -> str:
    """The card's loading snippet: the Hub repo `repo_id` if there is one, else the directory the card
    is written to (`local_path`), which is not on the Hub until pushed, with the Auto class of `task`.
    A PEFT adapter (`library_name` "peft") is loaded onto its base model `base_model`."""
    auto = AUTO_CLASSES.get(task, "AutoModel")
    if library_name == "peft":
        return (
            f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
            "from hf_deelbo.hub import load_config_entry\n\n"
            f'base_model = {auto}.from_pretrained("{base_model or "<base model>"}")\n'
            f'model = PeftModel.from_pretrained(base_model, "{repo_id or local_path}")\n'
            f'print(load_config_entry("{repo_id or local_path}", "{config_key}"))  # {comment}: {values_file}'
        )
    if library_name == "timm":
        source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{local_path}"
        return (
            f'import timm\n\nmodel = timm.create_model("{source}", pretrained=True)\n'
            f"# {comment}: config.json's `{config_key}`"
        )
    return (
        f"from transformers import {auto}\n\n"
        f'model = {auto}.from_pretrained("{repo_id or local_path}")\n'
        f"print(model.config.{config_key})  # {comment}"
    )


def set_card_repo_id(card_text: str, repo_id: str) -> str:
    """The card with its "How to use" snippet loading the Hub repo `repo_id` instead of a local
    directory (for a directory pushed after its card was written)."""
    head, sep, usage = card_text.partition("## How to use")
    if "PeftModel.from_pretrained(" in usage:  # the adapter's lines, not its base model's
        usage = re.sub(
            r'PeftModel\.from_pretrained\((\w+), "[^"\n]*"\)',
            rf'PeftModel.from_pretrained(\1, "{repo_id}")',
            usage,
            count=1,
        )
        usage = re.sub(r'load_config_entry\("[^"\n]*"', f'load_config_entry("{repo_id}"', usage, count=1)
        return head + sep + usage
    usage = re.sub(r'"local-dir:[^"\n]*"', f'"hf-hub:{repo_id}"', usage, count=1)
    usage = re.sub(r'from_pretrained\("[^"\n]*"\)', f'from_pretrained("{repo_id}")', usage, count=1)
    return head + sep + usage


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub id; local paths and descriptions are not, so they are left out of the metadata."""
    if not name or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _card_data(
    model_name: str,
    library_name: str,
    base_model: str | None,
    dataset: str | None,
    tags: list[str],
    eval_results: dict,
    task: str,
    trainer_metadata: dict | None,
) -> ModelCardData:
    """The card's metadata: what plain Trainer's card holds (`trainer_metadata`, from transformers'
    `TrainingSummary.create_metadata`: license, language, tags, datasets, metrics, model-index),
    plus the library, the method's tags and the task. The evaluation results go to model-index
    as plain Trainer's do; where its summary found no data for them and the data has a Hub name,
    they are listed under that name."""
    metadata = dict(trainer_metadata or {})
    dataset_id = _hub_id(dataset)
    model_index = metadata.pop("model-index", None) or [{"name": model_name, "results": []}]
    if not model_index[0].get("results") and dataset_id and eval_results:
        model_index = None
        results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in eval_results.items()
        ]
    datasets = metadata.pop("datasets", None) or ([dataset_id] if dataset_id else None)
    metadata.pop("library_name", None)
    metadata.pop("base_model", None)
    return ModelCardData(
        library_name=library_name,
        base_model=_hub_id(base_model),
        datasets=datasets,
        tags=sorted(set(tags) | set(metadata.pop("tags", []))),
        pipeline_tag=task,
        model_name=model_name,
        **({"model-index": model_index} if model_index is not None else {"eval_results": results}),
        **metadata,
    )


def framework_versions() -> dict[str, str]:
    """The versions a card lists, as plain Trainer's "Framework versions" does, with hf_deelbo's and timm's."""
    import importlib.metadata

    versions = {}
    for label, distribution in (
        ("hf_deelbo", "hf-deelbo"),
        ("Transformers", "transformers"),
        ("Pytorch", "torch"),
        ("Accelerate", "accelerate"),
        ("Datasets", "datasets"),
        ("Tokenizers", "tokenizers"),
        ("timm", "timm"),
        ("PEFT", "peft"),
    ):
        try:
            versions[label] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _card_value(value) -> str:
    """A table cell: numbers to 4 significant digits; per-tensor dicts summarised by count and range."""
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        values = list(value.values())
        return f"{len(values)} values, {min(values):.4g} … {max(values):.4g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def build_model_card(
    spec: MethodSpec,
    values: dict,
    *,
    model_name: str,
    template_path: str | Path = METHOD_TEMPLATE_PATH,
    usage_comment: str | None = None,
    library_name: str = "transformers",
    base_model: str | None = None,
    dataset: str | None = None,
    eval_results: dict | None = None,
    hyperparameters: dict | None = None,
    plot: str | None = None,
    repo_id: str | None = None,
    local_path: str | None = None,
    extra_tags: list[str] | None = None,
    values_file: str = "config.json",
    task: str = DEFAULT_TASK,
    trainer_metadata: dict | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a run of the method `spec`, from `template_path`: its
    `config.<key>` entry `values` (in the template: `entry` as it is, `values` formatted for a
    table), the evaluation results (also as model-index metadata), the training settings, a plot
    and the method's citation; tagged with the method's tags and the model's `task`.
    `values_file`: the file saved with the model that holds `values` (a PEFT adapter's is not
    config.json)."""
    eval_results = eval_results or {}
    card_data = _card_data(
        model_name,
        library_name,
        base_model,
        dataset,
        [task, *spec.tags, *(extra_tags or [])],
        eval_results,
        task,
        trainer_metadata,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        base_model=card_data.base_model,
        dataset=dataset,
        method=spec.title,
        config_key=spec.key,
        entry=values,
        values={k: _card_value(v) for k, v in values.items() if k != "format_version"},
        eval_results=eval_results,
        hyperparameters=hyperparameters or {},
        plot=plot,
        values_file=values_file,
        library_name=library_name,
        usage=_usage(
            library_name,
            repo_id,
            local_path or model_name,
            spec.key,
            usage_comment or f"the {spec.title} hyperparameters",
            card_data.base_model,
            values_file,
            task,
        ),
        citation=spec.citation.strip(),
        framework_versions=framework_versions(),
    )
