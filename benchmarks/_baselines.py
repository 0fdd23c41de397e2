"""The baselines of `benchmarks/regularization.py` and `benchmarks/comparison.py`, run as their
authors' users run them: L2-SP with Bayesian optimization (`bayesian_optimization`, through
`Trainer.hyperparameter_search`), and two Bayesian methods:

- `laplace_procedure`: **Laplace LA-LML**, the online marginal-likelihood method of Immer et al.,
  "Scalable Marginal Likelihood Estimation for Model Selection in Deep Learning" (ICML 2021,
  Alg. 1), with a diagonal empirical-Fisher Laplace approximation from laplace-torch. MAP training
  is `hf_deelbo.L2SPTrainer`; the two prior precisions (backbone toward the pretrained weights μ,
  head toward 0) are learned by gradient ascent on the Laplace log marginal likelihood.
- `ivon_procedure`: **IVON** (Shen et al., "Variational Learning is Effective for Large Deep
  Networks", ICML 2024; the `ivon-opt` package) as the optimizer of a `transformers.Trainer`, with
  its own fixed prior precision.

Both take what every procedure of `regularization.run_one` takes (`init`, a zero-argument factory
of a fresh pretrained model with a new head; `train`, the N training examples; `common`, the
`TrainingArguments` every run shares; `learning_rates`; `work_dir`), choose the learning rate
without validation data, and return the chosen run's trained Trainer (predictions at the MAP /
mean weights) and the fields of the benchmark record.

# N training examples, D_b backbone params (prior mean μ), K head params (prior mean 0),
# δ_b, δ_h the prior precisions on the summed log-likelihood, α = δ_b/N, β = δ_h/N the L2-SP
# strengths on the mean cross-entropy that correspond to them.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainerCallback

from benchmarks.task import select_by_training_loss
from hf_deelbo import L2SPTrainer, L2SPTrainingArguments
from hf_deelbo.core.modeling import classifier_logits, is_transformers_model
from hf_deelbo.search import learning_rate_search

# ---------------------------------------------------------------- Laplace LA-LML (Immer et al. 2021)

INITIAL_STRENGTH = 1e-4  # initial α and β (δ = 1e-4·N), as for every run of the learning-rate grid
NUM_HYPERSTEPS = 100  # Adam steps on (log δ_b, log δ_h) per hyper-update
HYPER_LEARNING_RATE = 0.1  # laplace-torch's `marglik_training` default `lr_hyp`
UPDATES_PER_RUN = 8  # marglik_frequency = max_steps // 8 and a burn-in of one frequency: 7 updates


class LogitsModel(nn.Module):
    """`model` as laplace-torch needs it: a tensor of pixel values in, a tensor of logits out.

    laplace-torch's diagonal EF (`CurvlinopsEF`, per-example gradients by `torch.func.vmap`) refuses
    dict inputs, and transformers models return an output object; this calls either kind the way
    the package's trainers do (`classifier_logits`). Its parameters are `model`'s, in the same order.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.transformers_model = is_transformers_model(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return classifier_logits(
            self.model, {"pixel_values": pixel_values}, transformers_model=self.transformers_model
        )


def prior_layout(model: nn.Module, anchor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prior mean, group index) as flat vectors in laplace-torch's parameter order (`parameters()`
    with `requires_grad`, as `parameters_to_vector`): μ and 0 for a backbone entry, 0 and 1 for a
    head entry. `anchor` is the trainer's `PretrainedAnchor` (its μ is the pretrained snapshot)."""
    backbone = {id(p): mu for p, mu in zip(anchor.backbone, anchor.prior_mean, strict=True)}
    head = {id(p) for p in anchor.head}
    means, groups = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in backbone:
            means.append(backbone[id(p)].detach().flatten())
            groups.append(torch.zeros(p.numel(), dtype=torch.long, device=p.device))
        elif id(p) in head:
            means.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            groups.append(torch.ones(p.numel(), dtype=torch.long, device=p.device))
        else:
            raise ValueError(f"trainable parameter {name!r} is in neither the backbone nor the head of the anchor")
    return torch.cat(means), torch.cat(groups)


def fit_laplace(model: nn.Module, anchor, loader: DataLoader, prior_precisions: torch.Tensor):
    """A diagonal empirical-Fisher Laplace approximation of `model` at its current weights, with the
    prior N(μ, 1/δ_b) on the backbone and N(0, 1/δ_h) on the head, fitted on every batch of `loader`
    ((pixel_values, labels) tuples over all N examples). BatchNorm layers use their running
    statistics (laplace-torch fits in eval mode); the model's training mode is restored.

    laplace-torch's `log_marginal_likelihood` is then (`DiagLaplace`, H_ii = Σ_n (∂_i log p(y_n|x_n, θ))²):

        log p(D|θ) − ½ Σ_i δ_i (θ_i − μ_i)² + ½ Σ_i log δ_i − ½ Σ_i log(δ_i + H_ii)

    (`scatter` uses `mean − prior_mean`: the prior mean enters as needed.)

    Args:
        prior_precisions: (δ_b, δ_h), a tensor of 2.
    """
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF

    wrapped = LogitsModel(model)
    prior_mean, groups = prior_layout(wrapped, anchor)
    training = model.training
    la = Laplace(
        wrapped,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        backend=CurvlinopsEF,
        prior_mean=prior_mean,
        prior_precision=prior_precisions.detach().to(prior_mean.dtype)[groups],
    )
    try:
        la.fit(loader)
    finally:
        model.train(training)
    la.groups = groups
    return la


def pixel_loader(dataset, batch_size: int) -> DataLoader:
    """The N examples of a torch-format dataset as (pixel_values, labels) batches, in order."""
    batch = dataset.with_format("torch")[:]
    return DataLoader(TensorDataset(batch["pixel_values"], batch["labels"]), batch_size=batch_size)


class OnlineMarglikCallback(TrainerCallback):
    """Learns the two L2-SP prior precisions during MAP training (Immer et al. 2021, Alg. 1).

    At every step s with s > B and (s − B) divisible by F, and at the last step (so the final log
    marginal likelihood is at the final weights), i.e. ceil((T − B)/F) times over T > B steps:

    1. fit a diagonal-EF Laplace approximation at the current weights on all N examples
       (`fit_laplace`, prior N(μ, 1/δ_b) on the backbone, N(0, 1/δ_h) on the head);
    2. take K Adam steps on (log δ_b, log δ_h) maximising its log marginal likelihood (one Adam
       state over the run, as laplace-torch's `marglik_training`);
    3. write α = δ_b/N, β = δ_h/N into `args`, where `L2SPTrainer` reads them at every step.

    Defaults: F = max(1, T // 8), B = F (7 updates at T = 200: steps 50, 75, ..., 200); K = 100,
    Adam lr 0.1 (laplace-torch's `lr_hyp`; K is 10× its default `n_hypersteps` because there are
    7 updates, not one per epoch); the initial δ are N·α and N·β from `args` at the start.

    Attributes:
        history: one dict per update (step, log_marginal_likelihood, δ_b, δ_h, α, β, seconds).
    """

    def __init__(
        self,
        anchor,
        train_dataset,
        marglik_frequency: int | None = None,
        num_burnin_steps: int | None = None,
        num_hypersteps: int = NUM_HYPERSTEPS,
        hyper_learning_rate: float = HYPER_LEARNING_RATE,
        batch_size: int = 32,
    ):
        self.anchor = anchor
        self.train_dataset = train_dataset
        self.marglik_frequency = marglik_frequency
        self.num_burnin_steps = num_burnin_steps
        self.num_hypersteps = num_hypersteps
        self.hyper_learning_rate = hyper_learning_rate
        self.batch_size = batch_size
        self.history: list[dict] = []

    @staticmethod
    def schedule(max_steps: int, marglik_frequency: int | None = None, num_burnin_steps: int | None = None):
        """(F, B) for a run of `max_steps` steps (the defaults of the class docstring)."""
        frequency = marglik_frequency or max(1, max_steps // UPDATES_PER_RUN)
        burnin = frequency if num_burnin_steps is None else num_burnin_steps
        return frequency, burnin

    @staticmethod
    def num_updates(max_steps: int, marglik_frequency: int, num_burnin_steps: int) -> int:
        """ceil((T − B)/F) for T > B, else 0."""
        return max(0, math.ceil((max_steps - num_burnin_steps) / marglik_frequency))

    @property
    def log_marginal_likelihood(self) -> float:
        """The last update's log marginal likelihood (−inf before any)."""
        return self.history[-1]["log_marginal_likelihood"] if self.history else float("-inf")

    def on_train_begin(self, args, state, control, **kwargs):
        self.num_examples = len(self.train_dataset)
        self.frequency, self.burnin = self.schedule(state.max_steps, self.marglik_frequency, self.num_burnin_steps)
        initial = torch.tensor([args.alpha, args.beta], dtype=torch.float64) * self.num_examples
        self.log_prior_precisions = initial.log().requires_grad_(True)
        self.hyper_optimizer = torch.optim.Adam([self.log_prior_precisions], lr=self.hyper_learning_rate)
        self.loader = pixel_loader(self.train_dataset, self.batch_size)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = step > self.burnin and ((step - self.burnin) % self.frequency == 0 or step == state.max_steps)
        if due:
            self.update(args, step, model)

    def update(self, args, step: int, model: nn.Module) -> None:
        from accelerate.utils import extract_model_from_parallel

        start = time.perf_counter()
        la = fit_laplace(extract_model_from_parallel(model), self.anchor, self.loader, self.log_prior_precisions.exp())
        for _ in range(self.num_hypersteps):  # 2.
            self.hyper_optimizer.zero_grad()
            precision = self.log_prior_precisions.exp().to(la.mean.dtype)[la.groups]
            (-la.log_marginal_likelihood(prior_precision=precision)).backward()
            self.hyper_optimizer.step()
        with torch.no_grad():
            delta_b, delta_h = self.log_prior_precisions.exp().tolist()
            value = float(
                la.log_marginal_likelihood(
                    prior_precision=self.log_prior_precisions.exp().to(la.mean.dtype)[la.groups]
                )
            )
        if not all(map(math.isfinite, (value, delta_b, delta_h))):
            raise FloatingPointError(
                f"Laplace marglik at step {step}: log marginal likelihood {value}, prior precisions "
                f"({delta_b}, {delta_h}) are not finite (the weights diverged); lower learning_rate."
            )
        args.alpha, args.beta = delta_b / self.num_examples, delta_h / self.num_examples  # 3.
        self.history.append(
            {
                "step": step,
                "log_marginal_likelihood": value,
                "backbone_prior_precision": delta_b,
                "head_prior_precision": delta_h,
                "alpha": args.alpha,
                "beta": args.beta,
                "seconds": time.perf_counter() - start,
            }
        )


class MarglikL2SPTrainer(L2SPTrainer):
    """`L2SPTrainer` whose strengths α, β are learned during training by `OnlineMarglikCallback`
    (`marglik_kwargs` go to it); `args.alpha`, `args.beta` are the initial values."""

    def __init__(self, model=None, args=None, marglik_kwargs: dict | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.marglik = OnlineMarglikCallback(
            self.anchor,
            self.train_dataset,
            **{"batch_size": self.args.per_device_train_batch_size, **(marglik_kwargs or {})},
        )
        self.add_callback(self.marglik)

    def learned_prior(self) -> dict:
        """The last update's prior precisions, their L2-SP strengths and log marginal likelihood."""
        last = self.marglik.history[-1] if self.marglik.history else {}
        return {
            "backbone_prior_precision": last.get("backbone_prior_precision", float("nan")),
            "head_prior_precision": last.get("head_prior_precision", float("nan")),
            "alpha": float(self.args.alpha),
            "beta": float(self.args.beta),
            "log_marginal_likelihood": self.marglik.log_marginal_likelihood,
            "num_hyper_updates": len(self.marglik.history),
        }


def laplace_procedure(
    init, train, common: dict, learning_rates, work_dir: str, **marglik_kwargs
) -> tuple[Trainer, dict]:
    """Laplace LA-LML: one `MarglikL2SPTrainer` run per learning rate on all N examples, α = β =
    `INITIAL_STRENGTH` at the start; the run with the highest final log marginal likelihood wins
    (no validation data, as Immer et al. select). Predictions: at the chosen run's MAP weights.
    `marglik_kwargs` go to `OnlineMarglikCallback` (marglik_frequency, num_burnin_steps, ...)."""
    args = L2SPTrainingArguments(output_dir=work_dir, alpha=INITIAL_STRENGTH, beta=INITIAL_STRENGTH, **common)
    result = learning_rate_search(
        MarglikL2SPTrainer,
        init,
        train,
        args,
        learning_rates,
        method_name="Laplace LA-LML",
        score=lambda trainer: -trainer.marglik.log_marginal_likelihood,
        learned=lambda trainer: trainer.learned_prior(),
        marglik_kwargs=marglik_kwargs,
    )
    learned = result.trainer.learned_prior()
    frequency, burnin = OnlineMarglikCallback.schedule(
        args.max_steps, marglik_kwargs.get("marglik_frequency"), marglik_kwargs.get("num_burnin_steps")
    )
    record = {
        "learning_rate": result.best["learning_rate"],
        "num_runs": len(result.runs),
        "runs": [
            {
                "learning_rate": r.settings["learning_rate"],
                "log_marginal_likelihood": -r.score,
                "seconds": r.seconds,
                "alpha": r.learned.get("alpha"),
                "beta": r.learned.get("beta"),
            }
            for r in result.runs
        ],
        **{
            k: learned[k]
            for k in (
                "backbone_prior_precision",
                "head_prior_precision",
                "alpha",
                "beta",
                "log_marginal_likelihood",
                "num_hyper_updates",
            )
        },
        "initial_alpha": INITIAL_STRENGTH,
        "initial_beta": INITIAL_STRENGTH,
        "marglik_frequency": frequency,
        "num_burnin_steps": burnin,
        "num_hypersteps": marglik_kwargs.get("num_hypersteps", NUM_HYPERSTEPS),
        "hessian": "diagonal empirical Fisher (laplace-torch CurvlinopsEF), BatchNorm in eval mode",
    }
    return result.trainer, record


# ---------------------------------------------------------------- IVON (Shen et al. 2024)

# IVON's settings, fixed: ess = N and one MC sample per step as the ivon-opt README's training loop
# (`IVON(model.parameters(), lr=0.1, ess=len(train_dataset))`, `train_samples=1`); the rest are
# ivon-opt 0.1.3's defaults (`ivon/_ivon.py`): prior precision `weight_decay` 1e-4 (a prior
# N(0, 1/(ess·weight_decay)) on every weight, centred at 0, not at μ), hess_init 1, beta1 0.9,
# beta2 0.99999, no clip_radius (the README recommends none).
IVON_SETTINGS = {
    "weight_decay": 1e-4,
    "hess_init": 1.0,
    "beta1": 0.9,
    "beta2": 0.99999,
    "mc_samples": 1,
    "clip_radius": float("inf"),
}


class IVONTrainer(L2SPTrainer):
    """Trains with `ivon.IVON` (learning rate and schedule from `args`; `args.optim`/`optim_args`
    are ignored), on the plain mean cross-entropy (`L2SPTrainer` at α = β = 0, for its forward of
    timm and transformers models); evaluation and prediction use the mean weights.

    IVON reads the gradients when `sampled_params(train=True)` exits, not at `optimizer.step()`, so:
    each micro-batch's forward and backward run inside that context on zeroed gradients, and
    Trainer's gradient clipping, which would act after IVON has read them, must be off
    (`max_grad_norm=0`; IVON's own `clip_radius` clips its update). Under gradient accumulation
    each micro-batch is one IVON sample of the micro-batch's mean gradient (Trainer's division of
    the loss by the accumulation steps is undone), and IVON averages them.
    """

    def __init__(self, model=None, args=None, ivon_settings: dict | None = None, **kwargs):
        if args is not None and (args.alpha != 0 or args.beta != 0):
            raise ValueError(
                f"IVONTrainer trains the plain cross-entropy: alpha and beta must be 0; got "
                f"{args.alpha}, {args.beta}. IVON's prior is its weight_decay (ivon_settings)."
            )
        if args is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be 0 for IVONTrainer (IVON reads the gradients before Trainer "
                f"clips them); got {args.max_grad_norm}. Use ivon_settings['clip_radius']."
            )
        self.ivon_settings = {**IVON_SETTINGS, **(ivon_settings or {})}
        super().__init__(model=model, args=args, **kwargs)

    def create_optimizer(self, model=None):
        import ivon

        if self.optimizer is None:
            parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = ivon.IVON(parameters, lr=self.args.learning_rate, **self.ivon_record())
        return self.optimizer

    @property
    def ivon(self):
        """The `ivon.IVON` instance (accelerate wraps `self.optimizer`)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        parameters = [p for group in self.ivon.param_groups for p in group["params"]]
        for p in parameters:
            p.grad = None
        with self.ivon.sampled_params(train=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
            with torch.no_grad():
                for p in parameters:
                    if p.grad is None:  # a parameter the forward did not use: IVON needs a gradient
                        p.grad = torch.zeros_like(p)
                    elif self.current_gradient_accumulation_steps > 1:
                        p.grad.mul_(self.current_gradient_accumulation_steps)
        return loss

    def ivon_record(self) -> dict:
        """IVON's arguments: `ivon_settings`, with ess = N unless they set it."""
        return {"ess": len(self.train_dataset), **self.ivon_settings}


def ivon_procedure(
    init, train, common: dict, learning_rates, work_dir: str, hess_inits=(IVON_SETTINGS["hess_init"],)
) -> tuple[Trainer, dict]:
    """IVON: one `IVONTrainer` run per learning rate and `hess_init` on all N examples
    (`IVON_SETTINGS` otherwise, ess = N, Trainer's clipping off); the lowest final training loss
    (mean cross-entropy on all N, eval mode, at the mean weights) wins, as regularization.py's
    "plain, lr by training loss". Predictions: at the chosen run's mean weights. With several
    `hess_inits` each gets its own directory under `work_dir` (`hess_init-<value>`)."""
    searches = []
    for hess_init in hess_inits:
        run_dir = work_dir if len(hess_inits) == 1 else os.path.join(work_dir, f"hess_init-{hess_init:g}")
        args = L2SPTrainingArguments(output_dir=run_dir, alpha=0.0, beta=0.0, **{**common, "max_grad_norm": 0.0})
        if hess_init == IVON_SETTINGS["hess_init"]:
            result = select_by_training_loss(IVONTrainer, init, train, args, learning_rates, "IVON")
        else:
            result = learning_rate_search(
                IVONTrainer,
                init,
                train,
                args,
                learning_rates,
                lambda trainer: trainer.evaluate(train)["eval_loss"],
                "IVON",
                ivon_settings={"hess_init": hess_init},
            )
        searches.append((hess_init, result))
    hess_init, result = min(searches, key=lambda s: min(r.score for r in s[1].runs))
    record = {
        "learning_rate": result.best["learning_rate"],
        "num_runs": sum(len(r.runs) for _, r in searches),
        "runs": [
            {
                "learning_rate": r.settings["learning_rate"],
                "training_loss": r.score,
                "seconds": r.seconds,
                **({"hess_init": h} if len(hess_inits) > 1 else {}),
            }
            for h, s in searches
            for r in s.runs
        ],
        # an infinite clip_radius (no clipping) is stored as None: JSON has no inf
        **{f"ivon_{k}": (None if v == float("inf") else v) for k, v in result.trainer.ivon_record().items()},
        "max_grad_norm": 0.0,
    }
    return result.trainer, record


# ---------------------------------------------------------------- L2-SP + Bayesian optimization

BO_BOX = {"alpha": (1e-6, 1e-2), "beta": (1e-6, 1e-2), "learning_rate": (1e-4, 1e-1)}


def bayesian_optimization(init, train, common: dict, work_dir: str, n_trials: int, seed: int, quick: bool = False):
    """L2-SP + Bayesian optimization as a transformers user runs it: `Trainer.hyperparameter_search`
    (optuna's TPE sampler, seeded) over log-uniform α, β, lr in `BO_BOX`, each trial trained on a
    stratified 80 % of N and scored by its validation NLL on the other 20 % at the last step (the
    grid search's split and score). Returns every trial (settings, validation NLL, seconds) in order.

    TPE proposes trial k from trials 0..k−1 only, so the first 12 trials of a 36-trial study are
    the 12-trial study: one study gives both procedures."""
    import optuna
    from transformers.trainer_callback import PrinterCallback

    from hf_deelbo import L2SPTrainer, L2SPTrainingArguments
    from hf_deelbo.core.validation import stratified_split

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    labels = [int(v) for v in train.with_format(None)["labels"]]
    train_idx, val_idx = stratified_split(labels, 0.2, seed)
    args = L2SPTrainingArguments(output_dir=os.path.join(work_dir, "search"), alpha=0.0, beta=0.0, **common)
    trainer = L2SPTrainer(
        model_init=init, args=args, train_dataset=train.select(train_idx), eval_dataset=train.select(val_idx)
    )
    trainer.remove_callback(PrinterCallback)  # 36 trials' metrics on stdout otherwise

    def space(trial):
        return {name: trial.suggest_float(name, low, high, log=True) for name, (low, high) in BO_BOX.items()}

    storage = optuna.storages.InMemoryStorage()
    trainer.hyperparameter_search(
        hp_space=space,
        backend="optuna",
        n_trials=n_trials,
        direction="minimize",
        storage=storage,
        study_name="l2sp",
        compute_objective=lambda metrics: metrics["eval_loss"],
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2 if quick else 10),
        catch=(FloatingPointError,),
    )
    trials = optuna.load_study(study_name="l2sp", storage=storage).trials
    return [
        {
            **t.params,
            "validation_nll": t.value if t.value is not None and math.isfinite(t.value) else float("inf"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
        }
        for t in trials
    ]
