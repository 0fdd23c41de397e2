"""Bad arguments fail before any work, with a message naming the argument, the value and the fix."""

import logging
import os

import pytest
import torch
from conftest import build_model, image_dataset
from transformers import HfArgumentParser, TrainingArguments

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments


class _NoLength(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from image_dataset(4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kappa": 0.0}, "kappa must be > 0 or None (None means D/N); got 0.0"),
        ({"kappa": -3.0}, "kappa must be > 0 or None (None means D/N); got -3.0"),
        ({"kappa": float("nan")}, "kappa must be > 0 or None"),
        ({"sigma_init": 0.0}, "sigma_init must be a finite number > 0 (the paper uses 1e-4); got 0.0"),
        ({"sigma_init": -1e-4}, "sigma_init must be a finite number > 0"),
        ({"weight_decay": 0.01}, "weight_decay must be 0 with DEELBoTrainer: the learned prior replaces it; got 0.01"),
        ({"bma_samples": -1}, "bma_samples must be >= 0 (0 predicts with the posterior mean); got -1"),
        ({"num_train_examples": 0}, "num_train_examples must be a positive int or None"),
        ({"head_modules": []}, "head_modules must be None (detect) or a non-empty list of module names"),
        (
            {"prior_variance_grouping": "block"},
            "prior_variance_grouping must be 'backbone' (one λ for the backbone) or 'layer' (one λ_l per backbone tensor); "
            "got 'block'",
        ),
        (
            {"diagonal_sigma_learning_rate": 0.0},
            "diagonal_sigma_learning_rate must be a finite number > 0, or None to train a diagonal ρ in the weights' "
            "optimizer; got 0.0",
        ),
        ({"diagonal_sigma_learning_rate": float("inf")}, "diagonal_sigma_learning_rate must be a finite number > 0"),
        (
            {"posterior_covariance": "full"},
            "posterior_covariance must be 'isotropic' (one σ for every weight) or 'diagonal' (one σ_i per weight); "
            "got 'full'",
        ),
    ],
)
def test_bad_arguments(overrides, message, tmp_path):
    with pytest.raises(ValueError) as error:
        DEELBoTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **overrides)
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "kind, overrides, dataset, message",
    [
        (
            "vit",
            {"head_modules": ["decoder"]},
            "ok",
            "head_modules=['decoder'] (given) matches no trainable parameter",
        ),
        ("vit", {"head_modules": ["vit", "classifier"]}, "ok", "matches every trainable parameter"),
        ("resnet", {}, "no_length", "train_dataset has no length. Set DEELBoTrainingArguments(num_train_examples=N)"),
        ("resnet", {}, "empty", "train_dataset is empty (0 examples)"),
    ],
)
def test_bad_trainer_inputs_fail_before_training(kind, overrides, dataset, message, make_args, tmp_path):
    model, _ = build_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"ok": image_dataset(4), "no_length": _NoLength(), "empty": image_dataset(4).select([])}[dataset]
    with pytest.raises(ValueError) as error:
        DEELBoTrainer(model=model, args=make_args(**overrides), train_dataset=data)
    assert message in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not os.path.exists(tmp_path / "out")


def test_dataset_without_length_works_with_num_train_examples(make_args):
    model, _ = build_model("resnet")
    trainer = DEELBoTrainer(model=model, args=make_args(num_train_examples=4, max_steps=2), train_dataset=_NoLength())
    trainer.train()
    assert model.config.deelbo["num_train_examples"] == 4


def test_undetectable_head_names_the_fix(make_args):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Could not detect the classification head of Sequential. Pass head_modules"):
        DEELBoTrainer(model=model, args=make_args(), train_dataset=image_dataset(4))


def test_plain_training_arguments_are_refused(tmp_path):
    model, _ = build_model("resnet")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(TypeError, match="args must be DEELBoTrainingArguments"):
        DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(4))


def test_enforced_settings(make_args):
    args = make_args(restore_callback_states_from_checkpoint=False)
    assert args.restore_callback_states_from_checkpoint is True


@pytest.mark.parametrize("name", ["DEELBoTrainingArguments", "TPGMTrainingArguments", "T1T2TrainingArguments"])
def test_no_message_about_a_setting_the_user_did_not_make(name, tmp_path, caplog):
    import hf_deelbo

    arguments_class = getattr(hf_deelbo, name)
    with caplog.at_level(logging.DEBUG):
        args = arguments_class(output_dir=str(tmp_path), report_to="none")
    assert args.restore_callback_states_from_checkpoint is True
    assert not [r for r in caplog.records if "restore_callback_states_from_checkpoint" in r.getMessage()]
    with caplog.at_level(logging.DEBUG):
        args = arguments_class(
            output_dir=str(tmp_path), report_to="none", restore_callback_states_from_checkpoint=False
        )
    assert args.restore_callback_states_from_checkpoint is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "restore_callback_states_from_checkpoint=False is overridden" in warnings[0].getMessage()
    )


def test_every_field_is_documented_for_the_command_line():
    parser = HfArgumentParser(DEELBoTrainingArguments)
    help_text = parser.format_help()
    for name in ("--kappa", "--sigma_init", "--head_modules", "--num_train_examples", "--bma_samples"):
        assert name in help_text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--kappa", "2.5", "--head_modules", "head", "fc", "--bma_samples", "3"]
    )
    assert args.kappa == 2.5 and args.head_modules == ["head", "fc"] and args.bma_samples == 3
    for name in ("kappa", "sigma_init", "head_modules", "num_train_examples", "bma_samples"):
        assert f"{name} (`" in DEELBoTrainingArguments.__doc__
