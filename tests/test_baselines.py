"""The benchmark's Bayesian baselines (benchmarks/_baselines.py): Laplace LA-LML's marginal
likelihood against its closed form, its online hyper-updates, IVON through Trainer, both procedures."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LABELS, TinyNet, build_model
from datasets import Dataset

from benchmarks import _baselines
from hf_deelbo import L2SPTrainer, L2SPTrainingArguments
from hf_deelbo.core.anchor import PretrainedAnchor
from hf_deelbo.core.groups import split_parameters


def _vector_dataset(num_examples: int = 12, seed: int = 0, num_classes: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(num_examples, 3, 1, 2, generator=generator).numpy(),  # TinyNet flattens to 6
            "labels": torch.randint(0, num_classes, (num_examples,), generator=generator).numpy(),
        }
    ).with_format("torch")


def _image_dataset(num_examples: int = 16, seed: int = 0, image_size: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(num_examples, 3, image_size, image_size, generator=generator).numpy(),
            "labels": torch.randint(0, NUM_LABELS, (num_examples,), generator=generator).numpy(),
        }
    ).with_format("torch")


def _common(steps: int, **overrides) -> dict:
    values = dict(
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        optim="sgd",
        optim_args="momentum=0.9,nesterov=True",
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        logging_steps=10**6,
        dataloader_pin_memory=False,
    )
    values.update(overrides)
    return values


def _closed_form_log_marglik(model, prior_mean, precision, dataset):
    """log p(D|θ) − ½ Σ δ_i(θ_i − μ_i)² + ½ Σ log δ_i − ½ Σ log(δ_i + H_ii), H_ii the diagonal
    empirical Fisher, from per-example autograd gradients."""
    batch = dataset[:]
    parameters = [p for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().flatten() for p in parameters])
    log_likelihood, fisher = 0.0, torch.zeros_like(theta)
    for x, y in zip(batch["pixel_values"], batch["labels"], strict=True):
        log_p = -F.cross_entropy(model(x[None].to(theta.dtype)), y[None], reduction="sum")
        grads = torch.autograd.grad(log_p, parameters)
        fisher += torch.cat([g.flatten() for g in grads]).square()
        log_likelihood += log_p.item()
    return (
        log_likelihood
        - 0.5 * (precision * (theta - prior_mean).square()).sum()
        + 0.5 * precision.log().sum()
        - 0.5 * (precision + fisher).log().sum()
    ).item()


def test_laplace_log_marginal_likelihood_is_centred_at_the_pretrained_weights():
    torch.manual_seed(0)
    model = TinyNet().double()
    anchor = PretrainedAnchor(model, split_parameters(model, ["head"]))
    pretrained = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    with torch.no_grad():  # the MAP weights: away from μ, the head away from 0
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    dataset = _vector_dataset()
    data = dataset[:]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["pixel_values"].double(), data["labels"]), batch_size=5
    )
    prior_precisions = torch.tensor([3.0, 0.5], dtype=torch.float64)
    la = _baselines.fit_laplace(model, anchor, loader, prior_precisions)

    head = torch.zeros_like(pretrained, dtype=torch.bool)
    head[-15:] = True  # TinyNet's head: Linear(4, 3), the last 15 numbers
    prior_mean = torch.where(head, torch.zeros_like(pretrained), pretrained)
    precision = torch.where(head, prior_precisions[1], prior_precisions[0])
    expected = _closed_form_log_marglik(model, prior_mean, precision, dataset)
    assert la.log_marginal_likelihood().item() == pytest.approx(expected, rel=1e-10)
    # The prior mean matters: centred at 0 everywhere (laplace-torch's default) is another number.
    at_zero = _closed_form_log_marglik(model, torch.zeros_like(pretrained), precision, dataset)
    assert abs(at_zero - expected) > 1.0
    assert torch.equal(la.groups, head.long())


@pytest.mark.parametrize("max_steps, frequency, burnin", [(12, 3, 3), (13, 3, 3), (10, None, None)])
def test_online_marglik_updates_the_strengths_on_its_schedule(tmp_path, max_steps, frequency, burnin):
    torch.manual_seed(0)
    dataset = _vector_dataset(num_examples=12)
    args = L2SPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        alpha=1e-4,
        beta=1e-4,
        learning_rate=0.05,
        head_modules=["head"],
        **_common(max_steps, max_grad_norm=0.0),
    )
    trainer = _baselines.MarglikL2SPTrainer(
        model=TinyNet(),
        args=args,
        train_dataset=dataset,
        marglik_kwargs={"marglik_frequency": frequency, "num_burnin_steps": burnin, "num_hypersteps": 20},
    )
    trainer.train()
    history = trainer.marglik.history
    frequency, burnin = _baselines.OnlineMarglikCallback.schedule(max_steps, frequency, burnin)
    expected_steps = sorted(
        {s for s in range(burnin + 1, max_steps + 1) if (s - burnin) % frequency == 0} | {max_steps}
    )
    assert [h["step"] for h in history] == expected_steps
    assert len(history) == _baselines.OnlineMarglikCallback.num_updates(max_steps, frequency, burnin)
    # Written where L2SPTrainer reads them: its penalty uses the learned strengths.
    assert trainer.args.alpha == pytest.approx(history[-1]["backbone_prior_precision"] / 12)
    assert trainer.args.beta == pytest.approx(history[-1]["head_prior_precision"] / 12)
    assert trainer.args.alpha != 1e-4 and trainer.args.beta != 1e-4
    distances = trainer.anchor.squared_distances()
    expected_penalty = 0.5 * trainer.args.alpha * distances[0] + 0.5 * trainer.args.beta * distances[1]
    assert trainer.penalty().item() == pytest.approx(expected_penalty.item())
    assert all(math.isfinite(h["log_marginal_likelihood"]) for h in history)


def test_default_schedule_gives_seven_updates_over_200_steps():
    frequency, burnin = _baselines.OnlineMarglikCallback.schedule(200)
    assert (frequency, burnin) == (25, 25)
    assert _baselines.OnlineMarglikCallback.num_updates(200, frequency, burnin) == 7


@pytest.mark.parametrize("kind", ["timm", "vit"])
def test_laplace_fits_batchnorm_and_vit_models(kind):
    model, head = build_model(kind)
    model.train()
    anchor = PretrainedAnchor(model, split_parameters(model, head))
    loader = _baselines.pixel_loader(_image_dataset(8, image_size=32), batch_size=4)
    la = _baselines.fit_laplace(model, anchor, loader, torch.tensor([1.0, 1.0]))
    assert model.training  # restored after laplace-torch's eval-mode fit
    assert la.H.shape == (anchor.num_params,) and torch.isfinite(la.H).all() and (la.H > 0).any()
    assert math.isfinite(la.log_marginal_likelihood().item())


def test_ivon_trains_and_reads_gradients_inside_its_context(tmp_path):
    model, _ = build_model("timm")
    before = [p.detach().clone() for p in model.parameters()]
    dataset = _image_dataset(16, image_size=32)
    args = L2SPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        alpha=0.0,
        beta=0.0,
        learning_rate=0.1,
        **_common(4, max_grad_norm=0.0, logging_steps=1),
    )
    trainer = _baselines.IVONTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert type(trainer.ivon).__name__ == "IVON" and trainer.ivon.current_step == 4
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(trainer.evaluate(dataset)["eval_loss"])


def test_ivon_refuses_trainer_clipping(tmp_path):
    args = L2SPTrainingArguments(output_dir=str(tmp_path / "out"), alpha=0.0, beta=0.0, **_common(1))
    with pytest.raises(ValueError, match="max_grad_norm must be 0 for IVONTrainer"):
        _baselines.IVONTrainer(model=build_model("timm")[0], args=args, train_dataset=_image_dataset(8, image_size=32))


def test_ivon_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Each micro-batch is one IVON sample of its mean gradient: on 8 copies of one example (every
    batch has the same gradient), with negligible noise (ess 1e12) and the Hessian estimate frozen
    (beta2 = 1, so the noise draws cannot reach it), GA = 2 equals GA = 1."""
    one = _vector_dataset(num_examples=1)[:]
    dataset = Dataset.from_dict({k: v.repeat(8, *[1] * (v.ndim - 1)).numpy() for k, v in one.items()}).with_format(
        "torch"
    )
    weights = []
    for ga in (1, 2):
        torch.manual_seed(0)
        args = L2SPTrainingArguments(
            output_dir=str(tmp_path / f"ga{ga}"),
            alpha=0.0,
            beta=0.0,
            learning_rate=0.1,
            head_modules=["head"],
            **_common(1, max_grad_norm=0.0, gradient_accumulation_steps=ga, lr_scheduler_type="constant"),
        )
        trainer = _baselines.IVONTrainer(
            model=TinyNet(), args=args, train_dataset=dataset, ivon_settings={"ess": 1e12, "beta2": 1.0}
        )
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in TinyNet().parameters()])
    assert not torch.allclose(weights[0], initial)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def _tiny_init():
    def init():
        model, _ = build_model("timm")
        return model

    return init


@pytest.mark.parametrize("procedure", ["laplace", "ivon"])
def test_procedures_choose_a_finite_run(tmp_path, procedure):
    train = _image_dataset(16, image_size=32)
    common = _common(4)
    # lr 1e6 diverges: it must be recorded with score inf and never chosen.
    run = _baselines.laplace_procedure if procedure == "laplace" else _baselines.ivon_procedure
    trainer, record = run(_tiny_init(), train, common, [1e6, 0.01], str(tmp_path / "work"))
    assert record["learning_rate"] == 0.01 and record["num_runs"] == 2
    assert [r["learning_rate"] for r in record["runs"]] == [1e6, 0.01]
    scores = [r["log_marginal_likelihood" if procedure == "laplace" else "training_loss"] for r in record["runs"]]
    assert not math.isfinite(scores[0]) and math.isfinite(scores[1])
    assert all(r["seconds"] > 0 for r in record["runs"])
    output = trainer.predict(_image_dataset(8, seed=1, image_size=32))
    assert output.predictions.shape == (8, NUM_LABELS)
    if procedure == "laplace":
        assert isinstance(trainer, L2SPTrainer) and record["alpha"] == trainer.args.alpha
        assert record["num_hyper_updates"] == 3  # T = 4: F = 1, B = 1
        assert record["backbone_prior_precision"] == pytest.approx(record["alpha"] * 16)
    else:
        assert record["ivon_ess"] == 16 and record["ivon_weight_decay"] == 1e-4
