"""The model card: a template (`model_card_template.md`) plus the run's data."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"
TAGS = ["deelbo", "image-classification", "l2-sp", "variational-inference"]


def _usage(library_name: str, repo_id: str) -> str:
    if library_name == "timm":
        return f'import timm\n\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True)'
    return (
        "from transformers import AutoModelForImageClassification\n\n"
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")\n'
        'print(model.config.deelbo)  # learned λ, τ, σ, κ'
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
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` with the DE ELBO section (λ, τ, σ, κ, N, D_b, K, α_eff, β_eff),
    the evaluation results, the training settings and the method's citation. Tagged `deelbo`."""
    card_data = ModelCardData(
        library_name=library_name,
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        datasets=[dataset] if dataset and not os.path.isdir(dataset) else None,
        tags=sorted(set(TAGS + (extra_tags or []))),
        pipeline_tag="image-classification",
        model_name=model_name,
    )
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
        usage=_usage(library_name, repo_id or model_name),
    )
