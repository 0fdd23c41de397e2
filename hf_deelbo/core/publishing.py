"""The model card and the Hub, for every fine-tuning trainer of the package (`FineTuningTrainer`
mixes this in before `Trainer`): the method's card from transformers' own training summary, the
repo's creation and pushes with one clear error, and the outcome of background checkpoint pushes."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from transformers import Trainer
from transformers.modelcard import TrainingSummary, extract_hyperparameters_from_trainer
from transformers.utils import logging as transformers_logging

from ..hub import model_card as cards
from ..hub.config import ADAPTER_CONFIG_ENTRIES_NAME
from ..hub.push import HubPushError, check_repo_namespace, hub_call, push_error
from ..hub.timm import is_timm_wrapper
from . import lock
from .adapters import peft_type

logger = transformers_logging.get_logger(__name__)


def _listify(value) -> list:
    return [value] if isinstance(value, str) else list(value)


class PublishingMixin:
    """Model card and Hub methods of `FineTuningTrainer` (they call `Trainer`'s through `super()`)."""

    # ---- the model card -----------------------------------------------------------------------

    def build_model_card(self, output_dir: str | None = None, **context):
        """Subclass hook: the `ModelCard` for this run, from the context `create_model_card` gathered;
        figures the card shows go to `output_dir`."""
        return cards.build_model_card(self.method, self.config_entry(), **context)

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
        output_dir: str | None = None,
    ) -> None:
        """Writes README.md (the method's model card: its hyperparameters from `config.<config_key>`,
        the last evaluation, the training settings, the citation) into `output_dir` (default:
        `args.output_dir`); `save_model` and `push_to_hub` write it with the model. Its "How to use"
        loads the Hub repo (`hub_model_id`) if there is one, else the local directory. Works for raw
        timm models too (Trainer's own card needs a config)."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        summary_args = dict(
            language=language, license=license, tasks=tasks, dataset_tags=dataset_tags, dataset_args=dataset_args
        )
        with self._holding(output_dir):
            self._write_model_card(output_dir, tags, model_name, finetuned_from, dataset, summary_args)

    def _write_model_card(self, output_dir, tags, model_name, finetuned_from, dataset, summary_args: dict) -> None:
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
        # Plain Trainer's card lists these (transformers.modelcard); ours adds the steps taken and the clipping.
        hyperparameters = {
            name: str(value).replace("\n", " ") for name, value in extract_hyperparameters_from_trainer(self).items()
        }
        hyperparameters.update(optimizer_steps=self.state.global_step, max_grad_norm=args.max_grad_norm)
        adapter = peft_type(unwrapped)  # a PEFT adapter's card loads it with peft, onto its base model
        if adapter:
            library_name = "peft"
        else:
            library_name = "transformers" if self._is_transformers_model else "timm"
        model_name = model_name or os.path.basename(os.path.abspath(output_dir))
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        # What plain Trainer's card holds (license, language, the generated_from_trainer tag, the
        # training data's datasets, metrics and model-index, the task), from transformers' own summary.
        summary = TrainingSummary.from_trainer(
            self,
            tags=list(tags),
            model_name=model_name,
            finetuned_from=finetuned_from or "",
            dataset=dataset,
            **summary_args,
        )
        card = self.build_model_card(
            output_dir=output_dir,
            model_name=model_name,
            library_name=library_name,
            values_file=ADAPTER_CONFIG_ENTRIES_NAME if adapter else "config.json",
            base_model=finetuned_from,
            dataset=dataset if isinstance(dataset, str) else None,
            eval_results=eval_results,
            hyperparameters=hyperparameters,
            repo_id=self.hub_model_id or args.hub_model_id,
            local_path=output_dir,
            extra_tags=tags
            + (["timm"] if not self._is_transformers_model or is_timm_wrapper(unwrapped) else [])
            + (["peft", adapter] if adapter else []),
            task=_listify(summary.tasks)[0] if summary.tasks else cards.DEFAULT_TASK,
            trainer_metadata=summary.create_metadata(),
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
        # `private` is an argument of Trainer.init_hf_repo from transformers 5.2x on.
        private_argument = (
            {"private": private} if "private" in inspect.signature(Trainer.init_hf_repo).parameters else {}
        )
        try:
            with hub_call():
                super().init_hf_repo(token=token, **private_argument)
        except Exception as error:  # noqa: BLE001 - reported as one HubPushError, cause attached
            output_dir = self.args.output_dir
            wrote_output = os.path.isdir(output_dir) and bool(set(os.listdir(output_dir)) - {lock.LOCK_NAME})
            raise push_error(error, output_dir, self.args.hub_model_id, wrote_output=wrote_output) from error

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        known = set(map(id, (job for _, job in self._checkpoint_pushes)))
        entries = os.path.join(checkpoint_folder, ADAPTER_CONFIG_ENTRIES_NAME)
        if self.args.should_save and os.path.isfile(entries):
            # Trainer copies the modeling files it knows into output_dir before pushing it; a PEFT
            # adapter's entries go with them.
            shutil.copy(entries, os.path.join(self.args.output_dir, ADAPTER_CONFIG_ENTRIES_NAME))
        super()._push_from_checkpoint(checkpoint_folder)
        progress = getattr(self, "push_in_progress", None)
        for job in progress.jobs if progress is not None else []:
            if id(job) not in known:
                self._checkpoint_pushes.append((self.state.global_step, job))

    def _report_failed_pushes(self) -> None:
        """Checkpoint pushes run in the background and Trainer never looks at their outcome: each
        one that failed is added to `failed_pushes` and the whole list logged as one warning."""
        from concurrent import futures

        futures.wait([job for _, job in self._checkpoint_pushes])
        repo_id = self.hub_model_id or self.args.hub_model_id
        for step, job in self._checkpoint_pushes:
            if not job.cancelled() and job.exception() is not None:
                self.failed_pushes.append(
                    f"step {step}: {push_error(job.exception(), self.args.output_dir, repo_id).reason}"
                )
        self._checkpoint_pushes = []
        if self.failed_pushes:
            logger.warning(
                f"{len(self.failed_pushes)} push(es) of checkpoints to the Hub repo {repo_id} failed "
                f"({'; '.join(self.failed_pushes)}). The local checkpoints in {self.args.output_dir} are intact; push "
                f"them with trainer.push_to_hub() or hf-deelbo push {self.args.output_dir} --repo_id {repo_id}."
            )

    def push_to_hub(self, *args, **kwargs):
        """Trainer's push (weights, config.json with the hyperparameters, model card); a failure
        raises one `HubPushError` and leaves the local output directory as it was."""
        try:
            with hub_call(), self._holding():  # the card and files written for the push are the run's
                return super().push_to_hub(*args, **kwargs)
        except HubPushError:
            raise
        except Exception as error:  # noqa: BLE001 - reported as one HubPushError, cause attached
            raise push_error(error, self.args.output_dir, self.hub_model_id or self.args.hub_model_id) from error
