"""The two ways a training step draws w̃ = m + σε from the posterior (`posterior.GaussianPosterior`).

- in place (`InPlaceDraw`, the default): σε is added to the weights before the forward pass and
  subtracted after the backward pass; ε is drawn tensor by tensor and replayed from the
  generator's saved state, never stored. dL/dρ = Σ ⟨dL/dw̃, ε⟩ · σ'(ρ) is formed after the restore.
- `functional_call` (`_Perturb`): w̃ as separate tensors, autograd carrying the gradients to m and ρ.

Both draw the same ε (one standard-normal vector of length D, split in `named_parameters()` order;
on CPU the very same numbers). The posterior's module docstring says more about each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...core.anchor import DeferredDistanceGradients, accumulation_dtype, local

if TYPE_CHECKING:
    from .posterior import GaussianPosterior


def default_generator(device: torch.device | str) -> torch.Generator | None:
    """The generator `torch.randn(..., device=device)` uses when given none (the one Trainer's
    checkpoints save the state of), or None for a device torch gives none for (`meta`): the
    in-place draw replays ε from it, so it needs one. cpu; cuda, xpu and the other accelerators
    with `torch.<device>.default_generators`; mps."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    generators = getattr(module, "default_generators", None)
    if generators:
        index = device.index if device.index is not None else module.current_device()
        return generators[index]
    if device.type == "mps" and hasattr(torch.mps, "_get_default_mps_generator"):
        return torch.mps._get_default_mps_generator()
    return None


def in_place_supported(device: torch.device | str) -> bool:
    """Whether `sampling_mechanism='in_place'` can draw on `device` (it has a default generator)."""
    return default_generator(device) is not None


def _default_generator(device: torch.device) -> torch.Generator:
    generator = default_generator(device)
    if generator is None:
        raise NotImplementedError(
            f"sampling_mechanism='in_place' draws ε from the device's default generator, and torch has none for "
            f"{device}. Use sampling_mechanism='functional_call'."
        )
    return generator


def _noise_pieces(sizes: list[int], generator: torch.Generator, device: torch.device):
    """ε = torch.randn(sum(sizes), generator=generator) split into pieces of `sizes`, yielded one at a
    time without ever holding ε whole.

    torch's CPU normal sampler fills a float32 tensor of at least 16 numbers with one uniform draw per
    number, in order, transforms consecutive blocks of 16 (Box–Muller), and, if the length is not a
    multiple of 16, redraws the last 16. Drawn in chunks that start at multiples of 16 (the last one
    at least 16 long), ε is therefore the same numbers and leaves the generator in the same state as
    one call (tests/test_in_place.py checks both). On CUDA (Philox) the chunks are a different,
    equally valid draw: the same in `InPlaceDraw`'s two passes, not the same as `sample_parameters`'s.
    """
    total, produced, start = sum(sizes), 0, 0
    leftover = torch.empty(0, device=device)
    for size in sizes:
        stop = start + size
        if stop > produced:
            target = min(-(-stop // 16) * 16, total)
            if total - target < 16:  # no chunk shorter than 16 at the end: the sampler treats those differently
                target = total
            chunk = torch.empty(target - start, device=device)
            chunk[: produced - start].copy_(leftover)
            chunk[produced - start :].normal_(generator=generator)
            produced = target
        else:
            chunk = leftover
        yield chunk[:size]
        leftover = chunk[size:].clone()  # what the next piece starts with (fewer than 16 numbers, or the tail)
        start = stop


def _add_scaled_noise(m: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, sign: int) -> None:
    """m += σε (sign 1), rounded as `_Perturb.forward` rounds m + σε (one fused addcmul in float32),
    or m −= σε (sign −1) with σε rounded first: a weight at 0 (a fresh bias) comes back exactly 0,
    and w̃ = m whenever σε is below half an ulp of m, so the restore is exact as σ → 0; a fused
    subtraction would leave the product's rounding error behind instead. The restore scales ε in
    place (its last use), so it needs no tensor of its own."""
    if sign > 0 and m.dtype == eps.dtype:
        m.addcmul_(eps, sigma)
    elif m.dtype == eps.dtype:
        m.sub_(eps.mul_(sigma))
    else:
        m.add_((sigma * eps).to(m.dtype), alpha=sign)


def _shard_of(m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """ε_l (flat, for the whole tensor m_l) as m_l's local shard: all of it, or under FSDP2 the rows
    [offset, offset + local rows) this rank holds, so every rank perturbs its shard with the same
    numbers a single process would."""
    if type(m).__name__ != "DTensor":
        return eps.view_as(m)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(m.shape, m.device_mesh, m.placements)
    return eps.view(m.shape).narrow(0, offset[0], shape[0])


def _noise_dot(grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """⟨grad, ε⟩ in the wider of the two dtypes, as `_Perturb.backward` forms it."""
    if grad.dtype == eps.dtype:
        return torch.dot(grad.reshape(-1), eps.reshape(-1))
    dtype = torch.promote_types(grad.dtype, eps.dtype)
    return torch.dot(grad.reshape(-1).to(dtype), eps.reshape(-1).to(dtype))


def _noise_product(grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """grad ⊙ ε in float32 (or float64 for a float64 gradient), shaped like grad: a diagonal
    posterior's dL/dσ_l, as `_Perturb.backward` forms it."""
    dtype = torch.promote_types(grad.dtype, eps.dtype)
    return grad.to(dtype) * eps.view(grad.shape).to(dtype)


class InPlaceDraw:
    """One draw w̃ = m + σε held in the model's own weights for one forward and backward pass.

    The memory of the step is the memory of plain training plus μ and one tensor's ε at a time:
    neither ε nor w̃ exists as a second copy of the weights. The steps:

    1. the squared distances ‖m_b − μ‖² (per tensor with "layer" grouping), ‖m_h‖² at m
       (`squared_distances`), whose gradients to m are
       deferred to step 4 (in backward the weights are w̃, not m);
    2. the generator's state is saved, and for each trainable tensor l, in `named_parameters()` order:
       ε_l, the next piece of ε; ⟨grad_l, ε_l⟩ if l already holds a gradient (gradient accumulation);
       m_l ← m_l + σε_l in place;
    3. the caller runs forward and backward: grad_l gains dNLL/dw̃_l (DDP all-reduces it, as usual);
    4. `finish()` replays ε from the saved state, tensor by tensor: dL/dσ = Σ_l ⟨grad_l, ε_l⟩ (minus the
       part from step 2), w̃_l ← w̃_l − σε_l, then adds the KL's 2c(m − μ) to grad_l and sends dL/dσ
       through σ = softplus(ρ) to ρ.grad by autograd.

    Step 4's subtraction restores m up to the rounding of w̃ (|m' − m| ≤ 2⁻²³·max(|m|, |σε|); exact
    for about 99 % of weights at σ = 1e-4, for weights at 0, and whenever σε is below half an ulp of
    m). Where σε is large next to m, m + σε has lost m's low bits and no restore can be exact. The
    draw is deterministic, so resume and DDP stay exact. `restore()` puts the weights back without
    gradients (an aborted step, or a forward pass without backward).

    With a diagonal posterior the draw is m_l ± σ_l ⊙ ε_l (σ_l the piece of the vector σ belonging
    to tensor l), and step 4 forms the vector dL/dσ_l = grad_l ⊙ ε_l instead of the dot product
    (step 2 subtracts the earlier micro-batches' grad_l ⊙ ε_l from a D-sized buffer, so nothing
    else is stored), sent through σ = softplus(ρ) to ρ.grad by autograd.
    """

    def __init__(self, posterior: GaussianPosterior, generator: torch.Generator | None = None):
        anchor = posterior.anchor
        self._tensors, self._sizes = anchor.trainable, posterior._sizes
        self._device = self._tensors[0].device
        self._dtype = posterior.accumulation_dtype
        self._group = anchor.process_group
        self._sharded = dict(zip(map(id, self._tensors), anchor.sharded, strict=False))
        self._deferred = DeferredDistanceGradients(anchor)
        self.squared_distances = posterior.grouped_distances(anchor.squared_distances_per_tensor(self._deferred))
        self.sigma = posterior.sigma()  # differentiable: finish() sends dL/dσ through it
        self._diagonal = posterior.diagonal
        generator = generator if generator is not None else _default_generator(self._device)
        self._state = generator.get_state()
        self._earlier_dots = []
        self._grad_sigma = None  # diagonal: the D-sized dL/dσ, formed in place
        with torch.no_grad():
            for m, eps, sigma in self._with_sigma(
                zip(self._tensors, _noise_pieces(self._sizes, generator, self._device), strict=True)
            ):
                eps = _shard_of(m, eps)
                if m.grad is not None:
                    if self._diagonal:
                        self._grad_sigma_of(m).sub_(_noise_product(local(m.grad), eps))
                    else:
                        self._earlier_dots.append((_noise_dot(local(m.grad), eps), m))
                _add_scaled_noise(local(m), eps, sigma, 1)
        self.pending = True

    def _with_sigma(self, pieces):
        """(m_l, ε_l, σ) per tensor: the scalar σ, or a diagonal posterior's σ_l shaped like m_l."""
        sigma = self.sigma.detach()
        if not self._diagonal:
            return ((m, eps, sigma) for m, eps in pieces)
        return ((m, eps, s.view(m.shape)) for (m, eps), s in zip(pieces, sigma.split(self._sizes), strict=True))

    def _grad_sigma_of(self, m: torch.Tensor) -> torch.Tensor:
        """The piece of the diagonal dL/dσ buffer that belongs to tensor m, shaped like m."""
        if self._grad_sigma is None:
            self._grad_sigma = torch.zeros_like(self.sigma, dtype=torch.float32)
            self._pieces_by_id = {
                id(t): (piece, t.shape)
                for t, piece in zip(self._tensors, self._grad_sigma.split(self._sizes), strict=True)
            }
        piece, shape = self._pieces_by_id[id(m)]
        return piece.view(shape)

    def _replay(self):
        generator = torch.Generator(device=self._device)
        generator.set_state(self._state)
        return zip(self._tensors, _noise_pieces(self._sizes, generator, self._device), strict=False)

    def finish(self) -> None:
        """After the backward pass: dL/dρ into ρ.grad, the weights back at m, the KL's gradients to m."""
        if not self.pending:
            raise RuntimeError("This in-place draw was already finished or restored.")
        dots = []
        with torch.no_grad():
            for m, eps, sigma in self._with_sigma(self._replay()):
                eps = _shard_of(m, eps)
                if m.grad is not None:
                    if self._diagonal:
                        self._grad_sigma_of(m).add_(_noise_product(local(m.grad), eps))
                    else:
                        dots.append((_noise_dot(local(m.grad), eps), m))
                _add_scaled_noise(local(m), eps, sigma, -1)
            self.pending = False
            self._deferred.add_to_grads()
        if self._diagonal:
            if self._grad_sigma is not None:
                self.sigma.backward(self._grad_sigma)
            return
        if dots or self._group is not None:
            grad_sigma = self._sum_dots(dots)
            if self._earlier_dots:
                grad_sigma = grad_sigma - self._sum_dots(self._earlier_dots)
            self.sigma.backward(grad_sigma.float())

    def _sum_dots(self, dots: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Σ_l ⟨grad_l, ε_l⟩ in float64; under FSDP2 the sharded tensors' shares summed over ranks
        (FSDP has averaged their gradients over ranks already, as DDP averages whole ones)."""
        if self._group is None:
            return torch.stack([d for d, _ in dots]).sum(dtype=self._dtype)
        values = (
            torch.stack([d.to(self._dtype) for d, _ in dots])
            if dots
            else torch.zeros(0, dtype=self._dtype, device=self._device)
        )
        sharded = torch.tensor([self._sharded[id(m)] for _, m in dots], dtype=torch.bool, device=values.device)
        shards = torch.where(sharded, values, 0.0).sum()
        torch.distributed.all_reduce(shards, group=self._group)
        return torch.where(sharded, 0.0, values).sum() + shards

    @torch.no_grad()
    def restore(self) -> None:
        """The weights back at m, no gradients formed."""
        if self.pending:
            for m, eps, sigma in self._with_sigma(self._replay()):
                _add_scaled_noise(local(m), _shard_of(m, eps), sigma, -1)
            self.pending = False


class _Perturb(torch.autograd.Function):
    """w̃_l = m_l + σ ε_l for every tensor l, one fused pass per tensor (`addcmul`).

    Backward passes dL/dw̃_l to m_l unchanged and forms dL/dσ = Σ_l ⟨dL/dw̃_l, ε_l⟩ with one dot
    product per tensor. With a diagonal posterior σ is the vector of σ_i (split over the tensors
    as ε is), w̃_l = m_l + σ_l ⊙ ε_l and dL/dσ_l = dL/dw̃_l ⊙ ε_l. Plain autograd of `m + σ * ε` would also write σε, concatenate the
    gradients and multiply them by ε: three more weight-sized passes per step, which dominate the
    step when the batch's activations are small next to the weights.
    """

    @staticmethod
    def forward(ctx, pieces, sigma, *tensors):
        ctx.set_materialize_grads(False)
        ctx.pieces = pieces  # flat views of one noise vector
        ctx.diagonal = sigma.ndim > 0
        sigmas = (
            [s.view(m.shape) for s, m in zip(sigma.split([p.numel() for p in pieces]), tensors, strict=True)]
            if (ctx.diagonal)
            else [sigma] * len(tensors)
        )
        # σε is formed in ε's precision (float32) and then added in the weight's; the fused
        # addcmul does exactly that for float32 weights.
        return tuple(
            torch.addcmul(m, eps.view_as(m), s) if m.dtype == eps.dtype else m + (s * eps.view_as(m)).to(m.dtype)
            for m, eps, s in zip(tensors, pieces, sigmas, strict=True)
        )

    @staticmethod
    def backward(ctx, *grads):
        if ctx.diagonal:  # dL/dσ_l = dL/dw̃_l ⊙ ε_l; zero for a weight the forward pass did not use
            grad_sigma = torch.cat(
                [
                    _noise_product(grad, eps).reshape(-1).float() if grad is not None else torch.zeros_like(eps)
                    for grad, eps in zip(grads, ctx.pieces, strict=True)
                ]
            )
            return (None, grad_sigma, *grads)
        # Each dot product in the wider of the two dtypes (a bfloat16 gradient against float32 ε
        # is summed in float32; a float64 one in float64).
        dots = [
            torch.dot(grad.reshape(-1), eps)
            if grad.dtype == eps.dtype
            else torch.dot(*(t.to(torch.promote_types(grad.dtype, eps.dtype)) for t in (grad.reshape(-1), eps)))
            for grad, eps in zip(grads, ctx.pieces, strict=False)
            if grad is not None  # None: the weight took no part in the forward pass
        ]
        grad_sigma = torch.stack(dots).sum(dtype=accumulation_dtype(dots[0].device)).float() if dots else None
        return (None, grad_sigma, *grads)
