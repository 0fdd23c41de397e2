"""T1–T2: the hypergradient against finite differences of the look-ahead validation loss
(float64), the strengths' projection at 0, and the strengths in the config."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, build_model, image_dataset
from datasets import Dataset
from torch.func import functional_call
from transformers import TrainerCallback

from hf_deelbo import T1T2Trainer, T1T2TrainingArguments
from hf_deelbo.methods.t1t2 import t1t2_hypergradient


def _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths):
    """C_val(θ − η ∇[C_train(θ) + Ω(θ; s)]) written out with plain autograd (s: one strength per tensor)."""
    params = dict(model.named_parameters())
    names = list(params)
    train_loss = F.cross_entropy(functional_call(model, params, (train[0],)), train[1])
    grads = torch.autograd.grad(train_loss, [params[n] for n in names], create_graph=False)
    stepped = {}
    for i, (name, grad) in enumerate(zip(names, grads, strict=False)):
        anchor = torch.zeros_like(params[name]) if name in head_names else pretrained[name]
        regularizer_grad = strengths[i] * (params[name].detach() - anchor)
        stepped[name] = params[name].detach() - lr * (grad + regularizer_grad)
    return F.cross_entropy(functional_call(model, stepped, (validation[0],)), validation[1]), stepped


def test_hypergradient_matches_finite_differences_of_the_look_ahead_loss():
    torch.manual_seed(0)
    model = TinyNet().double()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    names = [n for n, _ in model.named_parameters()]
    head_names = {n for n in names if n.startswith("head.")}
    train = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    validation = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))
    lr = 0.3
    strengths = torch.tensor([0.01, 0.2, 0.05, 0.0, 0.1, 0.03], dtype=torch.float64)  # one per tensor

    _, stepped = _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths)
    stepped = {n: t.requires_grad_(True) for n, t in stepped.items()}
    validation_loss = F.cross_entropy(functional_call(model, stepped, (validation[0],)), validation[1])
    validation_grads = torch.autograd.grad(validation_loss, [stepped[n] for n in names])
    displacements = [p.detach() - (0 if n in head_names else pretrained[n]) for n, p in model.named_parameters()]
    ours = t1t2_hypergradient(list(validation_grads), displacements, lr)

    step = 1e-6
    for i in range(len(names)):
        shift = torch.zeros_like(strengths)
        shift[i] = step
        up, _ = _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths + shift)
        down, _ = _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths - shift)
        numeric = float((up - down) / (2 * step))
        assert float(ours[i]) == pytest.approx(numeric, rel=1e-6, abs=1e-10), names[i]
    assert ours.abs().min() > 0
    # one shared α (backbone) and β (head): the hypergradient is the sum over their tensors
    backbone = [i for i, n in enumerate(names) if n not in head_names]
    shift = torch.zeros_like(strengths)
    shift[backbone] = step
    up, _ = _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths + shift)
    down, _ = _look_ahead_validation_loss(model, pretrained, head_names, train, validation, lr, strengths - shift)
    assert float(ours[backbone].sum()) == pytest.approx(float((up - down) / (2 * step)), rel=1e-6)


def _vector_dataset(num_examples, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_examples, 3, 2, 1, generator=generator, dtype=dtype)  # tiny images, 6 numbers
    y = torch.randint(0, 3, (num_examples,), generator=generator)

    def as_float64(batch):  # datasets' torch format would give float32
        return {
            "pixel_values": torch.tensor(batch["pixel_values"], dtype=torch.float64),
            "labels": torch.tensor(batch["labels"]),
        }

    return Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_transform(as_float64)


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=4,
        learning_rate=0.2,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        head_modules=["head"],
        alpha=0.05,
        beta=0.02,
        hyper_steps=2,
        remove_unused_columns=False,
    )
    values.update(overrides)
    return T1T2TrainingArguments(**values)


class _Recorder(TrainerCallback):
    def __init__(self):
        self.weights, self.strengths = {}, []
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.strengths.append((self.trainer.backbone_strengths.clone(), self.trainer.head_strengths.clone()))


@pytest.mark.parametrize("per_layer", [False, True])
def test_trainer_steps_the_strengths_by_the_look_ahead_hypergradient(per_layer, tmp_path):
    """Plain SGD, no clipping, full batches: the trainer's real step is the look-ahead step, so its
    hypergradient must equal the finite difference of the validation loss after that step."""
    torch.manual_seed(0)
    model = TinyNet().double()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, validation = _vector_dataset(8, 0), _vector_dataset(6, 1)
    recorder = _Recorder()
    trainer = T1T2Trainer(
        model=model,
        args=_args(tmp_path, per_layer_strengths=per_layer),
        train_dataset=train,
        eval_dataset=validation,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()

    # step 4 is a hyper-step; the weights it started from are those after step 3
    reference = TinyNet().double()
    reference.load_state_dict(recorder.weights[3])
    names = [n for n, _ in reference.named_parameters()]
    head_names = {"head.weight", "head.bias"}
    alpha_before, beta_before = recorder.strengths[2]  # after step 3 (the hyper-step at 2 already applied)
    per_tensor = torch.tensor(
        [float(beta_before[0] if n in head_names else alpha_before[0]) for n in names]
        if not per_layer
        else alpha_before.tolist() + beta_before.tolist(),
        dtype=torch.float64,
    )
    batch_train = (train[:]["pixel_values"], train[:]["labels"])
    batch_validation = (validation[:]["pixel_values"], validation[:]["labels"])
    step = 1e-6
    groups = (
        [[i] for i in range(len(names))]
        if per_layer
        else [
            [i for i, n in enumerate(names) if n not in head_names],
            [i for i, n in enumerate(names) if n in head_names],
        ]
    )
    numeric = []
    for group in groups:
        shift = torch.zeros_like(per_tensor)
        shift[group] = step
        up, _ = _look_ahead_validation_loss(
            reference, pretrained, head_names, batch_train, batch_validation, 0.2, per_tensor + shift
        )
        down, _ = _look_ahead_validation_loss(
            reference, pretrained, head_names, batch_train, batch_validation, 0.2, per_tensor - shift
        )
        numeric.append(float((up - down) / (2 * step)))
    backbone, head = trainer.last_hypergradient
    ours = torch.cat([backbone, head]).tolist()
    # the training loss passes through float32 logits, so agreement is to float32 precision
    assert ours == pytest.approx(numeric, rel=2e-4, abs=1e-7)
    # and the strengths moved by −hyper_learning_rate × that hypergradient
    alpha_after, beta_after = recorder.strengths[3]
    torch.testing.assert_close(alpha_after, (alpha_before - backbone).clamp(min=0))
    torch.testing.assert_close(beta_after, (beta_before - head).clamp(min=0))
    assert not torch.equal(alpha_after, alpha_before)


def test_strengths_never_go_negative(tmp_path):
    model, _ = build_model("resnet")
    recorder = _Recorder()
    args = _args(
        tmp_path,
        head_modules=None,
        hyper_steps=1,
        hyper_learning_rate=1e4,
        per_layer_strengths=True,
        max_steps=6,
        learning_rate=0.01,
        alpha=1e-3,
        beta=1e-3,
        remove_unused_columns=True,
    )
    trainer = T1T2Trainer(
        model=model,
        args=args,
        train_dataset=image_dataset(16),
        eval_dataset=image_dataset(16, seed=1),
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    backbone = torch.stack([s[0] for s in recorder.strengths])
    head = torch.stack([s[1] for s in recorder.strengths])
    assert (backbone >= 0).all() and (head >= 0).all()
    assert (backbone == 0).any() and (backbone > 1e-3).any()  # pushed both ways: the projection at 0 was needed
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all({"nll", "penalty", "alpha", "beta", "hyper_seconds"} <= set(e) for e in logs)


def test_strengths_in_the_config_and_callback_state(tmp_path):
    model, _ = build_model("timm")
    args = _args(
        tmp_path,
        head_modules=None,
        remove_unused_columns=True,
        save_strategy="steps",
        save_steps=4,
        per_layer_strengths=True,
        validation_fraction=0.25,
    )
    trainer = T1T2Trainer(model=model, args=args, train_dataset=image_dataset(24))
    assert len(trainer.train_dataset) == 18 and len(trainer.validation_dataset) == 6
    trainer.train()
    entry = json.loads((tmp_path / "out" / "checkpoint-4" / "config.json").read_text())["t1t2"]
    assert entry["alpha"] == dict(
        zip(trainer.anchor.backbone_names, trainer.backbone_strengths.tolist(), strict=False)
    )
    assert entry["beta"] == dict(zip(trainer.anchor.head_names, trainer.head_strengths.tolist(), strict=False))
    assert entry["head_modules"] == ["fc"] and entry["per_layer_strengths"] is True
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["T1T2Callback"]["attributes"]
    assert saved["backbone_strengths"] == trainer.backbone_strengths.tolist()

    resumed = T1T2Trainer(model=copy.deepcopy(model), args=args, train_dataset=image_dataset(24))
    resumed.t1t2_callback.bind(resumed)
    resumed._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-4"))
    resumed.state = type(trainer.state).load_from_json(str(tmp_path / "out" / "checkpoint-4" / "trainer_state.json"))
    resumed._load_callback_state()
    assert resumed.backbone_strengths.tolist() == saved["backbone_strengths"]

    with pytest.raises(ValueError, match="hyper_steps must be an int >= 1; got 0"):
        _args(tmp_path, hyper_steps=0)
    with pytest.raises(ValueError, match="hyper_learning_rate must be a finite number > 0; got -1"):
        _args(tmp_path, hyper_learning_rate=-1.0)
