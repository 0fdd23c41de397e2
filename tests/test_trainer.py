"""DEELBoTrainer end to end with the real Trainer, on tiny models built from configs."""

import copy
import json
import math

import pytest
import torch
from conftest import NUM_LABELS, build_model, image_dataset, text_dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments

from hf_deelbo import DEELBoCallback, DEELBoTrainer, detect_head_modules, split_parameters

HEADS = [
    "vit",
    "deit",
    "deit_distilled",
    "beit",
    "swin",
    "convnext",
    "resnet",
    "bert",
    "timm_wrapper",
    "timm",
    "timm_vit",
]


@pytest.mark.parametrize("kind", HEADS)
def test_head_detection(kind):
    model, expected = build_model(kind)
    assert detect_head_modules(model) == expected
    groups = split_parameters(model)
    assert groups.head and groups.backbone
    assert all(any(n == h or n.startswith(h + ".") for h in expected) for n in groups.head)
    assert not any(any(n.startswith(h + ".") for h in expected) for n in groups.backbone)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(groups.backbone + groups.head) == sorted(trainable)


def test_frozen_parameters_are_not_counted(make_args):
    model, _ = build_model("vit")
    model.vit.embeddings.patch_embeddings.requires_grad_(False)
    trainer = DEELBoTrainer(model=model, args=make_args(), train_dataset=image_dataset(8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainer.posterior.num_params == trainable < sum(p.numel() for p in model.parameters())
    assert trainer.kappa == pytest.approx(trainable / 8)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TRAINABLE_KINDS = ["vit", "convnext", "resnet", "swin", "timm_wrapper", "timm"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", TRAINABLE_KINDS)
def test_trains_and_saves(kind, bf16, make_args, tmp_path):
    model, _ = build_model(kind)
    before = _state(model)
    args = make_args(bf16=bf16, max_steps=3, logging_steps=1)
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(12), eval_dataset=image_dataset(8, 1))
    trainer.train()
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no parameter changed during training"
    for key in ("lambda", "tau", "sigma", "kl", "nll"):
        values = [entry[key] for entry in trainer.state.log_history if key in entry]
        assert len(values) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in values), key
    assert trainer.posterior.rho.dtype == torch.float32
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    config = json.loads((out / "config.json").read_text())
    deelbo = config["deelbo"]
    assert deelbo["lambda"] == trainer.deelbo_callback.backbone_prior_variance
    assert deelbo["num_train_examples"] == 12
    weights = load_file(str(out / "model.safetensors"))
    assert not any("rho" in k for k in weights)
    # save_model writes the model card and its plot next to the weights, and the card's
    # "How to use" loads this directory (it is not on the Hub)
    card = (out / "README.md").read_text()
    assert f"{deelbo['lambda']:.4g}" in card and (out / "deelbo_hyperparameters.png").is_file()
    usage = card.split("## How to use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert str(out) in usage and "hf-hub:" not in usage
    namespace = {}
    exec(usage, namespace)
    assert isinstance(namespace["model"], torch.nn.Module)
    if kind == "timm":
        import timm

        reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
        torch.testing.assert_close(reloaded.state_dict(), model.state_dict())
    else:
        reloaded = AutoModelForImageClassification.from_pretrained(str(out))
        assert reloaded.config.deelbo == deelbo
        for k, v in model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[k], v)


def test_config_lambda_tau_recomputed_from_saved_model(make_args, tmp_path):
    model, _ = build_model("vit")
    pretrained = _state(model)
    dataset = image_dataset(12)
    trainer = DEELBoTrainer(model=model, args=make_args(max_steps=5, learning_rate=0.05), train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    deelbo = json.loads((tmp_path / "saved" / "config.json").read_text())["deelbo"]
    # Loaded the way users load it (the file itself may use transformers' legacy key names).
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    saved = {k: v.detach() for k, v in reloaded.named_parameters()}
    head = [k for k in saved if k.startswith("classifier.")]
    backbone = [k for k in saved if k not in head]
    d_b = sum(saved[k].numel() for k in backbone)
    k_head = sum(saved[k].numel() for k in head)
    sigma2 = deelbo["sigma"] ** 2
    lam = sum(((saved[k].double() - pretrained[k].double()) ** 2).sum().item() for k in backbone) / d_b + sigma2
    tau = sum((saved[k].double() ** 2).sum().item() for k in head) / k_head + sigma2
    assert deelbo["lambda"] == pytest.approx(lam, rel=1e-6)
    assert deelbo["tau"] == pytest.approx(tau, rel=1e-6)
    assert lam > 10 * sigma2  # the backbone moved, so the check sees ‖m_b − μ‖²
    assert deelbo["num_backbone_params"] == d_b and deelbo["num_head_params"] == k_head
    assert deelbo["kappa"] == pytest.approx((d_b + k_head) / 12)
    assert deelbo["sigma"] == pytest.approx(torch.nn.functional.softplus(trainer.posterior.rho).item(), rel=1e-6)
    assert deelbo["alpha_eff"] == pytest.approx(1 / ((d_b + k_head) * lam), rel=1e-6)


def _first_update(kind, make_args, batch, accumulation):
    model, _ = build_model(kind)
    before = _state(model)
    args = make_args(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        sigma_init=1e-12,
        logging_steps=1,
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(8))
    trainer.train()
    update = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
    return trainer.state.log_history[0]["loss"], update


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_gradient_accumulation_matches_one_big_batch(kind, make_args):
    loss_big, update_big = _first_update(kind, make_args, batch=8, accumulation=1)
    loss_acc, update_acc = _first_update(kind, make_args, batch=2, accumulation=4)
    if kind == "vit":
        assert loss_acc == pytest.approx(loss_big, rel=1e-5)
        torch.testing.assert_close(update_acc, update_big, rtol=1e-4, atol=1e-6)
    else:
        # BatchNorm normalises micro-batches of 2 differently from a batch of 8, so the two runs
        # are not the same function; the scale must still agree (×4 is the bug this catches).
        assert loss_acc == pytest.approx(loss_big, rel=0.05)
        assert 0.75 < update_acc.norm() / update_big.norm() < 1.33


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_no_noise_and_no_prior_equals_plain_trainer(kind, make_args, tmp_path):
    """σ → 0 and κ → ∞ remove everything DE ELBO adds: one step must equal Trainer's."""
    model, _ = build_model(kind)
    plain_model = copy.deepcopy(model)
    dataset = image_dataset(8)
    common = dict(
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    plain = Trainer(
        model=plain_model, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **common), train_dataset=dataset
    )
    plain.train()
    # σ = 1e-12 is below float32 resolution of the weights, so w̃ = m up to rounding.
    ours = DEELBoTrainer(model=model, args=make_args(sigma_init=1e-12, kappa=1e20, **common), train_dataset=dataset)
    ours.train()
    assert ours.state.log_history[0]["loss"] == pytest.approx(plain.state.log_history[0]["loss"], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)


def test_logged_metrics_reach_callbacks_and_are_window_averages(make_args):
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    model, _ = build_model("resnet")
    trainer = DEELBoTrainer(
        model=model,
        args=make_args(max_steps=4, logging_steps=2),
        train_dataset=image_dataset(16),
        callbacks=[Recorder()],
    )
    recorded = []
    original = trainer.compute_loss

    def spy(*args, **kwargs):
        callback = trainer.deelbo_callback
        recorded.append((callback.backbone_prior_variance, callback.head_prior_variance))
        return original(*args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    train_logs = [entry for entry in seen if "loss" in entry]
    assert len(train_logs) == 2
    assert {"lambda", "tau", "sigma", "kl", "nll"} <= set(train_logs[0]) and {"lambda", "tau"} <= set(train_logs[1])
    assert {"kappa", "num_backbone_params", "num_head_params", "num_train_examples"} <= set(train_logs[0])
    assert "kappa" not in train_logs[1]
    for entry, window in zip(train_logs, (recorded[:2], recorded[2:]), strict=False):
        assert entry["lambda"] == pytest.approx(sum(v[0] for v in window) / 2, rel=1e-9)
        assert entry["tau"] == pytest.approx(sum(v[1] for v in window) / 2, rel=1e-9)
    # λ changes every step (closed-form update after each optimizer step)
    assert len({v[0] for v in recorded}) == 4


def test_callback_state_survives_checkpoint(make_args, tmp_path):
    model, _ = build_model("resnet")
    args = make_args(max_steps=4, save_strategy="steps", save_steps=4)
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(16))
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["DEELBoCallback"]["attributes"]
    assert saved["backbone_prior_variance"] == trainer.deelbo_callback.backbone_prior_variance
    assert saved["posterior_rho"] == trainer.posterior.rho.item()
    assert json.loads((checkpoint / "config.json").read_text())["deelbo"]["lambda"] == saved["backbone_prior_variance"]

    fresh_model, _ = build_model("resnet", seed=1)
    resumed = DEELBoTrainer(model=fresh_model, args=args, train_dataset=image_dataset(16))
    old_callback = resumed.deelbo_callback
    resumed.train(resume_from_checkpoint=str(checkpoint))
    callback = resumed.deelbo_callback
    assert callback is not old_callback and isinstance(callback, DEELBoCallback)
    assert callback.posterior is resumed.posterior
    assert resumed.posterior.rho.item() == saved["posterior_rho"]
    assert callback.backbone_prior_variance == saved["backbone_prior_variance"]
    assert callback.head_prior_variance == saved["head_prior_variance"]


def test_evaluation_at_posterior_mean_and_bma(make_args):
    model, _ = build_model("resnet")
    eval_set = image_dataset(8, seed=3)
    trainer = DEELBoTrainer(
        model=model, args=make_args(sigma_init=0.05), train_dataset=image_dataset(8), eval_dataset=eval_set
    )
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=eval_set[:]["pixel_values"]).logits
    expected_nll = torch.nn.functional.cross_entropy(logits, eval_set[:]["labels"]).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected_nll, rel=1e-5)
    mean_predictions = trainer.predict(eval_set).predictions

    def bma_gap(sigma):
        trainer.args.bma_samples = 4
        trainer.posterior.rho.data.fill_(math.log(math.expm1(sigma)))
        output = trainer.predict(eval_set)
        assert output.predictions.shape == (8, NUM_LABELS)
        probabilities = torch.tensor(output.predictions).exp()
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(8, dtype=probabilities.dtype))
        return (probabilities - torch.tensor(mean_predictions).softmax(-1)).abs().max().item()

    large, small = bma_gap(0.05), bma_gap(1e-5)
    assert large > 1e-3 and small < large / 100
    assert trainer.predict(eval_set).predictions.tolist() == trainer.predict(eval_set).predictions.tolist()


def test_text_classifier_trains(make_args):
    model, _ = build_model("bert")
    trainer = DEELBoTrainer(model=model, args=make_args(max_steps=2), train_dataset=text_dataset(8))
    trainer.train()
    assert model.config.deelbo["num_head_params"] == sum(p.numel() for p in model.classifier.parameters())


def test_predictions_at_the_posterior_mean_are_the_model_logits(make_args):
    model, _ = build_model("vit")
    data = image_dataset(8, seed=2)
    trainer = DEELBoTrainer(model=model, args=make_args(), train_dataset=image_dataset(8))
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=data[:]["pixel_values"]).logits
    torch.testing.assert_close(torch.tensor(trainer.predict(data).predictions), logits, rtol=1e-5, atol=1e-6)
