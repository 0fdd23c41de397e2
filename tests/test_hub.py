"""The Hub round trip against the local Hub server (tests/hub_server.py), through the real
huggingface_hub client over HTTP on 127.0.0.1."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download

from hf_deelbo import (
    DEELBoTrainer,
    DEELBoTrainingArguments,
    HubPushError,
    digits,
    load_classifier,
    load_deelbo_config,
    posterior_from_config,
    predictive_log_probs,
)
from hf_deelbo.cli import main

TARGET = (5, 6, 7)


def _target_data():
    train, test = digits.split(digits.digits_dataset(TARGET), 30, seed=0)
    return digits.with_pixel_values(train), digits.with_pixel_values(test)


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        optim="sgd",
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
    )
    values.update(overrides)
    return DEELBoTrainingArguments(**values)


def _pretrained_vit(repo_id):
    """A tiny ViT pretrained on digits 0-4 and pushed, with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    model = digits.pretrain(
        ViTForImageClassification(config),
        digits.split(digits.digits_dataset(digits.SOURCE_CLASSES), 300, 0)[0],
        epochs=2,
    )
    model.push_to_hub(repo_id)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).push_to_hub(repo_id)


def _plain_transformers_predictions(repo_id, pixel_values_file, out_file):
    """Loads the repo in a fresh interpreter that never imports hf_deelbo."""
    code = (
        "import json, sys, numpy as np, torch\n"
        "from transformers import AutoModelForImageClassification\n"
        f"model = AutoModelForImageClassification.from_pretrained({repo_id!r}).eval()\n"
        f"x = torch.from_numpy(np.load({str(pixel_values_file)!r}))\n"
        "with torch.no_grad(): logits = model(pixel_values=x).logits\n"
        f"np.save({str(out_file)!r}, logits.numpy())\n"
        "print(json.dumps(model.config.deelbo))\n"
        "assert 'hf_deelbo' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out_file)


@pytest.mark.slow
def test_transformers_round_trip(hub, tmp_path, capsys):
    _pretrained_vit("tester/vit-digits04")
    model, processor, head = load_classifier(
        "tester/vit-digits04", 3, {0: "5", 1: "6", 2: "7"}, ignore_mismatched_sizes=True
    )
    assert head == ["classifier"] and processor is not None
    train, test = _target_data()
    args = _args(
        tmp_path,
        push_to_hub=True,
        hub_model_id="vit-deelbo",
        save_strategy="steps",
        save_steps=3,
        hub_strategy="every_save",
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    assert trainer.hub_model_id == "tester/vit-deelbo"  # namespace from the logged-in user
    trainer.train()
    trainer.push_to_hub(dataset="digits 5-7")
    learned = trainer.learned_hyperparameters()

    files = set(HfApi().list_repo_files("tester/vit-deelbo"))
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "deelbo_hyperparameters.png",
        "preprocessor_config.json",
    } <= files
    batch = test[:16]
    np.save(tmp_path / "x.npy", batch["pixel_values"].numpy())
    deelbo, logits = _plain_transformers_predictions("tester/vit-deelbo", tmp_path / "x.npy", tmp_path / "y.npy")
    assert deelbo == learned
    ours = trainer.predict(test.select(range(16))).predictions
    np.testing.assert_allclose(logits, ours, rtol=1e-5, atol=1e-5)

    card = open(hf_hub_download("tester/vit-deelbo", "README.md")).read()
    assert "deelbo" in card and f"{learned['lambda']:.4g}" in card and f"{learned['tau']:.4g}" in card
    assert "Learning Hyperparameters via a Data-Emphasized Variational Objective" in card

    # hf-deelbo show on the repo prints the values the run logged after its last step
    capsys.readouterr()
    assert main(["show", "tester/vit-deelbo"]) == 0
    shown = capsys.readouterr().out
    assert f"{learned['lambda']:.6g}" in shown and f"{learned['tau']:.6g}" in shown
    # and the Python API reads the full model's repo as `show` does
    assert load_deelbo_config("tester/vit-deelbo") == learned
    HfApi().create_repo("tester/notes", exist_ok=True)
    HfApi().upload_file(path_or_fileobj=b"not a model", path_in_repo="notes.txt", repo_id="tester/notes")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        load_deelbo_config("tester/notes")


def _pretrained_timm(repo_id):
    import timm
    from timm.models import push_to_hf_hub

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    digits.pretrain(model, digits.split(digits.digits_dataset(digits.SOURCE_CLASSES), 300, 0)[0], epochs=1)
    push_to_hf_hub(model, repo_id, safe_serialization=True)  # timm 1.0.31's own format
    return model


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["transformers", "timm"])
def test_timm_round_trip_both_directions(loader, hub, tmp_path):
    import timm
    from transformers import AutoModelForImageClassification

    source = f"tester/timm-digits04-{loader}"
    _pretrained_timm(source)
    if loader == "transformers":  # timm's repo into TimmWrapperForImageClassification
        model, _, head = load_classifier(source, 3, ignore_mismatched_sizes=True)
        assert head == ["timm_model.fc"]
    else:  # timm's repo as a raw timm model
        model = timm.create_model(f"hf-hub:{source}", pretrained=True)
        model.reset_classifier(3)
    train, test = _target_data()
    trainer = DEELBoTrainer(
        model=model, args=_args(tmp_path, hub_model_id=f"tester/timm-deelbo-{loader}"), train_dataset=train
    )
    trainer.train()
    trainer.push_to_hub()
    learned = trainer.learned_hyperparameters()
    x = test[:8]["pixel_values"]
    ours = torch.tensor(trainer.predict(test.select(range(8))).predictions)

    reloaded_timm = timm.create_model(f"hf-hub:tester/timm-deelbo-{loader}", pretrained=True).eval()
    reloaded_hf = AutoModelForImageClassification.from_pretrained(f"tester/timm-deelbo-{loader}").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded_timm(x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded_hf(pixel_values=x).logits, ours, rtol=1e-5, atol=1e-5)
    assert reloaded_hf.config.deelbo == learned
    config = json.load(open(hf_hub_download(f"tester/timm-deelbo-{loader}", "config.json")))
    assert config["deelbo"] == learned and "num_classes" not in (config.get("model_args") or {})


def test_bma_after_reload_shrinks_with_sigma(hub, tmp_path):
    import conftest
    from transformers import AutoModelForImageClassification

    model, _ = conftest.build_model("vit")
    trainer = DEELBoTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=conftest.image_dataset(8),
    )
    trainer.train()
    trainer.args.hub_model_id = "tester/vit-bma"
    trainer.push_to_hub()
    reloaded = AutoModelForImageClassification.from_pretrained("tester/vit-bma").eval()
    posterior = posterior_from_config(reloaded)
    assert posterior.sigma().item() == pytest.approx(reloaded.config.deelbo["sigma"], rel=1e-6)
    inputs = {"pixel_values": conftest.image_dataset(8, seed=5)[:]["pixel_values"]}
    mean = predictive_log_probs(reloaded, inputs).exp()
    saved = predictive_log_probs(reloaded, inputs, posterior, num_samples=8).exp()
    torch.testing.assert_close(saved.sum(-1), torch.ones(8))
    gaps = []
    for sigma in (1e-1, 1e-2, 1e-3, 1e-4):
        posterior.rho.data.fill_(float(torch.log(torch.expm1(torch.tensor(sigma, dtype=torch.float64)))))
        gaps.append((predictive_log_probs(reloaded, inputs, posterior, num_samples=8).exp() - mean).abs().max().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)) and gaps[-1] < 1e-3 < gaps[0]


def test_card_loads_the_local_directory_until_pushed_then_the_repo(hub, tmp_path):
    import conftest

    model, _ = conftest.build_model("timm")
    trainer = DEELBoTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=conftest.image_dataset(8),
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in (out / "README.md").read_text()
    assert main(["push", str(out), "--repo_id", "tester/pushed-later"]) == 0
    card = open(hf_hub_download("tester/pushed-later", "README.md")).read()
    usage = card.split("## How to use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert 'timm.create_model("hf-hub:tester/pushed-later", pretrained=True)' in usage and str(out) not in card
    namespace = {}
    exec(usage, namespace)  # the snippet loads the pushed model from the Hub
    torch.testing.assert_close(namespace["model"].state_dict(), model.state_dict())


def _snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("failure", ["unreachable", "refusing"])
def test_failed_push_is_one_clear_error_and_a_retry_succeeds(failure, hub, tmp_path):
    import conftest

    model, _ = conftest.build_model("resnet")
    trainer = DEELBoTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4, hub_model_id=f"tester/resnet-{failure}"),
        train_dataset=conftest.image_dataset(8),
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "run"
    before = _snapshot(out)
    if failure == "unreachable":
        hub.stop()
    else:
        hub.state.refuse_writes = 503
    with pytest.raises(HubPushError) as error:
        trainer.push_to_hub()
    message = str(error.value)
    assert "Could not push" in message and "is intact" in message and len(message.splitlines()) == 1
    assert _snapshot(out) == before
    if failure == "unreachable":
        hub.start()
    hub.state.refuse_writes = None
    trainer.push_to_hub()
    assert "model.safetensors" in HfApi().list_repo_files(f"tester/resnet-{failure}")


def test_repo_id_without_namespace_and_no_login(hub, tmp_path, monkeypatch, capsys):
    import conftest

    monkeypatch.delenv("HF_TOKEN")
    model, _ = conftest.build_model("resnet")
    with pytest.raises(HubPushError, match=r"repo id 'lonely-model' has no namespace.*your-namespace/lonely-model"):
        DEELBoTrainer(
            model=model,
            args=_args(tmp_path, push_to_hub=True, hub_model_id="lonely-model"),
            train_dataset=conftest.image_dataset(8),
        )
    assert not (tmp_path / "run").exists()

    out = tmp_path / "done"
    out.mkdir()
    from hf_deelbo.methods.deelbo.config import deelbo_config

    entry = deelbo_config(
        backbone_prior_variance=1.0,
        head_prior_variance=1.0,
        sigma=0.1,
        kappa=10.0,
        num_train_examples=8,
        num_backbone_params=100,
        num_head_params=10,
        head_modules=["fc"],
    )
    (out / "config.json").write_text(json.dumps({"deelbo": entry}))
    assert main(["push", str(out), "--repo_id", "lonely-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no namespace" in err[0]
