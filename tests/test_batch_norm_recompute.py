"""`recompute_batch_norm`: BatchNorm running statistics recomputed at the posterior mean after
training, checked against `torch.optim.swa_utils.update_bn` (an independent implementation)."""

import copy

import pytest
import torch
from conftest import build_model, image_dataset
from torch.optim.swa_utils import update_bn

from hf_deelbo import DEELBoTrainer
from hf_deelbo.core.modeling import batch_norm_layers, recompute_batch_norm_statistics


def _running_statistics(model) -> list[torch.Tensor]:
    return [t.clone() for layer in batch_norm_layers(model) for t in (layer.running_mean, layer.running_var)]


def test_statistics_match_torch_update_bn():
    model, _ = build_model("timm")
    model.eval()
    batches = [torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]
    reference = copy.deepcopy(model)
    update_bn(batches, reference)
    momenta = [layer.momentum for layer in batch_norm_layers(model)]
    layers = recompute_batch_norm_statistics(model, batches, model)
    assert layers == len(batch_norm_layers(model)) > 0
    for ours, theirs in zip(_running_statistics(model), _running_statistics(reference), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # momentum and mode are given back as they were
    assert [layer.momentum for layer in batch_norm_layers(model)] == momenta
    assert not model.training


def test_model_without_batch_norm_is_untouched():
    model, _ = build_model("vit")
    batches = iter([{"pixel_values": torch.randn(2, 3, 16, 16)}])
    assert recompute_batch_norm_statistics(model, batches, lambda batch: pytest.fail("no forward pass needed")) == 0
    assert next(batches, None) is not None  # not consumed


@pytest.mark.parametrize("recompute", [True, False])
def test_trainer_recomputes_at_the_posterior_mean(make_args, recompute):
    model, head = build_model("timm")
    train = image_dataset(24)
    # One batch holds the whole training set, so that any order of the data makes the same batch.
    args = make_args(
        max_steps=6,
        learning_rate=0.05,
        per_device_train_batch_size=24,
        recompute_batch_norm=recompute,
        head_modules=head,
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    after_training = _running_statistics(trainer.model)
    # The reference: torch's update_bn over the training images at the trained weights (the mean m).
    reference = copy.deepcopy(trainer.model)
    update_bn([train[:]["pixel_values"]], reference)
    expected = _running_statistics(reference)
    matches = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(after_training, expected, strict=False))
    assert matches == recompute
