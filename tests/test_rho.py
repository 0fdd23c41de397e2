"""ρ (σ = softplus(ρ)) lives outside the model, so Trainer knows nothing of it: it must be in the
optimizer, and in the gradient-norm clipping together with the weights (the paper clips the joint
gradient, ρ included)."""

import math

import pytest
import torch
import transformers
from conftest import TinyNet
from datasets import Dataset

from hf_deelbo import DEELBoTrainer


def _vector_dataset(num_examples: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_examples, 3, 1, 2, generator=generator)
    y = torch.randint(0, 3, (num_examples,), generator=generator)
    return Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def _trainer(make_args, **overrides):
    torch.manual_seed(0)
    model = TinyNet()
    args = make_args(
        **{
            "learning_rate": 1e-3,
            "max_steps": 1,
            "per_device_train_batch_size": 16,
            "lr_scheduler_type": "constant",
            "sigma_init": 0.05,
            "head_modules": ["head"],
            **overrides,
        }
    )
    return DEELBoTrainer(model=model, args=args, train_dataset=_vector_dataset())


def test_rho_is_in_the_optimizer(make_args):
    trainer = _trainer(make_args)
    optimizer = trainer.create_optimizer()
    groups = [group for group in optimizer.param_groups if any(p is trainer.posterior.rho for p in group["params"])]
    assert len(groups) == 1
    before = trainer.posterior.rho.item()
    trainer.train()
    assert trainer.posterior.rho.item() != before  # and the optimizer moved it


def test_gradient_clipping_is_joint_over_the_weights_and_rho(make_args):
    max_grad_norm = 1e-3  # far below the gradient's norm, so the step is clipped
    trainer = _trainer(make_args, optim="sgd", max_grad_norm=max_grad_norm, logging_steps=1)
    model, rho = trainer.model, trainer.posterior.rho
    clipped = {}

    class Gradients(transformers.TrainerCallback):
        # Called after clipping, with the gradients the optimizer steps with.
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clipped["weights"] = [p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None]
            clipped["rho"] = rho.grad.detach().double().clone()

    trainer.add_callback(Gradients())
    trainer.train()
    weights_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in clipped["weights"]))
    joint_norm = math.sqrt(weights_norm**2 + float(clipped["rho"].pow(2).sum()))
    # ρ's gradient was scaled with the weights' (clipping the weights alone would leave their norm at
    # max_grad_norm and ρ's gradient, about 1 here, unclipped)
    assert abs(float(clipped["rho"])) > 0
    assert joint_norm == pytest.approx(max_grad_norm, rel=1e-3)
    assert weights_norm < max_grad_norm * (1 - 1e-3)
    # the norm Trainer logs is that of the joint gradient before clipping, larger than max_grad_norm
    assert trainer.state.log_history[0].get("grad_norm", math.inf) > max_grad_norm
