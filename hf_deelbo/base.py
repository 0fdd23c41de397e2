"""What every fine-tuning trainer of the package shares, whatever its regularizer: the
backbone/head split, checks before any work, forward passes for transformers and timm models,
exact checkpoint restore, prediction at the current weights, and saving/pushing the
hyperparameters in the model's config."""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_NAME

from .checks import check_training_data
from .groups import split_parameters
from .hub import (
    HubPushError,
    check_repo_namespace,
    is_timm_wrapper,
    make_timm_wrapper_checkpoint_portable,
    push_error,
    save_timm_config,
    set_model_config_entry,
)
from .model_card import build_method_card
from .prediction import classifier_logits


class FineTuningTrainer(Trainer):
    """Base of `DEELBoTrainer` and `L2SPTrainer`; not used directly.

    Subclasses set `args_class` (their arguments dataclass, which has `head_modules`) and
    `config_key` (the entry of config.json their hyperparameters go to), and implement
    `config_entry()`.
    """

    args_class: type = None
    config_key: str = None
    # The model card's title for the method and its BibTeX entry.
    method_name: str = None
    citation: str = None

    # compute_loss returns a per-micro-batch mean, so Trainer must divide by the accumulation
    # steps. Without this, models whose forward takes **kwargs (ResNet) get loss × GA.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args=None, **kwargs):
        name = type(self).__name__
        if model is None:
            raise ValueError(f"{name} needs a model (model_init is not supported: the prior mean is taken from it).")
        if args is None:
            args = self.args_class(output_dir="trainer_output")
        if not isinstance(args, self.args_class):
            raise TypeError(
                f"args must be {self.args_class.__name__}, got {type(args).__name__}; "
                f"build it with {self.args_class.__name__}(output_dir=..., ...)."
            )
        # Everything is validated before Trainer does any work (it creates output_dir and Hub repos).
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise ValueError(
                f"The model's parameters are sharded (DTensor, e.g. by torch's fully_shard): {name} does not "
                "support FSDP. Pass the unsharded model and train with DDP (torchrun or accelerate launch --multi_gpu)."
            )
        groups = split_parameters(model, args.head_modules)
        self._check_before_init(args, kwargs)
        if kwargs.get("train_dataset") is not None:
            check_training_data(model, kwargs["train_dataset"], kwargs.get("data_collator"))
        super().__init__(model=model, args=args, **kwargs)
        self.groups = groups
        self.head_modules = groups.head_modules
        self._is_transformers_model = isinstance(self.accelerator.unwrap_model(self.model), PreTrainedModel)
        if not self.label_names:  # raw timm models have no `labels` argument to detect
            self.label_names = ["labels"]
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool, device=self.args.device)

    def installed_callback(self, callback_class: type):
        """The installed instance of `callback_class` (Trainer builds a new one when resuming)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, callback_class):
                return callback
        raise RuntimeError(
            f"{callback_class.__name__} was removed from the trainer; {type(self).__name__} cannot train without it."
        )

    def _window_means(self, window: torch.Tensor) -> list[float] | None:
        """Means of the rows accumulated over a logging window (sums, with the row count last),
        summed over processes; the window is cleared. None when the window is empty."""
        total = self.accelerator.reduce(window.clone(), reduction="sum") if self.accelerator.num_processes > 1 else window
        means = (total[:-1] / total[-1]).tolist() if float(total[-1]) > 0 else None
        window.zero_()
        return means

    def _check_before_init(self, args, kwargs) -> None:
        """Subclass hook: more validation before Trainer's __init__."""

    def config_entry(self) -> dict:
        """The JSON dict stored as `config.<config_key>`."""
        raise NotImplementedError

    # ---- model calls --------------------------------------------------------------------------

    def _forward(
        self, model: nn.Module, inputs: dict, parameters: dict | None = None, tie_weights: bool = True
    ) -> torch.Tensor:
        return classifier_logits(model, inputs, parameters, self._is_transformers_model, tie_weights=tie_weights)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and not self._is_transformers_model:
            # timm's forward(x) names no dataset column; it is fed `pixel_values`.
            self._signature_columns = ["pixel_values", "label", "label_ids", *self.label_names]
        super()._set_signature_columns_if_needed()

    def _prediction_logits(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """What evaluation and prediction return: the model's logits at its current weights."""
        return self._forward(model, inputs).float()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss is the mean NLL of the batch; the predictions are the logits (or,
        when a subclass averages several draws, log predictive probabilities, which are logits too)."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get(self.label_names[0])
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = self._prediction_logits(model, inputs)
        loss = F.cross_entropy(logits, labels).detach() if labels is not None else None
        if prediction_loss_only:
            return loss, None, None
        return loss, logits.detach(), labels

    # ---- faults -------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_loss |= ~torch.isfinite(loss)  # no device sync here; checked once per step
        return loss

    def _divergence_details(self) -> str | None:
        """Subclass hook: a description of non-finite state after this step's optimizer step (a full
        pass over the weights is fine: it runs only at steps that log, evaluate or save), or None."""
        return None

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Runs after every optimizer step, before anything of that step is logged, evaluated or
        # saved. A non-finite loss stops the run at the step it appears. Weights that an optimizer
        # step made non-finite give a non-finite loss one step later; where this step is logged,
        # evaluated or saved, or is the last, they are checked now (`_divergence_details`), so a
        # diverged run never overwrites the last good checkpoint.
        control = self.control
        due = control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
        details = self._divergence_details() if due else None
        if bool(self._nonfinite_loss) or details:
            raise FloatingPointError(
                f"{type(self).__name__} diverged at step {self.state.global_step}: the loss or the weights are no "
                f"longer finite{f' ({details})' if details else ''}. Lower learning_rate (now "
                f"{self._get_learning_rate()}){self._divergence_hint()} and check the data. The last checkpoint saved "
                "before this step is intact."
            )
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _divergence_hint(self) -> str:
        return ""

    # ---- checkpoints --------------------------------------------------------------------------

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

    def _write_config_entry(self) -> None:
        set_model_config_entry(self.accelerator.unwrap_model(self.model), self.config_key, self.config_entry())

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._write_config_entry()
        return output

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self._write_config_entry()
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_timm_wrapper(unwrapped):
            make_timm_wrapper_checkpoint_portable(unwrapped, output_dir)
        elif not self._is_transformers_model and isinstance(getattr(unwrapped, "pretrained_cfg", None), dict):
            save_timm_config(unwrapped, output_dir)

    # ---- the model card -----------------------------------------------------------------------

    def build_model_card(self, **context):
        """Subclass hook: the `ModelCard` for this run, from the context `create_model_card` gathered."""
        return build_method_card(self.config_entry(), method=self.method_name, config_key=self.config_key,
                                 citation=self.citation, **context)

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
        """Writes README.md (the method's model card: its hyperparameters from `config.<config_key>`,
        the last evaluation, the training settings, the citation) into `output_dir`; `push_to_hub`
        uploads it with the model. Works for raw timm models too (Trainer's own card needs a config)."""
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
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
        card = self.build_model_card(
            model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            library_name="transformers" if self._is_transformers_model else "timm",
            base_model=finetuned_from,
            dataset=dataset if isinstance(dataset, str) else None,
            eval_results=eval_results,
            hyperparameters=hyperparameters,
            repo_id=self.hub_model_id or args.hub_model_id,
            extra_tags=([tags] if isinstance(tags, str) else list(tags or []))
            + (["timm"] if not self._is_transformers_model or is_timm_wrapper(unwrapped) else []),
        )
        card.save(os.path.join(output_dir, "README.md"))

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
        """Trainer's push (weights, config.json with the hyperparameters, model card); a failure
        raises one `HubPushError` and leaves the local output directory as it was."""
        try:
            return super().push_to_hub(*args, **kwargs)
        except HubPushError:
            raise
        except Exception as error:  # noqa: BLE001 - reported as one HubPushError, cause attached
            raise push_error(error, self.args.output_dir, self.hub_model_id or self.args.hub_model_id) from error
