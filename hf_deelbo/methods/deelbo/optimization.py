"""ρ's own optimizer for a diagonal posterior, stepped with the weights' optimizer as one.

With `posterior_covariance="diagonal"` each weight has its own ρ_i, and dL/dρ_i is one term of
the sum that the isotropic ρ gets: about 1/D of it (D trainable weights). At the step sizes that
move the isotropic ρ, a plain gradient step leaves every ρ_i where it started (measured: σ_i stayed
at their initial 1e-4 over 200 SGD steps at lr 1, the prior variance fell to ~1e-8 and pinned the
backbone), and scaling the step by D lets each ρ_i's own gradient noise, which the isotropic sum
averages over D weights, through undamped (σ diverged). Adam normalises each coordinate's step by
its own gradient scale (Kingma & Ba 2015), so every σ_i moves by about a learning rate per step
where its gradient is consistent, whatever D: ρ gets a `torch.optim.Adam` of its own, and
`CombinedOptimizer` steps it with the user's optimizer so that Trainer, its learning-rate
scheduler, accelerate and checkpoints see one optimizer.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Sequence

import torch


class _InnerStates(collections.abc.Mapping):
    """The inner optimizers' per-parameter state, read through (their `state` are defaultdicts, so a
    ChainMap would answer every lookup from the first one)."""

    def __init__(self, states):
        self.states = states

    def __getitem__(self, parameter):
        for state in self.states:
            if parameter in state:
                return state[parameter]
        raise KeyError(parameter)

    def __iter__(self):
        return (parameter for state in self.states for parameter in state)

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one.

    `param_groups` is the list of the inner optimizers' groups, in order (the same dicts, so a
    learning-rate scheduler built on this optimizer scales every group, and Trainer's logged
    learning rate is the first group's); `state` reads through to theirs; `state_dict()` holds each
    one's, and `load_state_dict` gives each its own back. `step` and `zero_grad` call theirs."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        params = [p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, defaults={})
        self._share_inner_groups()

    def _share_inner_groups(self) -> None:
        # The inner optimizers own the groups and their state; load_state_dict replaces both objects.
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]
        self.state = _InnerStates([optimizer.state for optimizer in self.optimizers])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(
                f"this optimizer combines {len(self.optimizers)} optimizers (the weights' and a diagonal posterior's "
                f"ρ); the state to load holds {'none' if saved is None else len(saved)}: it was saved by another "
                "optimizer setup (e.g. posterior_covariance or diagonal_sigma_learning_rate changed since the checkpoint)"
            )
        for optimizer, inner in zip(self.optimizers, saved, strict=False):
            optimizer.load_state_dict(inner)
        self._share_inner_groups()

    def add_param_group(self, param_group: dict) -> None:
        if not self.param_groups:  # Optimizer.__init__'s own call, before the inner groups are shared
            super().add_param_group(param_group)
            return
        # A later group belongs to the first optimizer (the weights'), which then steps it.
        self.optimizers[0].add_param_group(param_group)
        self._share_inner_groups()


def diagonal_rho_optimizer(rho: torch.nn.Parameter, learning_rate: float) -> torch.optim.Adam:
    """A diagonal posterior's ρ under Adam: `learning_rate`, β = (0.9, 0.999), no weight decay, and
    ε = 1e-12 rather than Adam's 1e-8, because dL/dρ_i is O(1/D) (about 1e-7 for 5M weights) and a
    1e-8 ε would shrink the steps of the weights with the smallest gradients."""
    return torch.optim.Adam(
        [{"params": [rho], "lr": learning_rate, "weight_decay": 0.0}], betas=(0.9, 0.999), eps=1e-12
    )
