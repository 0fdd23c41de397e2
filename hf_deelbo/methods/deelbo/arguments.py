"""Training arguments of `DEELBoTrainer`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...core.arguments import StatefulFineTuningArguments, check_types
from .choices import ObjectiveBatchNorm, PosteriorCovariance, PriorVarianceGrouping, SamplingMechanism


@dataclass
class DEELBoTrainingArguments(StatefulFineTuningArguments):
    r"""
    Configuration for [`DEELBoTrainer`], which fine-tunes with the data-emphasized ELBO and learns
    the L2-SP strengths (λ for the pretrained backbone, τ for the new head) in the same run.

    Every [`~transformers.TrainingArguments`] field is accepted. Overridden and enforced settings:
    `restore_callback_states_from_checkpoint` defaults to `True` and is kept there (λ, τ and ρ
    live in the callback's state; `False` is overridden with a warning), and `weight_decay` must
    stay `0.0` (the learned prior replaces it). The paper's recipe is `optim="sgd"`, `optim_args="momentum=0.9,nesterov=True"`,
    `lr_scheduler_type="cosine"`, `max_grad_norm=1.0`, batch 128, with the learning rate chosen
    from {0.1, 0.01, 0.001, 0.0001}.

    Parameters:
        kappa (`float`, *optional*, defaults to `None`):
            Data emphasis κ: the prior term of the loss is KL / (κ N). `None` uses the DE ELBO's
            κ = D/N (D trainable parameters, N training examples); `1.0` is the ordinary ELBO.
        sigma_init (`float`, *optional*, defaults to `1e-4`):
            Initial standard deviation σ of the posterior q(w) = N(m, σ²I), shared by all weights.
            The paper's 1e-4 was used on networks of 20–90M parameters; the prior's initial pull on
            the backbone grows as 1/(σ√D), which slows the first tens of steps on much smaller
            networks (`DEELBoTrainer` logs it; docs/method.md, "Initial σ").
        sigma_learning_rate (`float`, *optional*, defaults to `1.0`):
            Learning rate of ρ (σ = softplus(ρ)), which gets an optimizer group of its own
            (following the same schedule, no weight decay). ρ is a log-scale parameter: how fast it
            must move does not depend on the weights' learning rate, and under Adam-family
            optimizers it moves by about one learning rate per step, so at the weights' 5e-5 σ
            would never leave `sigma_init` and the prior would pin the backbone at its pretrained
            weights; under SGD, gradient clipping shrinks ρ's gradient with the weights'. The
            default was measured (`benchmarks/dropin.py --calibrate`). `None` trains ρ at
            `learning_rate`, the paper's recipe. docs/trainer.md, "Using your own optimizer".
        sigma_momentum (`float`, *optional*, defaults to `0.9`):
            Under SGD (`optim="sgd"`), the (Nesterov) momentum of ρ's optimizer group, whatever the
            weights' momentum: ρ's steps then do not shrink tenfold when a user trains the weights
            without momentum at the same effective learning rate η/(1−m). The default was measured
            (`benchmarks/dropin.py --calibrate sigma_momentum`). `None` keeps the weights' momentum.
            Ignored by other optimizers and when `sigma_learning_rate` is `None`.
        head_modules (`list[str]`, *optional*, defaults to `None`):
            Module-name prefixes of the new classification head (prior N(0, τI)); every other
            trainable parameter is backbone (prior N(μ, λI), μ = its pretrained value). `None`
            detects the head: `classifier`/`score` in transformers models, `get_classifier()` in
            timm models.
        num_train_examples (`int`, *optional*, defaults to `None`):
            N in the loss. `None` uses `len(train_dataset)`; required for datasets without a length.
        bma_samples (`int`, *optional*, defaults to `0`):
            Prediction and evaluation: `0` predicts with the posterior mean m; `S > 0` averages the
            predictive distribution over S draws w̃ = m + σε (Bayesian model average).
        objective_batch_norm (`str`, *optional*, defaults to `"batch"`):
            How BatchNorm layers normalize while `DEELBoTrainer.training_objective` scores a run
            (the learning-rate selection): `"batch"` with each batch's own statistics, as in the
            training steps the objective summarizes (the running statistics are left untouched);
            `"running"` with the running statistics, as the model predicts (the authors' code).
            The running statistics average many draws w̃, so for a single draw with a large σ they
            are the wrong ones and inflate the objective of exactly the runs that trained well
            (docs/baselines.md, "BatchNorm in the training objective"). No effect on models
            without BatchNorm.
        recompute_batch_norm (`bool`, *optional*, defaults to `False`):
            After training, recompute the BatchNorm running statistics at the posterior mean m in
            one pass over the training data (`DEELBoTrainer.recompute_batch_norm`, as
            `torch.optim.swa_utils.update_bn`). During training they average the draws
            w̃ = m + σε, not m, at which the model predicts. No effect on models without BatchNorm.
        sampling_mechanism (`str`, *optional*, defaults to `"in_place"`):
            How each training step runs the model at its draw w̃ = m + σε. `"in_place"` adds σε to
            the weights themselves before the forward pass and, after the backward pass, subtracts
            it again (ε is redrawn from the saved generator state, never stored), forming dL/dρ on
            the way: the step needs the memory of plain training plus the prior mean μ only. The
            restored weights are m up to one float rounding per step.
            `"functional_call"` runs `torch.func.functional_call` with w̃ as a separate tensor (one
            more copy of the weights and one of ε during the step; m exact). Both draw the
            same ε (on CPU the same numbers) and compute the same gradients (docs/trainer.md,
            "Memory").
        prior_variance_grouping (`str`, *optional*, defaults to `"backbone"`):
            How the backbone's prior variance is shared. `"backbone"`: one λ for the whole
            backbone, p(w_b) = N(μ, λI), the paper's prior. `"layer"`: one λ_l per backbone
            parameter tensor, p(w_b,l) = N(μ_l, λ_l I), each learned in closed form,
            λ_l* = ‖m_l − μ_l‖²/D_l + σ², with the KL summed over tensors; κ and N are unchanged and
            the head keeps one τ. The logged and stored `lambda` is then the harmonic mean
            λ̄ = D_b / Σ_l (D_l/λ_l) and `config.deelbo.backbone_prior_variances` holds every λ_l
            (docs/method.md, "Layer-wise prior variances").
        posterior_covariance (`str`, *optional*, defaults to `"isotropic"`):
            The posterior's covariance. `"isotropic"`: q(w) = N(m, σ²I), one σ shared by every weight,
            the paper's posterior. `"diagonal"`: q(w) = N(m, diag(σ_i²)), one σ_i = softplus(ρ_i) per
            weight, each starting at `sigma_init`, with the prior variances in closed form per group g,
            λ_g* = (‖m_g − μ_g‖² + Σ_{i∈g} σ_i²)/D_g (composes with either `prior_variance_grouping`).
            ρ is then a vector of D numbers: one more D-sized float32 tensor, its gradient and its
            optimizer state, saved in each checkpoint as `deelbo_posterior_rho.safetensors`. The logged
            and stored `sigma` is the root mean square √(Σ_i σ_i²/D). Not with parameters sharded by
            FSDP2 (docs/method.md, "Diagonal posterior").
        diagonal_sigma_learning_rate (`float`, *optional*, defaults to `0.1`):
            With `posterior_covariance="diagonal"`, the learning rate of the Adam that trains the D
            numbers ρ_i (on the weights' schedule, whatever the weights' optimizer): each ρ_i's
            gradient is about 1/D of the isotropic ρ's, so the weights' optimizer at
            `sigma_learning_rate` leaves every σ_i at `sigma_init`; Adam's per-coordinate step does
            not depend on that scale. The default was measured
            (`benchmarks/regularization.py --calibrate-diagonal`). `None` trains ρ in the weights'
            optimizer as the isotropic ρ (`sigma_learning_rate`, `sigma_momentum`). Ignored by the
            isotropic posterior.
    """

    trainer_name: ClassVar[str] = "DEELBoTrainer"
    replaces_weight_decay: ClassVar[str] = "the learned prior"
    callback_state: ClassVar[str] = "λ, τ and ρ"
    sharding_note: ClassVar[str] = (
        "the posterior handles parameters sharded by torch's fully_shard (FSDP2) at the torch level, but "
        "Trainer's FSDP path through accelerate runs only on GPUs and is not wired to it yet (docs/trainer.md, "
        "'Several processes')"
    )

    kappa: float | None = field(
        default=None,
        metadata={
            "help": "Data emphasis κ; the prior term is KL/(κN). None means κ = D/N (DE ELBO); 1 is the plain ELBO."
        },
    )
    sigma_init: float = field(
        default=1e-4, metadata={"help": "Initial posterior standard deviation σ = softplus(ρ), shared by all weights."}
    )
    sigma_learning_rate: float | None = field(
        default=1.0,
        metadata={
            "help": "Learning rate of ρ (σ = softplus(ρ)) in its own optimizer group, on the same schedule. "
            "None: the weights' learning_rate (the paper's recipe)."
        },
    )
    sigma_momentum: float | None = field(
        default=0.9,
        metadata={
            "help": "Under SGD, the Nesterov momentum of ρ's optimizer group whatever the weights' momentum. "
            "None: the weights' momentum."
        },
    )
    num_train_examples: int | None = field(
        default=None, metadata={"help": "N, the training-set size in the loss. Default: len(train_dataset)."}
    )
    bma_samples: int = field(
        default=0,
        metadata={"help": "0: predict with the posterior mean. S > 0: average predictions over S posterior draws."},
    )
    objective_batch_norm: ObjectiveBatchNorm = field(
        default=ObjectiveBatchNorm.BATCH,
        metadata={"help": f"BatchNorm in the objective that picks the lr: {ObjectiveBatchNorm.described()}."},
    )

    recompute_batch_norm: bool = field(
        default=False, metadata={"help": "Recompute BatchNorm statistics at the posterior mean after training."}
    )

    sampling_mechanism: SamplingMechanism = field(
        default=SamplingMechanism.IN_PLACE,
        metadata={"help": f"How the model runs at its draw w̃ = m + σε: {SamplingMechanism.described()}."},
    )

    prior_variance_grouping: PriorVarianceGrouping = field(
        default=PriorVarianceGrouping.BACKBONE,
        metadata={
            "help": f"The backbone's prior variance: {PriorVarianceGrouping.described()}; the logged lambda is "
            "their harmonic mean."
        },
    )

    posterior_covariance: PosteriorCovariance = field(
        default=PosteriorCovariance.ISOTROPIC,
        metadata={
            "help": f"The posterior's covariance: {PosteriorCovariance.described()}; the logged sigma is their root "
            "mean square."
        },
    )

    diagonal_sigma_learning_rate: float | None = field(
        default=0.1,
        metadata={
            "help": "With posterior_covariance='diagonal': the learning rate of the Adam that trains the ρ_i, "
            "on the same schedule. None: ρ in the weights' optimizer, as the isotropic ρ."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_types(
            self,
            numbers=("kappa", "sigma_init", "sigma_learning_rate", "sigma_momentum", "diagonal_sigma_learning_rate"),
            ints=("num_train_examples", "bma_samples"),
        )
        if self.kappa is not None and not (math.isfinite(self.kappa) and self.kappa > 0):
            raise ValueError(f"kappa must be > 0 or None (None means D/N); got {self.kappa}")
        if not (math.isfinite(self.sigma_init) and self.sigma_init > 0):
            raise ValueError(f"sigma_init must be a finite number > 0 (the paper uses 1e-4); got {self.sigma_init}")
        if self.sigma_learning_rate is not None and not (
            math.isfinite(self.sigma_learning_rate) and self.sigma_learning_rate > 0
        ):
            raise ValueError(
                f"sigma_learning_rate must be a finite number > 0, or None to train ρ at learning_rate; "
                f"got {self.sigma_learning_rate}"
            )
        if self.sigma_momentum is not None and not 0 <= self.sigma_momentum < 1:
            raise ValueError(
                f"sigma_momentum must be in [0, 1), or None to keep the weights' momentum; got {self.sigma_momentum}"
            )
        if self.diagonal_sigma_learning_rate is not None and not (
            math.isfinite(self.diagonal_sigma_learning_rate) and self.diagonal_sigma_learning_rate > 0
        ):
            raise ValueError(
                f"diagonal_sigma_learning_rate must be a finite number > 0, or None to train a diagonal ρ in the "
                f"weights' optimizer; got {self.diagonal_sigma_learning_rate}"
            )
        if self.num_train_examples is not None and self.num_train_examples <= 0:
            raise ValueError(
                f"num_train_examples must be a positive int or None (len(train_dataset)); got {self.num_train_examples}"
            )
        for name, choice in (
            ("objective_batch_norm", ObjectiveBatchNorm),
            ("sampling_mechanism", SamplingMechanism),
            ("prior_variance_grouping", PriorVarianceGrouping),
            ("posterior_covariance", PosteriorCovariance),
        ):
            setattr(self, name, choice.check(name, getattr(self, name)))
        if self.bma_samples < 0:
            raise ValueError(f"bma_samples must be >= 0 (0 predicts with the posterior mean); got {self.bma_samples}")
