"""`DEELBoTrainer`: a `Trainer` that learns the L2-SP strengths with the data-emphasized ELBO."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ...core.modeling import batch_norm_layers, recompute_batch_norm_statistics
from ...core.trainer import FineTuningTrainer
from ...evaluation.plots import HYPERPARAMETERS_PLOT, plot_hyperparameters
from ...hub import model_card as cards
from .arguments import DEELBoTrainingArguments
from .callback import DEELBoCallback
from .config import DEELBO, DEELBoConfig
from .objective import deelbo_loss, max_prior_pull, resolve_kappa, sigma_for_prior_pull
from .optimization import CombinedOptimizer, diagonal_rho_optimizer
from .posterior import POSTERIOR_RHO_NAME, GaussianPosterior
from .prediction import predictive_log_probs
from .sampling import in_place_supported

logger = logging.get_logger(__name__)

# DE ELBO's card lays out the learned values with their meaning (hub's generic card tabulates them).
MODEL_CARD_TEMPLATE = Path(__file__).parent / "model_card_template.md"

# A run whose σ ends below this multiple of sigma_init was held by the prior (`_warn_if_sigma_stayed_at_init`).
PINNED_SIGMA_FACTOR = 3.0


class DEELBoTrainer(FineTuningTrainer):
    """Fine-tunes a classifier with the data-emphasized ELBO (DE ELBO).

    Drop-in replacement for [`~transformers.Trainer`] taking [`DEELBoTrainingArguments`]. Each
    training step minimises, on a minibatch B of a training set of N examples,

        mean_{i∈B} CE(f(x_i; m + σε), y_i) + KL(q ‖ p_{λ,τ}) / (κ N),    ε ~ N(0, I)

    over the weights m and ρ (σ = softplus(ρ)), with the backbone and head prior variances λ, τ
    at their closed-form optimum for the current m and σ: recomputed in the first `compute_loss`
    after each optimizer step, from the squared distances the KL needs anyway, and kept (with ρ,
    across checkpoints) by `DEELBoCallback`. Evaluation and prediction use the posterior mean m
    (`bma_samples=0`) or a Bayesian model average.

    Works with transformers models (`model(**inputs).logits`) and raw timm / `nn.Module`
    classifiers (`model(pixel_values)` returning logits). The learned values end up in
    `model.config.deelbo` (timm: `config.json`'s `deelbo`) in every checkpoint and saved model.
    """

    args_class = DEELBoTrainingArguments
    method = DEELBO
    callback_class = DEELBoCallback
    logged_metrics = ("nll", "kl", "lambda", "tau", "sigma")

    def __init__(self, model: nn.Module | None = None, args: DEELBoTrainingArguments | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        args = self.args
        args.sampling_mechanism = resolve_sampling_mechanism(args.sampling_mechanism, args.device)
        self.posterior = GaussianPosterior(
            self.model, self.groups, args.sigma_init, args.prior_variance_grouping, args.posterior_covariance
        )
        self.num_train_examples = _resolve_num_train_examples(args, self.train_dataset)
        self.kappa = (
            resolve_kappa(args.kappa, self.posterior.num_params, self.num_train_examples)
            if self.num_train_examples
            else None
        )
        self.install_method_callback(self.posterior)
        self._draw = None  # the pending InPlaceDraw of the current micro-batch (sampling_mechanism="in_place")
        self._logged_constants = False
        if self.kappa is not None:
            pull = max_prior_pull(
                args.sigma_init, self.posterior.num_backbone_params, self.kappa, self.num_train_examples
            )
            if pull > 4.0:
                suggested = sigma_for_prior_pull(
                    1.0, self.posterior.num_backbone_params, self.kappa, self.num_train_examples
                )
                logger.info(
                    f"sigma_init={args.sigma_init:g} lets the prior hold the backbone back with a gradient norm up to "
                    f"{pull:.3g} (√D_b/(2κNσ); about 1 on the paper's ResNet-50) until σ grows, so a run of only tens "
                    f"of steps may leave the backbone near its pretrained weights; sigma_init={suggested:.2g} would start "
                    f"at 1. σ grows at sigma_learning_rate={args.sigma_learning_rate}; DEELBoTrainer warns at the end of "
                    "training if it never did (docs/method.md, 'Initial σ')."
                )
        logger.info(
            f"DE ELBO: D_b={self.posterior.num_backbone_params:,} backbone and K={self.posterior.num_head_params:,} "
            f"head parameters (head: {self.head_modules}), N={self.num_train_examples}, kappa={self.kappa}"
        )

    def _check_before_init(self, args, kwargs) -> None:
        _resolve_num_train_examples(args, kwargs.get("train_dataset"))

    def _check_model_before_init(self, model, groups, args) -> None:
        check_sigma_init(model, groups.backbone, args.sigma_init)

    # ---- wiring -------------------------------------------------------------------------------

    @property
    def deelbo_callback(self) -> DEELBoCallback:
        """The installed `DEELBoCallback` (Trainer replaces the instance when resuming)."""
        return self.method_callback

    def create_optimizer(self, model=None):
        """Trainer's optimizer, plus a group for ρ: no weight decay, learning rate
        `sigma_learning_rate` (`learning_rate` if None), scaled by the same schedule; under SGD,
        `sigma_momentum` (Nesterov) if set. A diagonal posterior's ρ (one ρ_i per weight) gets an
        Adam of its own at `diagonal_sigma_learning_rate` instead (`optimization.py` says why),
        stepped with Trainer's optimizer as one (`CombinedOptimizer`), on the same schedule."""
        optimizer = super().create_optimizer(model)
        rho = self.posterior.rho
        if self.posterior.diagonal and self.args.diagonal_sigma_learning_rate is not None:
            if not isinstance(optimizer, CombinedOptimizer):
                self.optimizer = CombinedOptimizer(
                    [optimizer, diagonal_rho_optimizer(rho, self.args.diagonal_sigma_learning_rate)]
                )
            return self.optimizer
        if not any(p is rho for group in optimizer.param_groups for p in group["params"]):
            group = {"params": [rho], "weight_decay": 0.0}
            if self.args.sigma_learning_rate is not None:
                group["lr"] = self.args.sigma_learning_rate
                if self.args.sigma_momentum is not None and isinstance(optimizer, torch.optim.SGD):
                    momentum = self.args.sigma_momentum
                    group.update(momentum=momentum, nesterov=momentum > 0, dampening=0.0)
            optimizer.add_param_group(group)
            self._schedule_rho_with_user_scheduler(optimizer, group)
        return optimizer

    def _schedule_rho_with_user_scheduler(self, optimizer, group: dict) -> None:
        """A scheduler passed in `optimizers=(optimizer, scheduler)` was built before ρ's group
        existed, and torch's schedulers step exactly the groups they saw (a new one makes their
        next step fail). transformers' schedules are `LambdaLR`s: ρ's group joins it with the
        first group's multiplier, lr_ρ(t) = lr_ρ × λ_0(t), as when Trainer builds the schedule.
        Any other scheduler cannot be extended safely: refused before the first step."""
        scheduler = self.lr_scheduler
        if scheduler is None:  # Trainer builds it next, from the optimizer with ρ's group
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.optimizer is optimizer:
            group.setdefault("initial_lr", group["lr"])
            scheduler.base_lrs.append(group["initial_lr"])
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[0](scheduler.last_epoch)
            return
        raise ValueError(
            f"optimizers: DEELBoTrainer adds a parameter group for ρ (σ = softplus(ρ)) to the optimizer, but the "
            f"scheduler passed with it ({type(scheduler).__name__}) was built for the optimizer's groups before that "
            "and cannot step the new one. Pass `optimizers=(optimizer, None)` (Trainer then builds "
            "`lr_scheduler_type`'s schedule for every group), `optimizer_cls_and_kwargs=(optimizer_class, kwargs)`, "
            "or a torch.optim.lr_scheduler.LambdaLR (what transformers.get_scheduler returns), which ρ's group joins."
        )

    def _clip_grad_norm(self, model):
        # Trainer clips model.parameters() only; the method clips the joint gradient including ρ.
        if self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        parameters = itertools.chain(model.parameters(), [self.posterior.rho])
        return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._draw is not None:
                self._draw.finish()  # dL/dρ, the weights back at m, the KL's gradients to m
        finally:
            if self._draw is not None:
                self._draw.restore()  # only if the step failed before finish()
                self._draw = None
        rho = self.posterior.rho
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients and rho.grad is not None:
            # ρ lives outside the DDP module, so its gradient is not all-reduced by DDP.
            torch.distributed.all_reduce(rho.grad)
            rho.grad /= self.accelerator.num_processes
        return loss

    # ---- the objective ------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DE ELBO loss of one micro-batch, at one fresh draw w̃ = m + σε:

            loss = mean_i CE(f(x_i; w̃), y_i) + KL(q ‖ p_{λ,τ}) / (κ N)

        λ, τ are fixed here: λ*, τ* of the current m and σ, which `DEELBoCallback` recomputes once
        per optimizer step from the squared distances the KL needs anyway. With
        `prior_variance_grouping="layer"`, λ is one λ_l per backbone tensor, KL_b = Σ_l KL_l, and
        the logged `lambda` is their harmonic mean λ̄ = D_b / Σ_l (D_l/λ_l). With
        `posterior_covariance="diagonal"`, w̃ = m + σ ⊙ ε with one σ_i per weight, the KL is the
        diagonal one (`objective.diagonal_gaussian_kl`) and the logged `sigma` is the root mean
        square √(Σ_i σ_i²/D).
        """
        if self.num_train_examples is None:
            raise ValueError(_MISSING_N_MESSAGE)
        labels = inputs[self.label_names[0]]
        if self.args.sampling_mechanism == "in_place":
            logits, distances = self._forward_in_place(model, inputs)
        else:
            logits = self._forward(model, inputs, self.posterior.sample_parameters(model), tie_weights=False)
            distances = self.posterior.squared_distances()
        nll = F.cross_entropy(logits.float(), labels)
        lam, tau = self.deelbo_callback.prior_variances(distances)  # read under no_grad, kept on the device
        kl = self.posterior.kl(lam, tau, distances)
        loss = deelbo_loss(nll, kl, self.kappa, self.num_train_examples).float()
        if model.training:
            mean_lam = self.posterior.mean_backbone_prior_variance(lam)
            self.metrics.record(
                nll=nll, kl=kl, sigma=self.posterior.root_mean_square_sigma(), **{"lambda": mean_lam, "tau": tau}
            )
        return (loss, logits) if return_outputs else loss

    def _forward_in_place(self, model, inputs):
        """The logits at w̃ = m + σε written into the weights (`InPlaceDraw`), and the squared distances
        at m. With gradients enabled the draw stays pending until `training_step` finishes it after
        the backward pass; without, the weights are restored at once."""
        if self._draw is not None and self._draw.pending:
            raise RuntimeError(
                "compute_loss was called again before the previous in-place draw was finished: with "
                "sampling_mechanism='in_place' each loss must go through training_step (which runs backward and "
                "restores the weights) before the next one."
            )
        draw = self.posterior.perturb_in_place(model)
        try:
            logits = self._forward(model, inputs)
        except BaseException:
            draw.restore()
            raise
        if torch.is_grad_enabled():
            self._draw = draw
        else:
            draw.restore()
        return logits, draw.squared_distances

    # ---- prediction ---------------------------------------------------------------------------

    def _prediction_logits(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The logits at the posterior mean (`bma_samples=0`), or the log of the average of the
        predictive distributions of `bma_samples` draws, from a generator seeded with `args.seed`
        (evaluation never consumes the training noise stream, and repeated evaluations agree)."""
        if self.args.bma_samples == 0:
            return super()._prediction_logits(model, inputs)
        return predictive_log_probs(
            model, inputs, self.posterior, self.args.bma_samples, self.args.seed, self._is_transformers_model
        )

    # ---- logging and saving -------------------------------------------------------------------

    def logged_values(self, logs: dict) -> dict:
        """`kappa`, `num_backbone_params`, `num_head_params`, `num_train_examples` in the first
        training log (the window means of `nll`, `kl`, `lambda`, `tau`, `sigma` are in every one)."""
        if "loss" not in logs or self._logged_constants:
            return {}
        self._logged_constants = True
        return dict(
            kappa=float(self.kappa),
            num_backbone_params=self.posterior.num_backbone_params,
            num_head_params=self.posterior.num_head_params,
            num_train_examples=self.num_train_examples,
        )

    def learned_hyperparameters(self) -> dict:
        """The `config.deelbo` dict for the current state (`method_config().to_dict()`): λ, τ, σ, κ,
        N, D_b, K, α_eff, β_eff, the grouping of λ and, with "layer" grouping, every λ_l by tensor
        name (`lambda` is then their harmonic mean λ̄), and the posterior's covariance (with
        "diagonal", `sigma` is the root mean square of the σ_i)."""
        return self.method_config().to_dict()

    def method_config(self) -> DEELBoConfig:
        """The typed `config.deelbo` entry for the current state."""
        callback = self.deelbo_callback
        lam, per_tensor = callback.backbone_prior_variance, None
        if self.posterior.layer_wise:
            per_tensor = dict(zip(self.posterior.backbone_group_names, lam, strict=True))
            lam = float(self.posterior.mean_backbone_prior_variance(lam))
        return DEELBoConfig.from_learned(
            backbone_prior_variance=lam,
            head_prior_variance=callback.head_prior_variance,
            prior_variance_grouping=self.posterior.prior_variance_grouping,
            backbone_prior_variances=per_tensor,
            posterior_covariance=self.posterior.posterior_covariance,
            sigma=self.posterior.root_mean_square_sigma().item(),
            kappa=self.kappa if self.kappa is not None else float("nan"),
            num_train_examples=self.num_train_examples or 0,
            num_backbone_params=self.posterior.num_backbone_params,
            num_head_params=self.posterior.num_head_params,
            head_modules=self.head_modules,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model as `FineTuningTrainer` saves it, plus, for a diagonal posterior, its ρ by parameter
        name in `POSTERIOR_RHO_NAME` (in every checkpoint, where resume reads it back bit for bit, and
        next to a saved model's weights, for `posterior_from_config`)."""
        super()._save(output_dir, state_dict)
        if self.posterior.diagonal and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            safetensors.torch.save_file(
                {k: v.cpu() for k, v in self.posterior.rho_pieces().items()},
                os.path.join(output_dir, POSTERIOR_RHO_NAME),
                metadata={"format": "pt"},
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The checkpoint's weights, and a diagonal posterior's ρ from its `POSTERIOR_RHO_NAME` (a scalar ρ
        is in the callback's JSON state instead)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.posterior.diagonal:
            return
        path = os.path.join(resume_from_checkpoint, POSTERIOR_RHO_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"{resume_from_checkpoint} holds no {POSTERIOR_RHO_NAME} (it was not saved with "
                "posterior_covariance='diagonal'): every σ_i starts from the checkpoint's σ, or sigma_init."
            )
            return
        self.posterior.load_rho_pieces(safetensors.torch.load_file(path, device=str(self.posterior.rho.device)))

    @torch.no_grad()
    def training_objective(self, dataset=None, num_samples: int = 10) -> float:
        """The DE ELBO objective at the current q, on `dataset` (default: the training set; pass it
        without augmentation), with the model in eval mode (BatchNorm aside, below):

            (1/S) Σ_s mean_i CE(f(x_i; m + σε_s), y_i) + KL(q ‖ p_{λ*,τ*}) / (κ N)

        One draw ε_s is shared by every example, from a generator seeded with `args.seed + s`. The
        paper picks the learning rate whose run has the lowest value (S = 10). BatchNorm layers
        normalize with each batch's statistics unless `args.objective_batch_norm="running"`; their
        running statistics are left as they are."""
        dataset = dataset if dataset is not None else self.train_dataset
        model = self.model
        device = self.posterior.rho.device
        batches = [self._prepare_inputs(batch) for batch in self.get_eval_dataloader(dataset)]
        batch_norms = batch_norm_layers(model) if self.args.objective_batch_norm == "batch" else []
        if batch_norms:
            batches = _without_single_example_batch(batches, self.label_names[0])
        was_training = model.training
        model.eval()
        # In training mode without tracking, BatchNorm (torch's and timm's) normalizes with the
        # batch's statistics and leaves its running statistics and counter as they are.
        for m in batch_norms:
            m.train()
            m.track_running_stats = False
        try:
            nlls = []
            for s in range(num_samples):
                generator = torch.Generator(device=device).manual_seed(self.args.seed + s)
                parameters = self.posterior.sample_parameters(model, generator)
                total, count = 0.0, 0
                for batch in batches:
                    with self.compute_loss_context_manager():
                        logits = self._forward(model, batch, parameters, tie_weights=False).float()
                    labels = batch[self.label_names[0]]
                    total += float(F.cross_entropy(logits, labels, reduction="sum"))
                    count += len(labels)
                nlls.append(total / count)
        finally:
            model.train(was_training)
            for m in batch_norms:
                m.track_running_stats = True
        callback = self.deelbo_callback
        kl = float(self.posterior.kl(callback.backbone_prior_variance, callback.head_prior_variance))
        return deelbo_loss(sum(nlls) / len(nlls), kl, self.kappa, self.num_train_examples)

    def _divergence_details(self) -> str | None:
        callback = self.deelbo_callback
        lam, tau = callback.backbone_prior_variance, callback.head_prior_variance
        if isinstance(lam, list):  # layer-wise λ_l: name the tensors whose λ_l is not finite
            bad = {
                name: v
                for name, v in zip(self.posterior.backbone_group_names, lam, strict=True)
                if not math.isfinite(v)
            }
            if not bad and math.isfinite(tau):
                return None
            return f"lambda of {bad or 'every tensor finite'}, tau={tau}"
        if math.isfinite(lam) and math.isfinite(tau):
            return None
        return f"lambda={lam}, tau={tau}"

    def _divergence_hint(self) -> str:
        return f", or check kappa ({self.kappa})"

    def train(self, *args, **kwargs):
        if self.num_train_examples is None:
            raise ValueError(_MISSING_N_MESSAGE)
        output = super().train(*args, **kwargs)
        self._warn_if_sigma_stayed_at_init()
        if self.args.recompute_batch_norm:
            self.recompute_batch_norm()
        return output

    def recompute_batch_norm(self, dataset=None) -> int:
        """Recompute the BatchNorm running statistics at the posterior mean m: one pass over
        `dataset` (default: the training set, as the training dataloader serves it). During
        training the statistics average the draws w̃ = m + σε, not m, at which the model predicts.
        Returns the number of layers recomputed (0 for a model without BatchNorm)."""
        model = self.model
        loader = self.get_train_dataloader() if dataset is None else self.get_eval_dataloader(dataset)
        layers = recompute_batch_norm_statistics(
            model, loader, lambda batch: self._forward(model, self._prepare_inputs(batch))
        )
        if layers:
            logger.info(f"Recomputed the running statistics of {layers} BatchNorm layers at the posterior mean.")
        return layers

    def _warn_if_sigma_stayed_at_init(self) -> None:
        """One warning when σ ends the run below `PINNED_SIGMA_FACTOR` × `sigma_init`: λ* ≥ σ²
        then stays tiny, the prior's pull on the backbone (α_eff = 1/(Dλ)) stays huge, and the
        model may end up worse than plain fine-tuning with the same arguments."""
        sigma, sigma_init = self.posterior.root_mean_square_sigma().item(), self.args.sigma_init
        if sigma >= PINNED_SIGMA_FACTOR * sigma_init or not self.is_world_process_zero():
            return
        learned = self.learned_hyperparameters()
        name, rho_lr = "sigma_learning_rate", self.args.sigma_learning_rate
        if self.posterior.diagonal and self.args.diagonal_sigma_learning_rate is not None:
            name, rho_lr = "diagonal_sigma_learning_rate", self.args.diagonal_sigma_learning_rate
        now = f"{rho_lr:g}" if rho_lr is not None else f"None, i.e. learning_rate={self.args.learning_rate:g}"
        logger.warning(
            f"σ ended the run at {sigma:.3g}, less than {PINNED_SIGMA_FACTOR:g}× sigma_init={sigma_init:g} after "
            f"{self.state.global_step} steps: the posterior never widened, so the learned prior (λ={learned['lambda']:.3g}, "
            f"α_eff={learned['alpha_eff']:.3g}) held the backbone near its pretrained weights, and the model may be "
            f"worse than plain fine-tuning. Raise {name} (now {now}) or train longer "
            "(docs/trainer.md, 'Using your own optimizer')."
        )

    def build_model_card(self, output_dir: str | None = None, **context):
        """The DE ELBO model card (tagged `deelbo`), with the plot of λ, τ, σ over training written
        next to it (in `output_dir`); `save_model` and `push_to_hub` write both with the model."""
        plot = (
            HYPERPARAMETERS_PLOT
            if plot_hyperparameters(
                self.state.log_history, os.path.join(output_dir or self.args.output_dir, HYPERPARAMETERS_PLOT)
            )
            else None
        )
        return cards.build_model_card(
            self.method,
            self.learned_hyperparameters(),
            template_path=MODEL_CARD_TEMPLATE,
            usage_comment="learned λ, τ, σ, κ",
            plot=plot,
            **context,
        )


def resolve_sampling_mechanism(requested: str, device: torch.device | str) -> str:
    """The sampling mechanism a run on `device` uses: `requested`, except "in_place" on a device torch
    gives no default random generator for (the draw replays ε from it), which falls back to
    "functional_call" with one warning, when the trainer is built."""
    if requested == "in_place" and not in_place_supported(device):
        logger.warning(
            f"sampling_mechanism='in_place' needs a default random generator on {device}, which torch does "
            "not give; using sampling_mechanism='functional_call' (w̃ as a separate copy of the weights)."
        )
        return "functional_call"
    return requested


def _without_single_example_batch(batches: list[dict], label_name: str) -> list[dict]:
    """Batch statistics need two examples: a last batch of one joins the batch before it."""
    if len(batches[-1][label_name]) > 1:
        return batches
    if len(batches) == 1:
        raise ValueError(
            "training_objective with objective_batch_norm='batch' needs at least 2 examples to compute BatchNorm "
            "statistics; got 1. Set DEELBoTrainingArguments(objective_batch_norm='running')."
        )
    *rest, previous, last = batches
    return [
        *rest,
        {
            key: torch.cat([value, last[key]]) if isinstance(value, torch.Tensor) else value
            for key, value in previous.items()
        },
    ]


_MISSING_N_MESSAGE = (
    "The training set size N is unknown: train_dataset has no length. "
    "Set DEELBoTrainingArguments(num_train_examples=N)."
)


def _resolve_num_train_examples(args: DEELBoTrainingArguments, train_dataset) -> int | None:
    if args.num_train_examples is not None:
        return args.num_train_examples
    if train_dataset is None:
        return None
    try:
        size = len(train_dataset)
    except TypeError:
        raise ValueError(_MISSING_N_MESSAGE) from None
    if size == 0:
        raise ValueError("train_dataset is empty (0 examples); DE ELBO needs N > 0 training examples.")
    return size


def check_sigma_init(model: nn.Module, backbone_names: list[str], sigma_init: float) -> None:
    """Refuse a posterior standard deviation larger than the backbone's typical weight (its root
    mean square): every draw m + σε would then bury the pretrained weights in noise, and the run
    ends at chance accuracy while exiting normally. The paper's 1e-4 is far below any network's."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        squares = sum(float(parameters[n].detach().float().pow(2).sum()) for n in backbone_names)
        count = sum(parameters[n].numel() for n in backbone_names)
    if not count:
        return
    rms = (squares / count) ** 0.5
    if sigma_init > rms:
        raise ValueError(
            f"sigma_init={sigma_init:g} is larger than the backbone's weights themselves (root mean square {rms:.3g}): "
            "every posterior draw would bury the pretrained weights in noise. Use a value well below it (the paper "
            "uses 1e-4)."
        )
