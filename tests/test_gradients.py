"""Gradients of the training loss against a plain-autograd reference written independently:
weights perturbed in place, the KL from torch.distributions, dρ from the chain rule by hand."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, image_dataset, text_dataset
from torch.distributions import Normal, kl_divergence

from hf_deelbo import DEELBoTrainer


def _reference_gradients(model, inputs, labels, prior_mean, head_names, rho, lam, tau, kappa, n, seed):
    """Returns (loss, {name: dL/dm}, dL/dρ) for the DE ELBO loss, without hf_deelbo's code; `lam` is
    one backbone prior variance or a dict of one per backbone tensor (layer-wise); `rho` a scalar or,
    for the diagonal posterior, one ρ_i per weight in parameter order."""
    model = copy.deepcopy(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    d = sum(p.numel() for _, p in params)
    torch.manual_seed(seed)
    eps = torch.randn(d)  # the documented draw: one vector of length D, split in parameter order
    sigma = F.softplus(rho.detach().float())
    pieces, sigmas, offset = [], [], 0
    with torch.no_grad():
        for _, p in params:
            e = eps[offset : offset + p.numel()].view_as(p)
            s = sigma[offset : offset + p.numel()].view_as(p) if rho.ndim else sigma
            offset += p.numel()
            pieces.append(e)
            sigmas.append(s)
            p.add_((s * e).to(p.dtype))  # w̃ = m + σε (diagonal: σ ⊙ ε), in place
    out = model(**inputs)
    nll = F.cross_entropy(out.logits.float(), labels)
    model.zero_grad()
    nll.backward()
    grads_at_sample = {name: p.grad.detach().clone() for name, p in params}

    # KL part, at the unperturbed weights, via torch.distributions in float64.
    ref_rho = rho.detach().double().clone().requires_grad_()
    ref_sigma = F.softplus(ref_rho)
    originals = {
        name: p.detach().double() - (s * e).double() for (name, p), e, s in zip(params, pieces, sigmas, strict=True)
    }
    leaves = {name: v.clone().requires_grad_() for name, v in originals.items()}
    kl, offset = 0.0, 0
    for name, m in leaves.items():
        scale = ref_sigma[offset : offset + m.numel()].view_as(m) if rho.ndim else ref_sigma.expand_as(m)
        offset += m.numel()
        if name in head_names:
            mean, var = torch.zeros_like(m), tau
        else:
            mean, var = prior_mean[name].double(), lam[name] if isinstance(lam, dict) else lam
        kl = kl + kl_divergence(Normal(m, scale), Normal(mean, torch.full_like(m, math.sqrt(var)))).sum()
    prior_term = kl / (kappa * n)
    prior_term.backward()
    weight_grads = {name: grads_at_sample[name].double() + leaves[name].grad for name in leaves}
    # dL/dρ = Σ dL/dw̃ · ε · σ'(ρ) + ∂(KL/κN)/∂ρ,  σ'(ρ) = sigmoid(ρ); diagonal: dL/dρ_i = dL/dw̃_i ε_i σ'(ρ_i) + ...
    products = [grads_at_sample[name].double() * e.double() for (name, _), e in zip(params, pieces, strict=True)]
    data_term = torch.cat([t.reshape(-1) for t in products]) if rho.ndim else sum(t.sum() for t in products)
    rho_grad = data_term * torch.sigmoid(rho.detach().double()) + ref_rho.grad
    return nll.item() + prior_term.item(), weight_grads, rho_grad


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal"])
@pytest.mark.parametrize("grouping", ["backbone", "layer"])
@pytest.mark.parametrize("mechanism", ["in_place", "functional_call"])
@pytest.mark.parametrize("kind", ["vit", "resnet", "bert"])
def test_loss_gradients_match_reference(kind, mechanism, grouping, covariance, make_args):
    model, head = build_model(kind)
    model = model.double()
    dataset = text_dataset(8) if kind == "bert" else image_dataset(8)
    # Only training_step is used, on float64 inputs built below: N is given instead of a dataset.
    trainer = DEELBoTrainer(
        model=model,
        args=make_args(
            sigma_init=0.01,
            num_train_examples=8,
            sampling_mechanism=mechanism,
            prior_variance_grouping=grouping,
            posterior_covariance=covariance,
        ),
    )
    # Move the backbone away from μ so the backbone prior pulls, spread the σ_i of a diagonal
    # posterior (so a ρ_i paired with the wrong weight would show), and refresh λ, τ.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        if covariance == "diagonal":
            trainer.posterior.rho.add_(0.5 * torch.randn_like(trainer.posterior.rho))
    trainer.deelbo_callback.update()
    prior_mean = {name: mu.clone() for name, mu in trainer.posterior.prior_mean.items()}
    lam, tau = trainer.deelbo_callback.backbone_prior_variance, trainer.deelbo_callback.head_prior_variance
    if grouping == "layer":
        lam = dict(zip(trainer.posterior.backbone_names, lam, strict=True))
        assert len(set(lam.values())) > 1  # the tensors' λ_l differ, so a wrong pairing would show

    batch = dataset[:8]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if kind != "bert":
        inputs["pixel_values"] = inputs["pixel_values"].double()
    labels = batch["labels"]
    head_names = set(trainer.posterior.head_names)
    model.train()  # BatchNorm in the same mode in both computations
    ref_loss, ref_weight_grads, ref_rho_grad = _reference_gradients(
        model, inputs, labels, prior_mean, head_names, trainer.posterior.rho, lam, tau, trainer.kappa, 8, seed=123
    )

    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(123)
    model.zero_grad()
    trainer.posterior.rho.grad = None
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test skips
    loss = trainer.training_step(model, {**inputs, "labels": labels})  # forward, backward, (in place) restore

    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    # the weights are back at m (in place: up to one rounding of w̃ = m + σε per weight)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=1e-15 if mechanism == "in_place" else 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_weight_grads[name], rtol=1e-5, atol=1e-9)
    # ρ.grad is float32: a diagonal ρ_i's data and KL parts are each rounded to float32 before they
    # are summed, so where they cancel only an absolute tolerance at float32 resolution holds.
    atol = 1e-6 * float(ref_rho_grad.abs().max()) if covariance == "diagonal" else 0
    torch.testing.assert_close(trainer.posterior.rho.grad.double(), ref_rho_grad, rtol=1e-5, atol=atol)
    # The head and backbone both got a prior pull (otherwise the test would not see a wrong group).
    assert any(n in head_names for n in ref_weight_grads) and len(head_names) < len(ref_weight_grads)


class _PartlyUsedNet(torch.nn.Module):
    """A float32 layer, a bfloat16 layer and a weight the forward pass never uses."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 3).to(torch.bfloat16)
        self.unused = torch.nn.Parameter(torch.randn(4))

    def forward(self, pixel_values):
        return self.head(torch.tanh(self.body(pixel_values)).to(torch.bfloat16)).float()


def test_sampled_weights_and_their_gradients_match_plain_autograd():
    """`sample_parameters` against `m + (σε).to(dtype)` written out with plain autograd, on the same ε:
    the draws agree to one rounding (the fused float32 add rounds σε once, not twice), and so do
    the gradients to m and ρ, including a weight that gets no gradient and a bfloat16 layer."""
    from hf_deelbo.core.groups import split_parameters
    from hf_deelbo.methods.deelbo.posterior import GaussianPosterior

    torch.manual_seed(0)
    model = _PartlyUsedNet()
    posterior = GaussianPosterior(model, split_parameters(model, ["head"]), sigma_init=0.05)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    names = [name for name, _ in model.named_parameters()]

    sampled = posterior.sample_parameters(model, torch.Generator().manual_seed(3))
    loss = F.cross_entropy(torch.func.functional_call(model, sampled, (x,)), y)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    rho_grad = posterior.rho.grad.clone()

    model.zero_grad()
    posterior.rho.grad = None
    eps = torch.randn(posterior.num_params, generator=torch.Generator().manual_seed(3))
    sigma = F.softplus(posterior.rho)
    reference, offset = {}, 0
    for name, p in model.named_parameters():
        reference[name] = p + (sigma * eps[offset : offset + p.numel()].view_as(p)).to(p.dtype)
        offset += p.numel()
    F.cross_entropy(torch.func.functional_call(model, reference, (x,)), y).backward()

    for name in names:
        torch.testing.assert_close(sampled[name], reference[name], rtol=1.2e-7, atol=0, msg=name)
    assert grads["unused"] is None and model.unused.grad is None
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
    # The reference sums ⟨g, ε⟩ in the bfloat16 layer's own precision; the function in float32.
    torch.testing.assert_close(rho_grad, posterior.rho.grad, rtol=2e-2, atol=0)
    assert rho_grad.abs() > 0


class _TiedNet(torch.nn.Module):
    """An input and an output projection that share one weight, as tied embeddings do."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 6, bias=False)
        self.unembed = torch.nn.Linear(6, 6, bias=False)
        self.unembed.weight = self.embed.weight
        self.head = torch.nn.Linear(6, 3)

    def forward(self, pixel_values):
        return self.head(torch.tanh(self.unembed(torch.tanh(self.embed(pixel_values)))))


def test_a_tied_weight_gets_one_draw_under_all_its_names():
    """The draw names a tied weight under each of its names, so `functional_call(...,
    tie_weights=False)` (what the trainer runs) uses the same w̃ in both places; the reference
    lets `functional_call` find the tie itself."""
    from hf_deelbo.core.groups import split_parameters
    from hf_deelbo.methods.deelbo.posterior import GaussianPosterior

    torch.manual_seed(0)
    model = _TiedNet()
    posterior = GaussianPosterior(model, split_parameters(model, ["head"]), sigma_init=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    sampled = posterior.sample_parameters(model, torch.Generator().manual_seed(1))
    assert sampled["unembed.weight"] is sampled["embed.weight"]
    F.cross_entropy(torch.func.functional_call(model, sampled, (x,), tie_weights=False), y).backward()
    grad, rho_grad = model.embed.weight.grad.clone(), posterior.rho.grad.clone()

    model.zero_grad()
    posterior.rho.grad = None
    eps = torch.randn(posterior.num_params, generator=torch.Generator().manual_seed(1))
    sigma = F.softplus(posterior.rho)
    reference, offset = {}, 0
    for name, p in model.named_parameters():  # the tied weight once
        reference[name] = p + sigma * eps[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert "unembed.weight" not in reference
    F.cross_entropy(torch.func.functional_call(model, reference, (x,)), y).backward()
    torch.testing.assert_close(grad, model.embed.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rho_grad, posterior.rho.grad, rtol=1e-5, atol=1e-8)
