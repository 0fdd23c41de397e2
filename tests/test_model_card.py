"""The model card's metadata, as plain Trainer's card has it: the base model when it is a Hub id,
the evaluation results as model-index entries, the method's tags."""

from conftest import build_model, image_dataset
from huggingface_hub import ModelCard

from hf_deelbo import L2SPTrainer, L2SPTrainingArguments


def _trained(tmp_path):
    model, _ = build_model("resnet")
    args = L2SPTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                                 report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = L2SPTrainer(model=model, args=args, train_dataset=image_dataset(8), eval_dataset=image_dataset(8, seed=1))
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
    assert data.base_model is None and data.datasets is None and data.eval_results is None
