"""The model card: a template (`model_card_template.md`) plus the run's data."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"
METHOD_TEMPLATE_PATH = Path(__file__).parent / "method_card_template.md"
TAGS = ["deelbo", "image-classification", "l2-sp", "variational-inference"]


def _usage(library_name: str, repo_id: str | None, local_path: str | None = None, config_key: str = "deelbo",
           comment: str = "learned λ, τ, σ, κ") -> str:
    """The card's loading snippet: the Hub repo `repo_id` if there is one, else the directory the card
    is written to (`local_path`), which is not on the Hub until pushed."""
    if library_name == "timm":
        source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{local_path}"
        return (
            f'import timm\n\nmodel = timm.create_model("{source}", pretrained=True)\n'
            f"# {comment}: config.json's `{config_key}`"
        )
    return (
        "from transformers import AutoModelForImageClassification\n\n"
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id or local_path}")\n'
        f"print(model.config.{config_key})  # {comment}"
    )


def set_card_repo_id(card_text: str, repo_id: str) -> str:
    """The card with its "How to use" snippet loading the Hub repo `repo_id` instead of a local
    directory (for a directory pushed after its card was written)."""
    import re

    head, sep, usage = card_text.partition("## How to use")
    usage = re.sub(r'"local-dir:[^"\n]*"', f'"hf-hub:{repo_id}"', usage, count=1)
    usage = re.sub(r'from_pretrained\("[^"\n]*"\)', f'from_pretrained("{repo_id}")', usage, count=1)
    return head + sep + usage


def _card_data(model_name: str, library_name: str, base_model: str | None, dataset: str | None,
               tags: list[str]) -> ModelCardData:
    """The card's metadata; local paths are not Hub ids, so they are left out of it."""
    return ModelCardData(
        library_name=library_name,
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        datasets=[dataset] if dataset and not os.path.isdir(dataset) else None,
        tags=sorted(set(tags)),
        pipeline_tag="image-classification",
        model_name=model_name,
    )


def build_model_card(
    deelbo: dict,
    *,
    model_name: str,
    library_name: str = "transformers",
    base_model: str | None = None,
    dataset: str | None = None,
    eval_results: dict | None = None,
    hyperparameters: dict | None = None,
    plot: str | None = None,
    repo_id: str | None = None,
    local_path: str | None = None,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` with the DE ELBO section (λ, τ, σ, κ, N, D_b, K, α_eff, β_eff),
    the evaluation results, the training settings and the method's citation. Tagged `deelbo`."""
    card_data = _card_data(model_name, library_name, base_model, dataset, TAGS + (extra_tags or []))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        base_model=card_data.base_model,
        dataset=dataset,
        deelbo=deelbo,
        eval_results=eval_results or {},
        hyperparameters=hyperparameters or {},
        plot=plot,
        usage=_usage(library_name, repo_id, local_path or model_name),
    )


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


def build_method_card(
    values: dict,
    *,
    method: str,
    config_key: str,
    citation: str,
    model_name: str,
    library_name: str = "transformers",
    base_model: str | None = None,
    dataset: str | None = None,
    eval_results: dict | None = None,
    hyperparameters: dict | None = None,
    repo_id: str | None = None,
    local_path: str | None = None,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """The model card of the baselines (L2-SP, TPGM, T1–T2): their `config.<config_key>` entry as a
    table, the evaluation results, the training settings and the method's citation."""
    method_tag = config_key.replace("t1t2", "t1-t2").replace("l2sp", "l2-sp")
    card_data = _card_data(model_name, library_name, base_model, dataset,
                           ["image-classification", method_tag, *(extra_tags or [])])
    return ModelCard.from_template(
        card_data,
        template_path=str(METHOD_TEMPLATE_PATH),
        model_name=model_name,
        base_model=card_data.base_model,
        dataset=dataset,
        method=method,
        config_key=config_key,
        values={k: _card_value(v) for k, v in values.items() if k != "format_version"},
        eval_results=eval_results or {},
        hyperparameters=hyperparameters or {},
        usage=_usage(library_name, repo_id, local_path or model_name, config_key, f"the {method} hyperparameters"),
        citation=citation.strip(),
    )
