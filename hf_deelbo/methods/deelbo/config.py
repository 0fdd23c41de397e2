"""DE ELBO's entry of config.json (`config.deelbo`): its schema and format version, registered
once, and the writer of its values."""

from __future__ import annotations

from ...hub.config import load_config_entry
from ...registry import MethodSpec, register_method
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

# config.deelbo's keys: name -> (kind, required). The optional ones: entries written before them
# still read, and readers that predate them ignore them.
_REQUIRED = (
    ("lambda", "positive"),
    ("tau", "positive"),
    ("sigma", "positive"),
    ("kappa", "positive"),
    ("num_train_examples", "count"),
    ("num_backbone_params", "count"),
    ("num_head_params", "count"),
)
_OPTIONAL = (
    ("alpha_eff", "nonnegative"),
    ("beta_eff", "nonnegative"),
    ("head_modules", "names"),
    ("format_version", "version"),
    ("prior_variance_grouping", "text"),
    ("backbone_prior_variances", "variances"),  # layer-wise λ
    ("posterior_covariance", "text"),
)  # the diagonal posterior
DEELBO = register_method(
    MethodSpec(
        key="deelbo",
        title="DE ELBO",
        tags=("deelbo", "l2-sp", "variational-inference"),
        citation=CITATION,
        format_version=1,
        schema={
            **{name: (kind, True) for name, kind in _REQUIRED},
            **{name: (kind, False) for name, kind in _OPTIONAL},
        },
        choices={
            "prior_variance_grouping": PriorVarianceGrouping.values(),
            "posterior_covariance": PosteriorCovariance.values(),
        },
        companions={("prior_variance_grouping", "layer"): "backbone_prior_variances"},
    )
)


def deelbo_config(
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
) -> dict:
    """The JSON dict stored as `config.deelbo`, keys sorted.

    `lambda`, `tau`: learned prior variances of backbone and head; `sigma`: posterior std;
    `kappa`: data emphasis; `alpha_eff`, `beta_eff`: the equivalent L2-SP strengths 1/(Dλ), 1/(Dτ);
    `prior_variance_grouping`: "backbone" (one λ) or "layer" (one λ_l per backbone tensor, listed
    by name in `backbone_prior_variances`; `lambda` is then their harmonic mean
    λ̄ = D_b / Σ_l (D_l/λ_l), the one-λ prior with the same mean precision);
    `posterior_covariance`: "isotropic" (one σ) or "diagonal" (one σ_i per weight; `sigma` is then
    their root mean square √(Σ_i σ_i²/D)).
    """
    alpha_eff, beta_eff = effective_l2sp_strengths(
        backbone_prior_variance, head_prior_variance, num_backbone_params + num_head_params
    )
    return DEELBO.config_entry(
        {
            "alpha_eff": float(alpha_eff),
            "beta_eff": float(beta_eff),
            "head_modules": list(head_modules),
            "kappa": float(kappa),
            "lambda": float(backbone_prior_variance),
            "num_backbone_params": int(num_backbone_params),
            "num_head_params": int(num_head_params),
            "num_train_examples": int(num_train_examples),
            "sigma": float(sigma),
            "tau": float(head_prior_variance),
            "prior_variance_grouping": str(prior_variance_grouping),
            "posterior_covariance": str(posterior_covariance),
            **(
                {"backbone_prior_variances": {name: float(v) for name, v in backbone_prior_variances.items()}}
                if backbone_prior_variances is not None
                else {}
            ),
        }
    )


def load_deelbo_config(path: str, **hub_kwargs) -> dict:
    """Read `deelbo` from the config.json of a saved model directory, or from the hf_deelbo_config.json
    of a saved PEFT adapter (a directory or Hub repo id; `hub.load_config_entry`, validated).

    Raises:
        FileNotFoundError: neither file in `path`.
        KeyError: the file has no `deelbo` entry (the model was not trained with DEELBoTrainer).
        ValueError: the file is not JSON, or its `deelbo` entry is malformed.
    """
    return load_config_entry(path, DEELBO.key, **hub_kwargs)
