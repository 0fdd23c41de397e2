"""What every fine-tuning trainer of the package shares, whatever its regularizer: the
backbone/head split, checks before any work, forward passes for transformers and timm models,
exact checkpoint restore, prediction at the current weights, and saving/pushing the
hyperparameters in the model's config."""

from __future__ import annotations

import os

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed
from transformers.utils import SAFE_WEIGHTS_NAME
from transformers.utils import logging as transformers_logging

from ..hub.config import save_adapter_config_entries, set_model_config_entry
from ..hub.timm import is_timm_wrapper, make_timm_wrapper_checkpoint_portable, save_timm_config
from ..registry import MethodSpec
from . import lock
from . import output_dir as output_dir_policy
from .adapters import ADAPTER_SAFE_WEIGHTS_NAME, is_peft_model, restore_adapter_weights
from .callback import MethodStateCallback
from .checkpoints import write_manifest
from .checks import (
    check_batch_labels,
    check_distributed_launch,
    check_training_data,
    has_checked_label_column,
    num_model_labels,
)
from .groups import split_parameters
from .metrics import MetricsRecorder
from .modeling import classifier_logits, is_transformers_model
from .preemption import PREEMPTION_SIGNALS, DeferredSignals, TrainingPreempted, signal_name
from .publishing import PublishingMixin

logger = transformers_logging.get_logger(__name__)


class FineTuningTrainer(PublishingMixin, Trainer):
    """Base of every method's trainer; not used directly.

    Subclasses set `args_class` (their arguments, a `FineTuningArguments`), `method` (their
    registered `MethodSpec`: the config.json entry their hyperparameters go to, the model card's
    title, tags and citation, with its typed entry `method.config_class`) and implement
    `method_config()`, the entry's values for the current state. They record the metrics named in
    `logged_metrics` once per training micro-batch (`self.metrics.record(...)`), which `log` adds
    as window means; `logged_values` adds others. A method whose learned state lives in a callback
    sets `callback_class` and calls `install_method_callback` at the end of its `__init__`.
    """

    args_class: type = None
    method: MethodSpec = None
    logged_metrics: tuple[str, ...] = ()
    callback_class: type[MethodStateCallback] | None = None
    # Whether the method can be trained from a `model_init` (a fresh model for every `train()`, as
    # `Trainer.hyperparameter_search` needs): what is tied to the model's parameters is rebuilt
    # by `_bind_model` each time.
    supports_model_init: bool = False

    # compute_loss returns a per-micro-batch mean, so Trainer must divide by the accumulation
    # steps. Without this, models whose forward takes **kwargs (ResNet) get loss × GA.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args=None, model_init=None, **kwargs):
        model, args = self._model_and_args(model, args, model_init, kwargs)
        name = type(self).__name__
        # Everything is validated before Trainer does any work (it creates output_dir and Hub repos).
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise ValueError(
                f"The model's parameters are sharded (DTensor, e.g. by torch's fully_shard): {name} does not "
                f"support FSDP ({args.sharding_note}). Pass the unsharded model and train with DDP (torchrun or "
                "accelerate launch --multi_gpu)."
            )
        groups = split_parameters(model, args.head_modules)
        check_distributed_launch(args)
        self._check_before_init(args, kwargs)
        self._check_model_before_init(model, groups, args)
        if kwargs.get("train_dataset") is not None:
            check_training_data(model, kwargs["train_dataset"], kwargs.get("data_collator"), args)
        # Trainer creates output_dir: one the run created and wrote nothing to is removed again.
        self._output_dir_existed = os.path.isdir(args.output_dir)
        super().__init__(model=model, args=args, **kwargs)
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            # transformers before 5.2x decides the division by the accumulation steps from this
            # flag alone (tests/test_trainer.py, gradient accumulation against one big batch).
            self.model_accepts_loss_kwargs = False
        self.model_init = model_init
        # Datasets without an Arrow label column had their first batch checked only: every batch is.
        train_dataset = kwargs.get("train_dataset")
        self._labels_to_check = (
            num_model_labels(model) or 0
            if train_dataset is not None and not has_checked_label_column(train_dataset)
            else None
        )
        self._nonfinite_inputs: dict[str, torch.Tensor] = {}
        self._checkpoint_pushes: list = []  # (step, future) of every push started from a checkpoint
        self.failed_pushes: list[str] = []
        self.groups = groups
        self.head_modules = groups.head_modules
        self._is_transformers_model = is_transformers_model(self.accelerator.unwrap_model(self.model))
        if not self.label_names:  # raw timm models have no `labels` argument to detect
            self.label_names = ["labels"]
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool, device=self.args.device)
        self._first_nonfinite_step = torch.zeros((), dtype=torch.long, device=self.args.device)
        self.metrics = MetricsRecorder(self.logged_metrics, self.args.device)
        self._callback_target = None
        self._preemption = DeferredSignals()
        self._resumed_from: str | None = None

    def _model_and_args(self, model, args, model_init, kwargs) -> tuple[nn.Module, object]:
        """The model to check and train (the first of `model_init`'s, if given) and the arguments,
        once what was passed is checked (one source of models, arguments of the method's class)."""
        name = type(self).__name__
        if model_init is not None and not self.supports_model_init:
            raise ValueError(
                f"{name} does not take model_init (its learned state is tied to one model); pass model=... instead."
            )
        if model is not None and model_init is not None:
            raise ValueError(f"{name} takes a model or a model_init, not both.")
        if model is None and model_init is None:
            raise ValueError(f"{name} needs a model" + (" or a model_init." if self.supports_model_init else "."))
        if args is None:
            args = self.args_class(output_dir="trainer_output")
        if not isinstance(args, self.args_class):
            raise TypeError(
                f"args must be {self.args_class.__name__}, got {type(args).__name__}; "
                f"build it with {self.args_class.__name__}(output_dir=..., ...)."
            )
        if model_init is not None:
            if kwargs.get("optimizers", (None, None)) != (None, None):
                raise ValueError(f"{name}: model_init cannot be combined with optimizers (a new model per run).")
            # As Trainer does: the seed is set before the model is built. The first model is
            # checked here, before any work; train() builds a fresh one, bound by `_bind_model`.
            set_seed(args.seed)
            self.model_init = model_init
            model = self.call_model_init()
        return model, args

    @property
    def config_key(self) -> str:
        """The entry of config.json the method's hyperparameters go to."""
        return self.method.key

    def installed_callback(self, callback_class: type):
        """The installed instance of `callback_class` (Trainer builds a new one when resuming)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, callback_class):
                return callback
        raise RuntimeError(
            f"{callback_class.__name__} was removed from the trainer; {type(self).__name__} cannot train without it."
        )

    def install_method_callback(self, target) -> None:
        """Install the method's `callback_class`, bound to `target` (what its state is written into);
        after a resume, `_load_callback_state` binds Trainer's new instance to the same target."""
        self._callback_target = target
        self.add_callback(self.callback_class())
        self.method_callback.bind(target)

    @property
    def method_callback(self) -> MethodStateCallback:
        """The installed instance of `callback_class` (Trainer replaces it when resuming)."""
        return self.installed_callback(self.callback_class)

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        if self.callback_class is not None:
            self.method_callback.bind(self._callback_target)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if not self._restore_weights(checkpoint):
            super()._load_best_model()
            return
        if self.callback_class is None:
            return
        # The method's learned state at the best checkpoint goes with its weights.
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        saved = state.stateful_callbacks.get(self.callback_class.__name__, {}).get("attributes", {})
        callback = self.method_callback
        for name, value in saved.items():
            setattr(callback, name, value)
        callback.bind(self._callback_target)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds to training logs the window means of `logged_metrics` (averaged over processes),
        and to every log what `logged_values` returns."""
        if "loss" in logs:
            logs.update(self.metrics.means(self.accelerator))
        logs.update(self.logged_values(logs))
        super().log(logs, start_time)

    def logged_values(self, logs: dict) -> dict:
        """Subclass hook: more values for the log entry `logs` (Python numbers)."""
        return {}

    def call_model_init(self, trial=None) -> nn.Module:
        """Trainer's `call_model_init`; from `train()` (a new run), the new model is bound too."""
        model = super().call_model_init(trial)
        if getattr(self, "groups", None) is not None:
            self._bind_model(model)
        return model

    def _bind_model(self, model: nn.Module) -> None:
        """Rebuild, for a model from `model_init`, what is tied to the model's parameters: the
        backbone/head split (checked as at __init__); subclasses add theirs (the anchor μ)."""
        groups = split_parameters(model, self.args.head_modules)
        self._check_model_before_init(model, groups, self.args)
        if self.place_model_on_device:  # μ is snapshotted on the device the weights train on
            model.to(self.args.device)
        self.groups, self.head_modules = groups, groups.head_modules
        self._is_transformers_model = is_transformers_model(model)

    def _check_before_init(self, args, kwargs) -> None:
        """Subclass hook: more validation before Trainer's __init__."""

    def _check_model_before_init(self, model: nn.Module, groups, args) -> None:
        """Subclass hook: validation of the arguments against the model (its parameter `groups`)."""

    def method_config(self):
        """The method's typed config entry (a `hub.config.MethodConfig`) for the current state."""
        raise NotImplementedError

    def config_entry(self) -> dict:
        """The JSON dict stored as `config.<config_key>`: `method_config().to_dict()`."""
        return self.method_config().to_dict()

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
        if self._labels_to_check is not None:
            check_batch_labels(inputs.get(self.label_names[0]), self._labels_to_check, self.state.global_step + 1)
        for key, value in inputs.items():  # no device sync here; checked where a step logs or saves
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                bad = ~torch.isfinite(value).all()
                self._nonfinite_inputs[key] = (
                    self._nonfinite_inputs[key] | bad if key in self._nonfinite_inputs else bad
                )
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss)
        # The first optimizer step whose loss was not finite, kept on the device (no sync).
        step = self.state.global_step + 1
        self._first_nonfinite_step = torch.where(bad & ~self._nonfinite_loss, step, self._first_nonfinite_step)
        self._nonfinite_loss |= bad
        return loss

    def _divergence_details(self) -> str | None:
        """Subclass hook: a description of non-finite state after this step's optimizer step (a full
        pass over the weights is fine: it runs only at steps that log, evaluate or save), or None."""
        return None

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Runs after every optimizer step, before anything of that step is logged, evaluated or
        # saved. Where this step logs, evaluates or saves, or is the last, the loss flags of the
        # steps since the last check and the weights (`_divergence_details`) are read: so a
        # diverged run never writes a checkpoint, a log or a model, and the steps in between
        # never wait for the device (a non-finite loss is found, at the latest, `logging_steps`
        # steps later, and reported with the step where it first appeared).
        control = self.control
        if self._preemption_requested():  # finish this step with a complete checkpoint, then stop
            control.should_save = control.should_training_stop = self._saved_for_preemption = True
        if not (control.should_log or control.should_evaluate or control.should_save or control.should_training_stop):
            return super()._maybe_log_save_evaluate(*args, **kwargs)
        details = self._divergence_details()
        nonfinite_loss = bool(self._nonfinite_loss)
        bad_inputs = (
            sorted(key for key, flag in self._nonfinite_inputs.items() if bool(flag))
            if (nonfinite_loss or details)
            else []
        )
        step = int(self._first_nonfinite_step) if nonfinite_loss else self.state.global_step
        found = f", found at step {self.state.global_step}" if step != self.state.global_step else ""
        if bad_inputs:
            raise FloatingPointError(
                f"{type(self).__name__} stopped at step {step}{found}: the training data holds non-finite "
                f"values (NaN or inf in {', '.join(bad_inputs)} of a batch since the last check). This is the data, "
                "not the learning rate: remove or repair those examples. The last checkpoint saved before this step "
                "is intact."
            )
        if nonfinite_loss or details:
            raise FloatingPointError(
                f"{type(self).__name__} diverged at step {step}{found}: the loss or the weights are no "
                f"longer finite{f' ({details})' if details else ''}. Lower learning_rate (now "
                f"{self.args.learning_rate:g}, {self._get_learning_rate():g} at this step of the schedule)"
                f"{self._divergence_hint()} and check the data. The last checkpoint saved before this step is intact."
                + (f" This run resumed from {self._resumed_from}." if self._resumed_from else "")
            )
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _preemption_requested(self) -> bool:
        """Whether a preemption signal arrived (in any process: they must stop after the same step)."""
        received = self._preemption.received is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(received)], device=self.args.device)
            received = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return received

    def _divergence_hint(self) -> str:
        return ""

    # ---- checkpoints --------------------------------------------------------------------------

    def _restore_weights(self, checkpoint: str) -> bool:
        """Load a checkpoint's weights into the model exactly (strict). False if not applicable."""
        weights_file = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        model = self.accelerator.unwrap_model(self.model)
        adapter_file = os.path.join(checkpoint, ADAPTER_SAFE_WEIGHTS_NAME)
        if (
            is_peft_model(model)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            and os.path.isfile(adapter_file)
        ):
            restore_adapter_weights(model, adapter_file)
            return True
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not os.path.isfile(weights_file):
            return False
        if isinstance(model, PreTrainedModel):
            # save_pretrained may write legacy key names (ViT: `encoder.layer.0.attention.attention.query`)
            # that Trainer's load_state_dict(strict=False) silently skips, so resuming would keep the
            # fresh weights (transformers issue 43701). from_pretrained converts the names.
            state_dict = type(model).from_pretrained(checkpoint, config=model.config).state_dict()
        else:
            state_dict = safetensors.torch.load_file(weights_file, device="cpu")
        model.load_state_dict(state_dict, strict=True)
        return True

    def _stateful_callback_names(self) -> tuple[str, ...]:
        if not self.args.restore_callback_states_from_checkpoint:
            return ()
        return tuple(type(cb).__name__ for cb in self.callback_handler.callbacks if isinstance(cb, ExportableState))

    def _complete_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint `train` resumes from: for `True`, the newest complete one in output_dir
        (logging the newer ones skipped and why); a path only if it is complete (`checkpoints.py`)."""
        skipped = []
        checkpoint = output_dir_policy.resume_checkpoint(
            self.args.output_dir,
            resume_from_checkpoint,
            "api",
            skipped_log=lambda *entry: skipped.append(entry),
            callback_names=self._stateful_callback_names(),
            num_processes=self.args.world_size,
        )
        for name, why in skipped:
            logger.warning(f"Not resuming from {name}: {why}.")
        if skipped:
            logger.warning(f"Resuming from {checkpoint}, the newest complete checkpoint.")
        return checkpoint

    def _save_checkpoint(self, model, trial) -> None:
        # Written last, the manifest marks the checkpoint complete (a save that fails halfway leaves none).
        super()._save_checkpoint(model, trial)
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every rank's RNG state is on disk
        if self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            if os.path.isdir(checkpoint):
                write_manifest(checkpoint)
            lock.record_writes(self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._restore_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _write_config_entry(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        set_model_config_entry(model, self.config_key, self.config_entry())
        config = getattr(model, "config", None)
        if getattr(config, "problem_type", "") is None and getattr(config, "num_labels", 0) > 1:
            # As transformers' classifiers set it at their first loss with labels: the methods train
            # with the cross-entropy of one label per example.
            config.problem_type = "single_label_classification"

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer's `train`, holding output_dir's lock (`lock.py`: a second live run into it is
        refused), resuming only from a complete checkpoint (`_complete_checkpoint`), and reporting
        checkpoint pushes to the Hub that failed (`failed_pushes`) at the end."""
        resume_from_checkpoint = self._resumed_from = self._complete_checkpoint(resume_from_checkpoint)
        holds_lock = self.is_world_process_zero()
        if holds_lock:
            lock.acquire(self.args.output_dir, created=not self._output_dir_existed)
        finished = False
        try:
            self._saved_for_preemption = False
            with self._preemption:  # a SIGTERM or SIGUSR1 stops the run after a step, with a checkpoint
                output = super().train(resume_from_checkpoint, *args, **kwargs)
            checkpoint = self._checkpoint_after_preemption()
            finished = True
        finally:
            if holds_lock:  # a run that failed having written nothing removes the output_dir it created
                lock.release(self.args.output_dir, remove_if_created=not finished)
        if checkpoint is not None:
            number = self._preemption.received or PREEMPTION_SIGNALS[0]
            raise TrainingPreempted(
                f"stopped by {signal_name(number)} after step {self.state.global_step}: {checkpoint} is complete; "
                "resume with train(resume_from_checkpoint=True) (on the command line: the same command and --resume).",
                number,
                checkpoint,
            )
        self._write_config_entry()
        self._report_failed_pushes()
        return output

    def _checkpoint_after_preemption(self) -> str | None:
        """After `train()`: the checkpoint written when a preemption signal stopped it (written now
        if the signal came after the last step's check), or None when no signal came."""
        if not self._saved_for_preemption and not self._preemption_requested():
            return None
        if not self._saved_for_preemption:  # every process agrees on both flags
            self._save_checkpoint(self.model, trial=None)
        return os.path.join(self._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self._write_config_entry()
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped):
            # Trainer saved the adapter (adapter_model.safetensors, adapter_config.json), not config.json.
            save_adapter_config_entries(output_dir, {self.config_key: self.config_entry()})
        elif is_timm_wrapper(unwrapped):
            make_timm_wrapper_checkpoint_portable(unwrapped, output_dir)
        elif not self._is_transformers_model and isinstance(getattr(unwrapped, "pretrained_cfg", None), dict):
            save_timm_config(unwrapped, output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's `save_model` (weights, config.json with the hyperparameters), plus, when called
        by the user, the model card (README.md) and its plots in the same directory, as
        `push_to_hub` writes them. Checkpoints (`_internal_call`) get no card."""
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        with self._holding(output_dir):
            super().save_model(output_dir, _internal_call)
            self.create_model_card(output_dir=output_dir)

    def _holding(self, output_dir: str | None = None) -> lock.holding:
        """Hold the lock of `output_dir` (default `args.output_dir`) while writing there outside
        `train()`, so that what is written is recorded as the run's (`run_files.py`)."""
        return lock.holding(
            output_dir if output_dir is not None else self.args.output_dir, enabled=self.is_world_process_zero()
        )

    def save_metrics(self, split, metrics, combined=True):
        """Trainer's `save_metrics` (`<split>_results.json`, `all_results.json`), recorded as the run's."""
        with self._holding():
            super().save_metrics(split, metrics, combined)

    def save_state(self):
        """Trainer's `save_state` (`trainer_state.json`), recorded as the run's."""
        with self._holding():
            super().save_state()
