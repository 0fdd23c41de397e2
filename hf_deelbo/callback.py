"""The closed-form update of the prior variances λ (backbone) and τ (head)."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .posterior import IsotropicGaussianPosterior


class DEELBoCallback(TrainerCallback, ExportableState):
    """Sets λ and τ to their optimum given q after every optimizer step (coordinate ascent):

        λ* = ‖m_b − μ‖² / D_b + σ²        τ* = ‖m_h‖² / K + σ²

    The gradient step on (m, ρ) then runs at fixed λ, τ, which gives the same gradients as
    profiling λ*, τ* inside the KL (envelope theorem). It also clears ρ's gradient, which
    `Trainer`'s `model.zero_grad()` does not reach.

    State (JSON, stored in `trainer_state.json` with each checkpoint): λ, τ and ρ. `Trainer`
    rebuilds the callback from that state on resume, so `DEELBoTrainer` binds the posterior to
    whichever instance is installed (`bind`) and never keeps a reference to an old one.

    Args:
        backbone_prior_variance (`float`, *optional*): λ; `None` until the first update.
        head_prior_variance (`float`, *optional*): τ; `None` until the first update.
        posterior_rho (`float`, *optional*): ρ as last saved, restored into the posterior on resume.
    """

    def __init__(
        self,
        backbone_prior_variance: float | None = None,
        head_prior_variance: float | None = None,
        posterior_rho: float | None = None,
    ):
        self.backbone_prior_variance = backbone_prior_variance
        self.head_prior_variance = head_prior_variance
        self.posterior_rho = posterior_rho
        self.posterior: IsotropicGaussianPosterior | None = None

    def bind(self, posterior: IsotropicGaussianPosterior) -> None:
        """Attach the posterior; a ρ restored from a checkpoint is written into it."""
        self.posterior = posterior
        if self.posterior_rho is not None:
            posterior.rho.data.fill_(self.posterior_rho)
        if self.backbone_prior_variance is None or self.head_prior_variance is None:
            self.update()

    def update(self) -> None:
        """λ, τ ← λ*, τ* for the posterior's current m and σ."""
        self.backbone_prior_variance, self.head_prior_variance = self.posterior.optimal_prior_variances()

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer clears gradients with model.zero_grad(), which does not reach ρ (it lives
        # outside the model); without this its gradient would accumulate across steps.
        self.posterior.rho.grad = None
        self.posterior.clamp_sigma()
        self.update()

    def state(self) -> dict:
        rho = self.posterior.rho.item() if self.posterior is not None else self.posterior_rho
        return {
            "args": {},
            "attributes": {
                "backbone_prior_variance": self.backbone_prior_variance,
                "head_prior_variance": self.head_prior_variance,
                "posterior_rho": rho,
            },
        }
