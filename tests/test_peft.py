"""PEFT adapters as the regularized weights: LoRA on the tiny ViT, the adapter weights as the
backbone (μ = their values when the trainer is built), the `modules_to_save` copy of the head as
the head, the frozen base weights outside D; saved, pushed and reloaded in peft's adapter format."""

import json
import os
import warnings

import pytest
import torch
from conftest import build_model, image_dataset, training_args

from hf_deelbo import DEELBoTrainer, load_deelbo_config
from hf_deelbo.core.modeling import is_transformers_model
from hf_deelbo.hub import load_config_entry

peft = pytest.importorskip("peft")

ENTRIES_FILE = "hf_deelbo_config.json"


def _lora_vit(seed: int = 0):
    """The tiny ViT (the same "pretrained" weights for every `seed`) with LoRA on its attention's
    query and value projections (transformers 5 names them q_proj, v_proj) and a trainable head copy."""
    model, _ = build_model("vit", seed=seed)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return peft.get_peft_model(model, config)


def _trainer(tmp_path, model=None, **overrides):
    values = dict(max_steps=4, learning_rate=0.05, optim="sgd")
    values.update(overrides)
    return DEELBoTrainer(
        model=model if model is not None else _lora_vit(),
        args=training_args(tmp_path, **values),
        train_dataset=image_dataset(),
    )


def _logits(model, pixel_values):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def test_adapter_weights_are_the_backbone_and_the_head_copy_the_head(tmp_path):
    model = _lora_vit()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    head = [n for n in names if ".classifier.modules_to_save.default." in n]
    assert len(lora) == 4 and len(head) == 2 and sorted(lora + head) == sorted(names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("classifier.original_module" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    trainer = _trainer(tmp_path, model)
    assert is_transformers_model(model)  # called with keyword features, as the ViT it adapts
    assert trainer.groups.backbone == lora
    assert trainer.groups.head == head
    assert trainer.head_modules == ["base_model.model.classifier.modules_to_save.default"]
    params = dict(model.named_parameters())
    num_lora = sum(params[n].numel() for n in lora)
    num_head = sum(params[n].numel() for n in head)
    assert trainer.posterior.num_backbone_params == num_lora and trainer.posterior.num_head_params == num_head
    assert trainer.posterior.num_params == num_lora + num_head
    # LoRA's lora_B starts at 0: μ is the adapter at initialisation, not the base weights.
    assert list(trainer.posterior.prior_mean) == lora
    assert all(torch.equal(mu, before[n]) for n, mu in trainer.posterior.prior_mean.items())

    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items()), "a frozen base weight moved"
    assert all(not torch.equal(after[n], before[n]) for n in lora + head), "an adapter or head weight did not train"
    entry = trainer.learned_hyperparameters()
    assert entry["num_backbone_params"] == num_lora and entry["num_head_params"] == num_head
    for key in ("lambda", "tau", "sigma", "kappa"):
        assert torch.isfinite(torch.tensor(entry[key])) and entry[key] > 0, key


@pytest.mark.parametrize(
    "kind, targets, head",
    [
        ("resnet", ["convolution"], "classifier"),  # transformers' ResNet: its head is `classifier.1` in a Sequential
        ("timm", ["layer1.0.conv1", "layer1.0.conv2"], "fc"),  # a raw timm model: `get_classifier()`
    ],
)
def test_lora_on_convolutions_saves_the_adapter_format(tmp_path, kind, targets, head):
    model, _ = build_model(kind)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, modules_to_save=[head]))
    trainer = _trainer(tmp_path, model, max_steps=2)
    assert trainer.head_modules == [f"base_model.model.{head}.modules_to_save.default"]
    assert all(".lora_" in name for name in trainer.groups.backbone)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"adapter_model.safetensors", "adapter_config.json", ENTRIES_FILE} <= files and "config.json" not in files
    assert load_deelbo_config(str(tmp_path / "saved")) == trainer.learned_hyperparameters()


def test_head_given_by_its_base_model_name(tmp_path):
    trainer = _trainer(tmp_path, head_modules=["classifier"])
    assert trainer.head_modules == ["base_model.model.classifier.modules_to_save.default"]


def test_head_outside_modules_to_save_is_refused_with_the_fix(tmp_path):
    model, _ = build_model("vit")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\]"):
        _trainer(tmp_path, model)


def test_round_trip_through_plain_peft(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    files = set(os.listdir(saved))
    assert {"adapter_model.safetensors", "adapter_config.json", ENTRIES_FILE, "README.md"} <= files
    assert "config.json" not in files and "model.safetensors" not in files

    pixel_values = image_dataset(8, seed=1)[:]["pixel_values"]
    expected = _logits(trainer.model, pixel_values)
    base, _ = build_model("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns about keys of adapter_config.json it drops
        reloaded = peft.PeftModel.from_pretrained(base, str(saved))
    torch.testing.assert_close(_logits(reloaded, pixel_values), expected, atol=1e-6, rtol=0)

    learned = trainer.learned_hyperparameters()
    assert load_deelbo_config(str(saved)) == learned
    assert load_config_entry(str(saved), "deelbo") == learned
    with open(saved / ENTRIES_FILE) as f:  # what a user opens
        assert json.load(f) == {"deelbo": learned}
    card = (saved / "README.md").read_text()
    assert "library_name: peft" in card and ENTRIES_FILE in card and "PeftModel.from_pretrained" in card
    assert f"{learned['lambda']:.4g}" in card and f"{learned['tau']:.4g}" in card


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    args = dict(save_strategy="steps", save_steps=2, max_steps=4)
    full = _trainer(tmp_path, **args)
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert "adapter_model.safetensors" in os.listdir(checkpoint) and ENTRIES_FILE in os.listdir(checkpoint)

    resumed_model = _lora_vit()
    resumed = _trainer(tmp_path, resumed_model, **args)
    mu = {n: p.clone() for n, p in resumed.posterior.prior_mean.items()}
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(full.model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(full.posterior.rho, resumed.posterior.rho)
    assert full.learned_hyperparameters() == resumed.learned_hyperparameters()
    # μ is still the adapter at initialisation, not the checkpoint's weights.
    assert all(torch.equal(mu[n], p) for n, p in resumed.posterior.prior_mean.items())


def test_resume_restores_the_checkpoint_weights_in_place(tmp_path):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    model = _lora_vit()
    fresh = _trainer(tmp_path, model, save_strategy="steps", save_steps=2, max_steps=2)
    tensors = list(model.parameters())
    fresh._load_from_checkpoint(checkpoint)
    assert all(a is b for a, b in zip(tensors, model.parameters(), strict=True)), "the parameters were replaced"
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    # peft's load_adapter (Trainer's way) only warns about missing keys and resumes with fresh ones.
    model, _ = build_model("vit")
    query_only = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"])
    )
    _trainer(tmp_path / "a", query_only, save_strategy="steps", save_steps=2, max_steps=2).train()
    resumed = _trainer(tmp_path / "b", save_strategy="steps", save_steps=2, max_steps=4)
    with pytest.raises(ValueError, match=r"does not hold the adapter 'default'.*missing \[.*v_proj\.lora_A"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


@pytest.mark.slow
def test_push_and_reload_from_the_hub(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    trainer = _trainer(tmp_path, push_to_hub=True, hub_model_id="lora-vit-deelbo")
    trainer.train()
    trainer.push_to_hub()
    repo_id = trainer.hub_model_id
    for name in ("adapter_model.safetensors", "adapter_config.json", ENTRIES_FILE, "README.md"):
        hf_hub_download(repo_id, name)  # raises if missing
    pixel_values = image_dataset(8, seed=1)[:]["pixel_values"]
    base, _ = build_model("vit")
    reloaded = peft.PeftModel.from_pretrained(base, repo_id)
    torch.testing.assert_close(
        _logits(reloaded, pixel_values), _logits(trainer.model, pixel_values), atol=1e-6, rtol=0
    )
    assert load_deelbo_config(repo_id) == trainer.learned_hyperparameters()
    card = open(hf_hub_download(repo_id, "README.md")).read()
    assert f'PeftModel.from_pretrained(base_model, "{repo_id}")' in card
