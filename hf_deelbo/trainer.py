"""`DEELBoTrainer`: a `Trainer` that learns the L2-SP strengths with the data-emphasized ELBO."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path


import torch
import torch.nn.functional as F
from torch import nn
import safetensors.torch
from transformers import PreTrainedModel, Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_NAME
from transformers.utils import logging

from .arguments import DEELBoTrainingArguments
from .callback import DEELBoCallback
from .checks import check_training_data
from .groups import split_parameters
from .hub import (
    HubPushError,
    check_repo_namespace,
    deelbo_config,
    is_timm_wrapper,
    make_timm_wrapper_checkpoint_portable,
    push_error,
    save_timm_config,
    set_model_deelbo_config,
)
from .model_card import build_model_card
from .objective import deelbo_loss, resolve_kappa
from .plots import HYPERPARAMETERS_PLOT, plot_hyperparameters
from .posterior import IsotropicGaussianPosterior
from .prediction import classifier_logits, predictive_log_probs

logger = logging.get_logger(__name__)

# Order of the values accumulated over a logging window (one row per training micro-batch).
_WINDOW_METRICS = ("nll", "kl", "lambda", "tau", "sigma")


class DEELBoTrainer(Trainer):
    """Fine-tunes a classifier with the data-emphasized ELBO (DE ELBO).

    Drop-in replacement for [`~transformers.Trainer`] taking [`DEELBoTrainingArguments`]. Each
    training step minimises, on a minibatch B of a training set of N examples,

        mean_{i∈B} CE(f(x_i; m + σε), y_i) + KL(q ‖ p_{λ,τ}) / (κ N),    ε ~ N(0, I)

    over the weights m and ρ (σ = softplus(ρ)); after each optimizer step `DEELBoCallback` sets
    the backbone and head prior variances λ, τ to their closed-form optimum. Evaluation and
    prediction use the posterior mean m (`bma_samples=0`) or a Bayesian model average.

    Works with transformers models (`model(**inputs).logits`) and raw timm / `nn.Module`
    classifiers (`model(pixel_values)` returning logits). The learned values end up in
    `model.config.deelbo` (timm: `config.json`'s `deelbo`) in every checkpoint and saved model.
    """

    # compute_loss returns a per-micro-batch mean, so Trainer must divide by the accumulation
    # steps. Without this, models whose forward takes **kwargs (ResNet) get loss × GA.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: DEELBoTrainingArguments | None = None, **kwargs):
        if model is None:
            raise ValueError("DEELBoTrainer needs a model (model_init is not supported: μ is taken from the model).")
        if args is None:
            args = DEELBoTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, DEELBoTrainingArguments):
            raise TypeError(
                f"args must be DEELBoTrainingArguments, got {type(args).__name__}; "
                "build it with DEELBoTrainingArguments(output_dir=..., ...)."
            )
        # Validate everything the method needs before Trainer does any work.
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise ValueError(
                "The model's parameters are sharded (DTensor, e.g. by torch's fully_shard): DEELBoTrainer does not "
                "support FSDP. Pass the unsharded model and train with DDP (torchrun or accelerate launch --multi_gpu)."
            )
        groups = split_parameters(model, args.head_modules)
        num_train_examples = _resolve_num_train_examples(args, kwargs.get("train_dataset"))
        if kwargs.get("train_dataset") is not None:
            check_training_data(model, kwargs["train_dataset"], kwargs.get("data_collator"))
        super().__init__(model=model, args=args, **kwargs)

        self.posterior = IsotropicGaussianPosterior(self.model, groups, args.sigma_init)
        self.head_modules = groups.head_modules
        self.num_train_examples = num_train_examples
        self.kappa = (
            resolve_kappa(args.kappa, self.posterior.num_params, num_train_examples) if num_train_examples else None
        )
        self.add_callback(DEELBoCallback())
        self.deelbo_callback.bind(self.posterior)

        self._is_transformers_model = isinstance(self.accelerator.unwrap_model(self.model), PreTrainedModel)
        if not self.label_names:  # raw timm models have no `labels` argument to detect
            self.label_names = ["labels"]
        self._window = torch.zeros(len(_WINDOW_METRICS) + 1, dtype=torch.float64, device=self.args.device)
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool, device=self.args.device)
        self._logged_constants = False
        logger.info(
            f"DE ELBO: D_b={self.posterior.num_backbone_params:,} backbone and K={self.posterior.num_head_params:,} "
            f"head parameters (head: {self.head_modules}), N={num_train_examples}, kappa={self.kappa}"
        )

    # ---- wiring -------------------------------------------------------------------------------

    @property
    def deelbo_callback(self) -> DEELBoCallback:
        """The installed `DEELBoCallback` (Trainer replaces the instance when resuming)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DEELBoCallback):
                return callback
        raise RuntimeError("DEELBoCallback was removed from the trainer; DEELBoTrainer cannot train without it.")

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        self.deelbo_callback.bind(self.posterior)

    def _restore_weights(self, checkpoint: str) -> bool:
        """Load a checkpoint's weights into the model exactly (strict). False if not applicable."""
        weights_file = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not os.path.isfile(weights_file):
            return False
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PreTrainedModel):
            # save_pretrained may write legacy key names (ViT: `encoder.layer.0.attention.attention.query`)
            # that Trainer's load_state_dict(strict=False) silently skips, so resuming would keep the
            # fresh weights (transformers issue 43701). from_pretrained converts the names.
            state_dict = type(model).from_pretrained(checkpoint, config=model.config).state_dict()
        else:
            state_dict = safetensors.torch.load_file(weights_file, device="cpu")
        model.load_state_dict(state_dict, strict=True)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._restore_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if not self._restore_weights(checkpoint):
            super()._load_best_model()
            return
        # The posterior and prior variances of the best checkpoint go with its weights.
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        saved = state.stateful_callbacks.get(DEELBoCallback.__name__, {}).get("attributes", {})
        callback = self.deelbo_callback
        for name, value in saved.items():
            setattr(callback, name, value)
        callback.bind(self.posterior)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and not self._is_transformers_model:
            # timm's forward(x) names no dataset column; it is fed `pixel_values`.
            self._signature_columns = ["pixel_values", "label", "label_ids", *self.label_names]
        super()._set_signature_columns_if_needed()

    def create_optimizer(self, model=None):
        """Trainer's optimizer, plus a group for ρ (same learning rate, no weight decay)."""
        optimizer = super().create_optimizer(model)
        rho = self.posterior.rho
        if not any(p is rho for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": [rho], "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        # Trainer clips model.parameters() only; the method clips the joint gradient including ρ.
        if self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        parameters = itertools.chain(model.parameters(), [self.posterior.rho])
        return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_loss |= ~torch.isfinite(loss)  # no device sync here; checked once per step
        rho = self.posterior.rho
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients and rho.grad is not None:
            # ρ lives outside the DDP module, so its gradient is not all-reduced by DDP.
            torch.distributed.all_reduce(rho.grad)
            rho.grad /= self.accelerator.num_processes
        return loss

    # ---- the objective ------------------------------------------------------------------------

    def _forward(self, model: nn.Module, inputs: dict, parameters: dict | None = None) -> torch.Tensor:
        return classifier_logits(model, inputs, parameters, self._is_transformers_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DE ELBO loss of one micro-batch, at one fresh draw w̃ = m + σε:

            loss = mean_i CE(f(x_i; w̃), y_i) + KL(q ‖ p_{λ,τ}) / (κ N)

        λ, τ are fixed here (set by `DEELBoCallback` after each optimizer step).
        """
        if self.num_train_examples is None:
            raise ValueError(_MISSING_N_MESSAGE)
        labels = inputs[self.label_names[0]]
        logits = self._forward(model, inputs, self.posterior.sample_parameters(model))
        nll = F.cross_entropy(logits.float(), labels)
        callback = self.deelbo_callback
        kl = self.posterior.kl(callback.backbone_prior_variance, callback.head_prior_variance)
        loss = deelbo_loss(nll, kl, self.kappa, self.num_train_examples).float()
        if model.training:
            with torch.no_grad():
                row = torch.stack([
                    nll.detach().double(),
                    kl.detach(),
                    torch.tensor(callback.backbone_prior_variance, dtype=torch.float64, device=kl.device),
                    torch.tensor(callback.head_prior_variance, dtype=torch.float64, device=kl.device),
                    self.posterior.sigma().detach().double(),
                    torch.ones((), dtype=torch.float64, device=kl.device),
                ])
                self._window += row.to(self._window.device)
        return (loss, logits) if return_outputs else loss

    # ---- prediction ---------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation at the posterior mean (or BMA); the loss is the mean NLL of the batch and the
        returned logits are log predictive probabilities when averaging."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get(self.label_names[0])
        with torch.no_grad(), self.compute_loss_context_manager():
            if self.args.bma_samples == 0:
                logits = self._forward(model, inputs).float()
                log_probs = F.log_softmax(logits, dim=-1)
            else:
                # Draws from a generator seeded with args.seed: evaluation never consumes the
                # training noise stream, and repeated evaluations agree.
                logits = log_probs = predictive_log_probs(
                    model, inputs, self.posterior, self.args.bma_samples, self.args.seed, self._is_transformers_model
                )
        loss = F.nll_loss(log_probs, labels).detach() if labels is not None else None
        if prediction_loss_only:
            return loss, None, None
        return loss, logits.detach(), labels

    # ---- logging and saving -------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the window averages of `nll`, `kl`, `lambda`, `tau`, `sigma` to training logs, and
        `kappa`, `num_backbone_params`, `num_head_params`, `num_train_examples` to the first one."""
        if "loss" in logs:
            window = self._window
            if self.accelerator.num_processes > 1:
                window = self.accelerator.reduce(window.clone(), reduction="sum")
            count = float(window[-1])
            if count > 0:
                for name, value in zip(_WINDOW_METRICS, (window[:-1] / count).tolist()):
                    logs[name] = value
            self._window.zero_()
            if not self._logged_constants:
                logs.update(
                    kappa=float(self.kappa),
                    num_backbone_params=self.posterior.num_backbone_params,
                    num_head_params=self.posterior.num_head_params,
                    num_train_examples=self.num_train_examples,
                )
                self._logged_constants = True
        super().log(logs, start_time)

    def learned_hyperparameters(self) -> dict:
        """The `config.deelbo` dict for the current state: λ, τ, σ, κ, N, D_b, K, α_eff, β_eff."""
        callback = self.deelbo_callback
        return deelbo_config(
            backbone_prior_variance=callback.backbone_prior_variance,
            head_prior_variance=callback.head_prior_variance,
            sigma=self.posterior.sigma().item(),
            kappa=self.kappa if self.kappa is not None else float("nan"),
            num_train_examples=self.num_train_examples or 0,
            num_backbone_params=self.posterior.num_backbone_params,
            num_head_params=self.posterior.num_head_params,
            head_modules=self.head_modules,
        )

    def _write_deelbo_config(self) -> None:
        set_model_deelbo_config(self.accelerator.unwrap_model(self.model), self.learned_hyperparameters())

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Runs after every optimizer step and before any checkpoint is written, so a diverged
        # run stops before it can overwrite the last good checkpoint.
        callback = self.deelbo_callback
        values = (callback.backbone_prior_variance, callback.head_prior_variance)
        if bool(self._nonfinite_loss) or not all(math.isfinite(v) for v in values):
            raise FloatingPointError(
                f"DE ELBO diverged at step {self.state.global_step}: the loss or the weights are no longer finite "
                f"(lambda={values[0]}, tau={values[1]}). Lower learning_rate (now {self._get_learning_rate()}), "
                f"or check kappa ({self.kappa}) and the data. The last checkpoint saved before this step is intact."
            )
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def train(self, *args, **kwargs):
        if self.num_train_examples is None:
            raise ValueError(_MISSING_N_MESSAGE)
        output = super().train(*args, **kwargs)
        self._write_deelbo_config()
        return output

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes README.md (the DE ELBO model card, tagged `deelbo`) and the plot of λ, τ, σ over
        training into `output_dir`; `push_to_hub` uploads both with the model."""
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        plot = HYPERPARAMETERS_PLOT if plot_hyperparameters(
            self.state.log_history, os.path.join(output_dir, HYPERPARAMETERS_PLOT)
        ) else None
        unwrapped = self.accelerator.unwrap_model(self.model)
        if finetuned_from is None:
            finetuned_from = getattr(getattr(unwrapped, "config", None), "_name_or_path", None) or None
        evaluations = [entry for entry in self.state.log_history if "eval_loss" in entry]
        eval_results = {
            ("nll" if k == "eval_loss" else k.removeprefix("eval_")): v
            for k, v in (evaluations[-1] if evaluations else {}).items()
            if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(("runtime", "per_second"))
        }
        args = self.args
        hyperparameters = {
            "learning_rate": args.learning_rate,
            "optimizer": str(getattr(args.optim, "value", args.optim)) + (f" ({args.optim_args})" if args.optim_args else ""),
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "train_batch_size": args.per_device_train_batch_size * max(1, args.world_size),
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "optimizer_steps": self.state.global_step,
            "max_grad_norm": args.max_grad_norm,
            "seed": args.seed,
        }
        card = build_model_card(
            self.learned_hyperparameters(),
            model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            library_name="transformers" if self._is_transformers_model else "timm",
            base_model=finetuned_from,
            dataset=dataset if isinstance(dataset, str) else None,
            eval_results=eval_results,
            hyperparameters=hyperparameters,
            plot=plot,
            repo_id=self.hub_model_id or args.hub_model_id,
            extra_tags=([tags] if isinstance(tags, str) else list(tags or []))
            + (["timm"] if not self._is_transformers_model or is_timm_wrapper(unwrapped) else []),
        )
        card.save(os.path.join(output_dir, "README.md"))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self._write_deelbo_config()
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_timm_wrapper(unwrapped):
            make_timm_wrapper_checkpoint_portable(unwrapped, output_dir)
        elif not self._is_transformers_model and isinstance(getattr(unwrapped, "pretrained_cfg", None), dict):
            save_timm_config(unwrapped, output_dir)

    # ---- the Hub ------------------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates the Hub repo (Trainer does this when the trainer is built with push_to_hub=True),
        with one clear error when the repo id lacks a namespace nobody can supply, or the Hub is
        unreachable or refuses."""
        if not self.is_world_process_zero():
            return
        token = token if token is not None else self.args.hub_token
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.args.hub_model_id = check_repo_namespace(name, token)
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # noqa: BLE001 - reported as one HubPushError, cause attached
            raise push_error(error, self.args.output_dir, self.args.hub_model_id) from error

    def push_to_hub(self, *args, **kwargs):
        """Trainer's push (weights, config.json with `deelbo`, model card, plot); a failure raises
        one `HubPushError` and leaves the local output directory as it was."""
        try:
            return super().push_to_hub(*args, **kwargs)
        except HubPushError:
            raise
        except Exception as error:  # noqa: BLE001 - reported as one HubPushError, cause attached
            raise push_error(error, self.args.output_dir, self.hub_model_id or self.args.hub_model_id) from error


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
