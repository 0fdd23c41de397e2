"""sampling_mechanism="in_place": the draw w̃ = m + σε written into the weights, ε redrawn from the
generator's saved state instead of stored. Its gradients are checked against plain autograd in
tests/test_gradients.py; here: the same ε as one `torch.randn(D)`, the same training run as
`functional_call`, the size of the restore's rounding, and the weights restored when a step fails."""

import pytest
import torch
from conftest import build_model, image_dataset, training_args

from hf_deelbo import DEELBoTrainer
from hf_deelbo.core.groups import split_parameters
from hf_deelbo.methods.deelbo.posterior import GaussianPosterior
from hf_deelbo.methods.deelbo.sampling import _noise_pieces

# Piece lengths around the sampler's blocks of 16, and a total shorter than 16.
SIZES = [[1], [5, 3], [16], [15, 1, 16], [17, 31, 1, 2], [768, 10], [100, 3, 4096, 7, 9], [33] * 7 + [1]]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_noise_drawn_in_pieces_is_one_randn_of_length_d(sizes):
    full_generator, piece_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    full = torch.randn(sum(sizes), generator=full_generator)
    pieces = [p.clone() for p in _noise_pieces(sizes, piece_generator, torch.device("cpu"))]
    assert [len(p) for p in pieces] == sizes
    assert torch.equal(torch.cat(pieces), full)
    # the generator moved on exactly as far: the next step's draw is the same too
    assert torch.equal(piece_generator.get_state(), full_generator.get_state())


def _run(tmp_path, mechanism, **overrides):
    model, _ = build_model("vit")
    values = dict(
        max_steps=4, learning_rate=0.05, sigma_init=1e-2, optim="sgd", logging_steps=1, sampling_mechanism=mechanism
    )
    trainer = DEELBoTrainer(
        model=model,
        args=training_args(tmp_path / mechanism, **{**values, **overrides}),
        train_dataset=image_dataset(32),
    )
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return weights, trainer.learned_hyperparameters(), losses


@pytest.mark.parametrize(
    "overrides, weight_atol, rel",
    [
        ({}, 1e-6, 1e-5),
        ({"gradient_accumulation_steps": 2}, 1e-6, 1e-5),
        # Adam moves a weight by about one learning rate whatever its gradient's size, so where a
        # gradient is ~0 the restore's rounding (1e-8 relative) can turn into a step of lr = 0.05.
        ({"optim": "adamw_torch"}, 0.2, 1e-3),
    ],
    ids=["sgd", "sgd-accumulation", "adamw"],
)
def test_in_place_trains_like_functional_call(tmp_path, overrides, weight_atol, rel):
    """Same ε, same gradients: the runs differ only by the rounding of the in-place restore
    (m' = (m + σε) − σε, about one float32 ulp per weight per step)."""
    reference = _run(tmp_path, "functional_call", **overrides)
    in_place = _run(tmp_path, "in_place", **overrides)
    assert not torch.equal(reference[0], _run(tmp_path / "other", "functional_call", seed=1, **overrides)[0])
    torch.testing.assert_close(in_place[0], reference[0], rtol=0, atol=weight_atol)
    for key in ("lambda", "tau", "sigma", "kl"):
        if key in reference[1]:
            assert in_place[1][key] == pytest.approx(reference[1][key], rel=rel), key
    assert in_place[2] == pytest.approx(reference[2], rel=rel)
    assert len(in_place[2]) == 4


def test_restore_rounding_is_at_most_one_ulp_of_the_perturbed_weight():
    """m' = fl(fl(m + σε) − fl(σε)) differs from m by at most 2⁻²³·max(|m|, |σε|) per weight, is
    exactly m for most weights when σε is small next to m, and for weights at 0 always."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    torch.nn.init.zeros_(model[0].bias)
    for sigma in (1e-4, 0.05):
        posterior = GaussianPosterior(model, split_parameters(model, ["1"]), sigma_init=sigma)
        before = [p.detach().clone() for p in model.parameters()]
        draw = posterior.perturb_in_place(generator=torch.Generator().manual_seed(1))
        perturbed = [p.detach().clone() for p in model.parameters()]
        draw.restore()
        for m, restored, w in zip(before, model.parameters(), perturbed, strict=False):
            scale = torch.maximum(m.abs(), (w - m).abs())
            assert ((restored - m).abs() <= torch.finfo(torch.float32).eps * scale).all()
            assert not torch.equal(w, m)
        assert torch.equal(model[0].bias, torch.zeros(64))
        exact = (
            sum(int(torch.eq(r, m).sum()) for r, m in zip(model.parameters(), before, strict=False))
            / posterior.num_params
        )
        assert exact > (0.95 if sigma == 1e-4 else 0.3), (sigma, exact)
        with torch.no_grad():  # start the next σ from the same weights
            for p, m in zip(model.parameters(), before, strict=False):
                p.copy_(m)


def test_a_step_that_fails_leaves_the_weights_at_m(make_args):
    model, _ = build_model("vit")
    trainer = DEELBoTrainer(model=model, args=make_args(num_train_examples=8))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 99])}  # label out of range
    with pytest.raises(IndexError):
        trainer.training_step(model, inputs)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=1e-6)
    assert trainer._draw is None
    # and the next step runs
    trainer.training_step(model, {**inputs, "labels": torch.tensor([0, 1, 2, 3])})


def test_an_unknown_mechanism_is_refused_with_the_choices(make_args):
    with pytest.raises(
        ValueError, match=r"sampling_mechanism must be 'in_place' .* or 'functional_call' .*got 'fused'"
    ):
        make_args(sampling_mechanism="fused")
