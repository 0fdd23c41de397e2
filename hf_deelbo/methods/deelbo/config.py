"""DE ELBO's entry of config.json (`config.deelbo`): the typed, versioned `DEELBoConfig`,
registered once, and its readers."""

from __future__ import annotations

from dataclasses import dataclass

from ...hub.config import MethodConfig
from ...registry import MethodSpec, entry_field, register_method
from .choices import PosteriorCovariance, PriorVarianceGrouping
from .objective import effective_l2sp_strengths

CITATION = """
@inproceedings{harvey2026learning,
  title     = {Learning Hyperparameters via a Data-Emphasized Variational Objective},
  author    = {Harvey, Ethan and Petrov, Mikhail and Hughes, Michael C.},
  booktitle = {International Conference on Artificial Intelligence and Statistics (AISTATS)},
  year      = {2026},
  note      = {arXiv:2502.01861}
}"""


@dataclass
class DEELBoConfig(MethodConfig):
    """DE ELBO's entry of config.json (`config.deelbo`), typed: what a run learned and the sizes
    that define it. `DEELBoConfig.from_pretrained("user/repo")` reads it from a saved model or PEFT
    adapter (a directory or a Hub repo id); `to_dict()` is the JSON entry.

    Attributes:
        backbone_prior_variance: λ (JSON `lambda`), the backbone prior N(μ, λI) around the
            pretrained weights; with layer-wise priors, the harmonic mean
            λ̄ = D_b / Σ_l (D_l/λ_l), the one-λ prior with the same mean precision.
        head_prior_variance: τ (JSON `tau`), the head prior N(0, τI).
        sigma: the posterior std; for a diagonal posterior the root mean square √(Σ_i σ_i²/D).
        kappa: the data emphasis (κ = D/N is the DE ELBO, κ = 1 the plain ELBO).
        num_train_examples, num_backbone_params, num_head_params: N, D_b and D_h.
        alpha_eff, beta_eff: the equivalent L2-SP strengths 1/(Dλ) and 1/(Dτ).
        head_modules: the module names of the new head.
        prior_variance_grouping: "backbone" (one λ) or "layer" (one λ_l per backbone tensor, in
            `backbone_prior_variances` by name).
        posterior_covariance: "isotropic" (one σ) or "diagonal" (one σ_i per weight).
    """

    # Required since the first format; the optional ones: entries written before them still read,
    # and readers that predate them ignore them.
    backbone_prior_variance: float = entry_field("positive", name="lambda")
    head_prior_variance: float = entry_field("positive", name="tau")
    sigma: float = entry_field("positive")
    kappa: float = entry_field("positive")
    num_train_examples: int = entry_field("count")
    num_backbone_params: int = entry_field("count")
    num_head_params: int = entry_field("count")
    alpha_eff: float | None = entry_field("nonnegative", default=None)
    beta_eff: float | None = entry_field("nonnegative", default=None)
    head_modules: list[str] | None = entry_field("names", default=None)
    prior_variance_grouping: str | None = entry_field("text", default=None, choices=PriorVarianceGrouping.values())
    backbone_prior_variances: dict[str, float] | None = entry_field("variances", default=None)  # layer-wise λ
    posterior_covariance: str | None = entry_field("text", default=None, choices=PosteriorCovariance.values())

    @property
    def num_params(self) -> int:
        """D = D_b + D_h, the number of weights the posterior covers."""
        return self.num_backbone_params + self.num_head_params

    @classmethod
    def from_learned(
        cls,
        *,
        backbone_prior_variance: float,
        head_prior_variance: float,
        sigma: float,
        kappa: float,
        num_train_examples: int,
        num_backbone_params: int,
        num_head_params: int,
        head_modules: list[str],
        prior_variance_grouping: str = "backbone",
        backbone_prior_variances: dict[str, float] | None = None,
        posterior_covariance: str = "isotropic",
    ) -> DEELBoConfig:
        """The entry of a run's learned values, with the effective L2-SP strengths computed."""
        alpha_eff, beta_eff = effective_l2sp_strengths(
            backbone_prior_variance, head_prior_variance, num_backbone_params + num_head_params
        )
        return cls(
            backbone_prior_variance=float(backbone_prior_variance),
            head_prior_variance=float(head_prior_variance),
            sigma=float(sigma),
            kappa=float(kappa),
            num_train_examples=int(num_train_examples),
            num_backbone_params=int(num_backbone_params),
            num_head_params=int(num_head_params),
            alpha_eff=float(alpha_eff),
            beta_eff=float(beta_eff),
            head_modules=list(head_modules),
            prior_variance_grouping=str(prior_variance_grouping),
            backbone_prior_variances=(
                {name: float(v) for name, v in backbone_prior_variances.items()}
                if backbone_prior_variances is not None
                else None
            ),
            posterior_covariance=str(posterior_covariance),
        )


DEELBO = register_method(
    MethodSpec(
        key="deelbo",
        title="DE ELBO",
        tags=("deelbo", "l2-sp", "variational-inference"),
        citation=CITATION,
        format_version=1,
        config_class=DEELBoConfig,
        companions={("prior_variance_grouping", "layer"): "backbone_prior_variances"},
    )
)


def deelbo_config(**learned) -> dict:
    """The JSON dict stored as `config.deelbo`, keys sorted: `DEELBoConfig.from_learned(**learned).to_dict()`."""
    return DEELBoConfig.from_learned(**learned).to_dict()


def load_deelbo_config(path: str, **hub_kwargs) -> dict:
    """`DEELBoConfig.from_pretrained(path).to_dict()`: read `deelbo` from the config.json of a saved model directory, or from the hf_deelbo_config.json
    of a saved PEFT adapter (a directory or Hub repo id; `hub.load_config_entry`, validated).

    Raises:
        FileNotFoundError: neither file in `path`.
        KeyError: the file has no `deelbo` entry (the model was not trained with DEELBoTrainer).
        ValueError: the file is not JSON, or its `deelbo` entry is malformed.
    """
    return DEELBoConfig.from_pretrained(path, **hub_kwargs).to_dict()
