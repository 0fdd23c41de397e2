"""The choices of `DEELBoTrainingArguments` (`core.choices.Choice`: each member with its meaning)."""

from __future__ import annotations

from ...core.choices import Choice


class ObjectiveBatchNorm(Choice):
    """How BatchNorm layers normalize while `DEELBoTrainer.training_objective` scores a run (the
    learning-rate selection); no effect on models without BatchNorm."""

    BATCH = "batch", "each batch's statistics, as in training"
    RUNNING = "running", "the running statistics, as in prediction"


class SamplingMechanism(Choice):
    """How a training step runs the model at its draw w̃ = m + σε."""

    IN_PLACE = "in_place", "σε added to the weights and removed after backward"
    FUNCTIONAL_CALL = "functional_call", "w̃ as a separate copy of the weights"


class PriorVarianceGrouping(Choice):
    """How the backbone's prior variance is shared: the paper's one λ, or one per tensor, each in
    closed form (docs/method.md, "Layer-wise prior variances")."""

    BACKBONE = "backbone", "one λ for the backbone"
    LAYER = "layer", "one λ_l per backbone tensor"


class PosteriorCovariance(Choice):
    """The posterior's covariance: the paper's σ²I, or diag(σ_i²)."""

    ISOTROPIC = "isotropic", "one σ for every weight"
    DIAGONAL = "diagonal", "one σ_i per weight"
