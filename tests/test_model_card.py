"""The model card's metadata, as plain Trainer's card has it: the base model when it is a Hub id,
the evaluation results as model-index entries, the method's tags."""

import json

import numpy as np
import torch
from conftest import build_model, image_dataset
from huggingface_hub import ModelCard, hf_hub_download

from hf_deelbo import L2SPTrainer, L2SPTrainingArguments


def _trained(tmp_path):
    model, _ = build_model("resnet")
    args = L2SPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = L2SPTrainer(
        model=model, args=args, train_dataset=image_dataset(8), eval_dataset=image_dataset(8, seed=1)
    )
    trainer.train()
    trainer.evaluate()
    return trainer


def test_card_metadata_has_the_base_model_and_model_index_results(tmp_path):
    trainer = _trained(tmp_path)
    trainer.create_model_card(finetuned_from="org/base-model", dataset="org/images")
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model == "org/base-model" and data.datasets == ["org/images"]
    assert {"l2-sp", "image-classification"} <= set(data.tags)
    results = {result.metric_type: result.metric_value for result in data.eval_results}
    assert results["nll"] == trainer.state.log_history[-1]["eval_loss"]
    assert all(result.dataset_type == "org/images" for result in data.eval_results)
    # the training settings plain Trainer's card lists
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- train_batch_size: 4" in card and "- training_steps: 1" in card


def test_local_paths_and_descriptions_stay_out_of_the_metadata(tmp_path):
    trainer = _trained(tmp_path)
    trainer.create_model_card(finetuned_from=str(tmp_path), dataset="digits 5-9 (scikit-learn)")
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert (
        data.base_model is None and data.datasets is None and not data.eval_results
    )  # model-index, as plain Trainer's, without results


def _imagefolder(root):
    """An image folder of 3 digit classes, loaded as transformers' example scripts load one
    (`datasets.load_dataset("imagefolder")`: the builder its cards name), as pixel_values + labels."""
    from datasets import load_dataset
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (0, 1, 2):
        (root / str(label)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:6]):
            Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB").resize((32, 32)).save(
                root / str(label) / f"{i}.png"
            )
    dataset = load_dataset("imagefolder", data_dir=str(root), split="train")

    def to_pixel_values(batch):
        images = torch.stack(
            [torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255 for image in batch["image"]]
        )
        return {"pixel_values": images, "labels": torch.tensor(batch["label"])}

    return dataset.with_transform(to_pixel_values)


def _vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )


def _metadata(path) -> dict:
    return ModelCard.load(path).data.to_dict()


def test_card_has_every_key_plain_trainers_card_has_after_save_and_after_a_push(tmp_path, hub):
    """The same run trained by plain `Trainer` and by `DEELBoTrainer`: every metadata key plain
    Trainer's card writes (library, tags with generated_from_trainer, datasets from the image folder,
    metrics, model-index with the evaluated accuracy) is in ours after `save_model()`, and after a
    push to the Hub with license and language, which ours keeps too; plus our values and the
    framework versions. config.json has problem_type as plain Trainer's model has it."""
    from transformers import Trainer, TrainingArguments

    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, compute_metrics

    data = _imagefolder(tmp_path / "images")
    common = dict(
        max_steps=2,
        per_device_train_batch_size=6,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        learning_rate=0.01,
    )
    plain = Trainer(
        model=_vit(),
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), **common),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=compute_metrics,
    )
    plain.train()
    plain.evaluate()
    plain.save_model()
    plain.create_model_card(license="apache-2.0", language="en")
    plain_metadata = _metadata(tmp_path / "plain" / "README.md")
    assert {"license", "language", "tags", "datasets", "metrics", "model-index"} <= set(plain_metadata)

    ours = DEELBoTrainer(
        model=_vit(),
        args=DEELBoTrainingArguments(output_dir=str(tmp_path / "ours"), **common),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=compute_metrics,
    )
    ours.train()
    ours.evaluate()
    ours.save_model()
    saved = _metadata(tmp_path / "ours" / "README.md")
    missing = set(plain_metadata) - {"license", "language"} - set(saved)
    assert not missing, missing
    assert set(plain_metadata["tags"]) <= set(saved["tags"]) and "deelbo" in saved["tags"]
    assert saved["datasets"] == plain_metadata["datasets"] == ["imagefolder"]
    assert saved["metrics"] == plain_metadata["metrics"] == ["accuracy"]
    results = saved["model-index"][0]["results"][0]
    assert results["dataset"]["type"] == "imagefolder" and results["task"]["type"] == "image-classification"
    assert {m["type"] for m in results["metrics"]} >= {"accuracy"}
    text = (tmp_path / "ours" / "README.md").read_text()
    assert "### Framework versions" in text and "- Transformers " in text and "- hf_deelbo " in text
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["problem_type"] == json.loads((tmp_path / "plain" / "config.json").read_text())["problem_type"]

    ours.args.hub_model_id = "tester/card-parity"
    ours.push_to_hub(license="apache-2.0", language="en")
    pushed = _metadata(hf_hub_download("tester/card-parity", "README.md"))
    missing = set(plain_metadata) - set(pushed)
    assert not missing, missing
    assert pushed["license"] == "apache-2.0" and pushed["language"] == ["en"]
    assert "generated_from_trainer" in pushed["tags"] and pushed["datasets"] == ["imagefolder"]
