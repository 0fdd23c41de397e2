"""The callback that keeps DE ELBO's learned state: λ (backbone), τ (head) and ρ."""

from __future__ import annotations

import torch
from transformers.utils import logging

from ...core.callback import MethodStateCallback
from .posterior import GaussianPosterior

logger = logging.get_logger(__name__)


def _as_json(value):
    """A prior variance as JSON: a float, or a list of floats for layer-wise λ_l."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


class _PriorVariance:
    """λ or τ as a plain attribute to `Trainer` (which restores it with setattr on resume), read
    through `DEELBoCallback.prior_variances` so that a value gone out of date is recomputed: a
    float, or for layer-wise λ_l (`prior_variance_grouping="layer"`) a list of floats."""

    def __init__(self, index: int, doc: str):
        self.index = index
        self.__doc__ = doc

    def __get__(self, callback, owner=None):
        if callback is None:
            return self
        return _as_json(callback.prior_variances()[self.index])

    def __set__(self, callback, value: float | None) -> None:
        callback._variances[self.index] = value


class DEELBoCallback(MethodStateCallback):
    """Holds λ and τ at their optimum given q (coordinate ascent), and ρ across checkpoints:

        λ* = ‖m_b − μ‖² / D_b + σ²        τ* = ‖m_h‖² / K + σ²

    The update itself happens where the values are read: the gradient step on (m, ρ) runs at
    fixed λ, τ, which gives the same gradients as profiling λ*, τ* inside the KL (envelope
    theorem). After every optimizer step the values go out of date (`on_step_end`) and the next
    read recomputes them from the new m and σ; during training that read is
    `DEELBoTrainer.compute_loss`, which hands over the squared distances it computes for the KL,
    so the update costs no pass over the weights of its own. `on_step_end` also clears ρ's
    gradient, which `Trainer`'s `model.zero_grad()` does not reach, and keeps σ above its floor.

    With `prior_variance_grouping="layer"` λ is the vector of λ_l* = ‖m_l − μ_l‖²/D_l + σ², one per
    backbone tensor (a float64 tensor on the weights' device; a list of floats in the JSON state).

    With `posterior_covariance="diagonal"`, λ_g* = (‖m_g − μ_g‖² + Σ_{i∈g} σ_i²)/D_g for each group g.

    State (JSON, stored in `trainer_state.json` with each checkpoint): λ, τ and ρ (`None` for a
    diagonal posterior, whose D-sized ρ goes to the checkpoint's `deelbo_posterior_rho.safetensors`). `Trainer`
    rebuilds the callback from that state on resume; `DEELBoTrainer` binds the posterior to
    whichever instance is installed (`bind`), which writes a restored ρ into it.

    Args:
        backbone_prior_variance (`float` or `list[float]`, *optional*): λ (the list of λ_l with
            "layer" grouping); computed from the posterior when `None`.
        head_prior_variance (`float`, *optional*): τ; computed from the posterior when `None`.
        posterior_rho (`float`, *optional*): ρ as last saved, restored into the posterior on resume (into
            every ρ_i of a diagonal posterior: an isotropic checkpoint resumed as diagonal).
    """

    state_attributes = ("backbone_prior_variance", "head_prior_variance", "posterior_rho")
    backbone_prior_variance = _PriorVariance(0, "λ, the backbone prior variance.")
    head_prior_variance = _PriorVariance(1, "τ, the head prior variance.")

    def __init__(
        self,
        backbone_prior_variance: float | None = None,
        head_prior_variance: float | None = None,
        posterior_rho: float | None = None,
    ):
        self._variances = [None, None]
        super().__init__(
            backbone_prior_variance=backbone_prior_variance,
            head_prior_variance=head_prior_variance,
            posterior_rho=posterior_rho,
        )

    @property
    def posterior(self) -> GaussianPosterior | None:
        return self.target

    def saved_state(self) -> dict:
        lam, tau = self._variances
        return {"backbone_prior_variance": lam, "head_prior_variance": tau, "posterior_rho": self.posterior_rho}

    def restore(self, posterior: GaussianPosterior) -> None:
        if self.posterior_rho is not None:
            posterior.rho.data.fill_(self.posterior_rho)
        lam = self._variances[0]
        if lam is None or isinstance(lam, torch.Tensor):
            return
        groups = posterior.backbone_group_names
        is_list = isinstance(lam, list)
        fits = (is_list and len(lam) == len(groups)) if groups is not None else not is_list
        if not fits:
            # λ* is a closed form of the restored m and σ: recomputing it loses nothing.
            saved = len(lam) if isinstance(lam, list) else 1
            logger.warning(
                f"The checkpoint holds {saved} backbone prior variance(s), which does not fit "
                f"prior_variance_grouping={posterior.prior_variance_grouping!r} ({len(groups) if groups else 1} "
                "expected); λ is recomputed from the restored weights."
            )
            self._variances = [None, None]
        elif groups is not None:
            self._variances[0] = posterior.as_backbone_prior_variance(lam)  # a float64 tensor on the device

    def current_state(self) -> dict:
        lam, tau = (_as_json(v) for v in self.prior_variances())
        # A diagonal posterior's ρ (D numbers) is saved next to the weights instead (`DEELBoTrainer._save`).
        rho = None if self.posterior.diagonal else self.posterior.rho.item()
        return {"backbone_prior_variance": lam, "head_prior_variance": tau, "posterior_rho": rho}

    def prior_variances(self, squared_distances=None):
        """(λ, τ), recomputed if an optimizer step has passed since they were last set; from
        `squared_distances` = (‖m_b − μ‖², ‖m_h‖²) at the current m when the caller has them.
        Recomputed values are float64 tensors on the weights' device (no host–device
        synchronisation in a training step); values restored from a checkpoint are floats."""
        if self._variances[0] is None or self._variances[1] is None:
            self._variances = list(self.posterior.optimal_prior_variances(squared_distances))
        return tuple(self._variances)

    def update(self) -> None:
        """λ, τ ← λ*, τ* for the posterior's current m and σ, now."""
        self._variances = [None, None]
        self.prior_variances()

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer clears gradients with model.zero_grad(), which does not reach ρ (it lives
        # outside the model); without this its gradient would accumulate across steps.
        self.posterior.rho.grad = None
        self.posterior.clamp_sigma()
        self._variances = [None, None]  # m and σ moved: λ*, τ* are recomputed at the next read
