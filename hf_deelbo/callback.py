"""The closed-form update of the prior variances λ (backbone) and τ (head)."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .posterior import IsotropicGaussianPosterior


class DEELBoCallback(TrainerCallback, ExportableState):
    """Keeps λ and τ at their optimum given q (coordinate ascent):

        λ* = ‖m_b − μ‖² / D_b + σ²        τ* = ‖m_h‖² / K + σ²

    The gradient step on (m, ρ) runs at fixed λ, τ, which gives the same gradients as profiling
    λ*, τ* inside the KL (envelope theorem). After every optimizer step the values go out of date
    and the next read recomputes them from the new m and σ; during training that read is
    `DEELBoTrainer.compute_loss`, which hands over the squared distances it computes for the KL,
    so the update costs no pass over the weights of its own. The callback also clears ρ's
    gradient, which `Trainer`'s `model.zero_grad()` does not reach.

    State (JSON, stored in `trainer_state.json` with each checkpoint): λ, τ and ρ. `Trainer`
    rebuilds the callback from that state on resume, so `DEELBoTrainer` binds the posterior to
    whichever instance is installed (`bind`) and never keeps a reference to an old one.

    Args:
        backbone_prior_variance (`float`, *optional*): λ; computed from the posterior when `None`.
        head_prior_variance (`float`, *optional*): τ; computed from the posterior when `None`.
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

    def prior_variances(self, squared_distances=None):
        """(λ, τ), recomputed if an optimizer step has passed since they were last set; from
        `squared_distances` = (‖m_b − μ‖², ‖m_h‖²) at the current m when the caller has them.
        Recomputed values are float64 tensors on the weights' device (no host–device
        synchronisation in a training step); values restored from a checkpoint are floats."""
        if self._lam is None or self._tau is None:
            self._lam, self._tau = self.posterior.optimal_prior_variances(squared_distances)
        return self._lam, self._tau

    # Plain attributes to `Trainer`, which restores them with setattr on resume.
    @property
    def backbone_prior_variance(self) -> float:
        """λ, the backbone prior variance."""
        return float(self.prior_variances()[0])

    @backbone_prior_variance.setter
    def backbone_prior_variance(self, value: float | None) -> None:
        self._lam = value

    @property
    def head_prior_variance(self) -> float:
        """τ, the head prior variance."""
        return float(self.prior_variances()[1])

    @head_prior_variance.setter
    def head_prior_variance(self, value: float | None) -> None:
        self._tau = value

    def update(self) -> None:
        """λ, τ ← λ*, τ* for the posterior's current m and σ, now."""
        self._lam = self._tau = None
        self.prior_variances()

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer clears gradients with model.zero_grad(), which does not reach ρ (it lives
        # outside the model); without this its gradient would accumulate across steps.
        self.posterior.rho.grad = None
        self.posterior.clamp_sigma()
        self._lam = self._tau = None  # m and σ moved: λ*, τ* are recomputed at the next read

    def state(self) -> dict:
        rho = self.posterior.rho.item() if self.posterior is not None else self.posterior_rho
        values = (
            tuple(float(v) for v in self.prior_variances()) if self.posterior is not None else (self._lam, self._tau)
        )
        return {
            "args": {},
            "attributes": {
                "backbone_prior_variance": values[0],
                "head_prior_variance": values[1],
                "posterior_rho": rho,
            },
        }
