"""`hf-deelbo train`: fine-tune with DE ELBO (no model and no dataset: the embedded digits task, offline).

The arguments are `train_arguments`'s, the model and data `assembly`'s, the output directory's
policy `core.output_dir`'s; this module runs the steps in order: train (one run, or a learning-rate
selection among runs), save, evaluate, card and push, then report (`report`; a failure: `failures`)."""

from __future__ import annotations

import json
import os
import shutil

import PIL
import torch

from ..core import lock
from ..core import output_dir as output_dir_policy
from . import report
from .assembly import TrainingInputs, assemble, record_split
from .common import UsageError
from .failures import not_an_image, run_failure
from .train_arguments import is_embedded_run, parse_train_args, train_help


def main(argv: list[str]) -> int:
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(train_help(full="--help-all" in argv))
        return 0
    from ..core.preemption import raising

    with raising():  # SIGTERM/SIGUSR1: at once before training; after the current step during it
        return _train(argv)


def _train(argv: list[str]) -> int:
    from transformers.trainer_utils import set_seed

    model_args, data_args, training_args, run_args = parse_train_args(argv)
    _check_learning_rate_selection(training_args, run_args)
    output_dir = training_args.output_dir
    existed = output_dir_policy.check_output_dir(
        output_dir, training_args.resume_from_checkpoint, run_args.overwrite_output_dir, "cli", _is_main_process()
    )
    set_seed(training_args.seed)
    embedded = is_embedded_run(model_args, data_args)
    inputs = assemble(embedded, model_args, data_args, training_args)
    trainer = _single_run_trainer(inputs, training_args, run_args)
    main_process = training_args.process_index == 0
    if main_process:
        lock.acquire(output_dir, created=not existed)  # from here on, nothing the run writes is ever removed
    try:
        if existed and run_args.overwrite_output_dir and not training_args.resume_from_checkpoint and main_process:
            output_dir_policy.clear_previous_run(output_dir)
        trainer, metrics = _run(trainer, inputs, embedded, data_args, training_args, run_args)
    except BaseException as error:
        failure = run_failure(error, output_dir)
        if failure is None:
            raise
        raise failure from error
    finally:
        if main_process:
            lock.release(output_dir)  # removes output_dir only if the run created it and wrote nothing
    return report.finish(trainer, metrics, training_args)


def _trainer_kwargs(inputs: TrainingInputs) -> dict:
    from transformers import default_data_collator

    return dict(eval_dataset=inputs.evaluation, data_collator=default_data_collator, processing_class=inputs.processor)


def _single_run_trainer(inputs: TrainingInputs, training_args, run_args):
    """The trainer of a single run, built before the output directory is taken; None when
    --learning_rates selects among runs (their flags checked here)."""
    from ..methods.deelbo.trainer import DEELBoTrainer

    if run_args.learning_rates and not training_args.do_train:
        raise UsageError(
            "--learning_rates selects among training runs; it needs --do_train (or neither --do_train "
            "nor --do_eval, which does both)."
        )
    if training_args.do_train and run_args.learning_rates:
        if any(not (lr > 0) for lr in run_args.learning_rates):
            raise UsageError(f"--learning_rates must all be > 0; got {run_args.learning_rates}")
        if training_args.resume_from_checkpoint:
            raise UsageError(
                "--learning_rates cannot be combined with --resume_from_checkpoint; resume one run instead."
            )
        return None
    try:  # the trainer reads the first examples: an image file that is none is bad input
        return DEELBoTrainer(
            model=inputs.model_init(), args=training_args, train_dataset=inputs.train, **_trainer_kwargs(inputs)
        )
    except PIL.UnidentifiedImageError as error:
        raise UsageError(not_an_image(error)) from None


def _run(trainer, inputs: TrainingInputs, embedded: bool, data_args, training_args, run_args):
    """Train, save, evaluate, write the card and push, as the arguments ask; (trainer, test metrics)."""
    from ..evaluation.plots import LOSS_PLOT, plot_training_loss

    train_metrics = None
    if training_args.do_train and run_args.learning_rates:
        trainer, train_metrics = _select_learning_rate(inputs, training_args, run_args)
    elif training_args.do_train:
        train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
    if training_args.do_train:
        trainer.save_model()
        trainer.save_metrics("train", train_metrics)  # train_results.json and all_results.json
        trainer.save_state()
        record_split(embedded, data_args, training_args, inputs.train, inputs.evaluation)
    metrics = _evaluate(trainer, inputs.evaluation) if training_args.do_eval and inputs.evaluation is not None else {}
    if training_args.do_train:
        plot_training_loss(trainer.state.log_history, os.path.join(training_args.output_dir, LOSS_PLOT))
        trainer.create_model_card(finetuned_from=inputs.base_model, dataset=inputs.dataset_name)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset=inputs.dataset_name, finetuned_from=inputs.base_model)
    return trainer, metrics


def _select_learning_rate(inputs: TrainingInputs, training_args, run_args):
    """--learning_rates: one run per learning rate, the lowest final training objective wins; the
    record in learning_rate_selection.json, the runs' directories removed. (trainer, train metrics)."""
    from ..search import select_learning_rate

    output_dir = training_args.output_dir
    result = select_learning_rate(
        inputs.model_init,
        inputs.train,
        training_args,
        run_args.learning_rates,
        objective_dataset=inputs.objective_view,
        strategy=run_args.learning_rate_selection,
        **_trainer_kwargs(inputs),
    )
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "learning_rate_selection.json"), "w") as f:
        json.dump(report.selection_record(result, run_args.learning_rate_selection), f, indent=2)
    for run in result.runs:
        shutil.rmtree(os.path.join(output_dir, f"lr-{run.settings['learning_rate']:g}"), ignore_errors=True)
    report.print_selection(result, run_args.learning_rate_selection)
    return result.trainer, next(run.metrics for run in result.runs if run.settings == result.best)


def _evaluate(trainer, evaluation) -> dict:
    """Accuracy, NLL and ECE on the evaluation split, logged, saved and drawn as a reliability diagram."""
    from ..evaluation.metrics import classification_metrics
    from ..evaluation.plots import RELIABILITY_PLOT, plot_reliability

    output = trainer.predict(evaluation)
    metrics = classification_metrics(torch.tensor(output.predictions), torch.tensor(output.label_ids))
    eval_metrics = {f"eval_{k}": v for k, v in metrics.items()} | {"eval_loss": metrics["nll"]}
    trainer.log(eval_metrics)
    trainer.save_metrics("eval", eval_metrics)  # eval_results.json, added to all_results.json
    plot_reliability(output.predictions, output.label_ids, os.path.join(trainer.args.output_dir, RELIABILITY_PLOT))
    return metrics


def _check_learning_rate_selection(training_args, run_args) -> None:
    """--learning_rate_selection halving needs --learning_rates and a --max_steps it can pause at
    fractions of (`halving_schedule`)."""
    if run_args.learning_rate_selection != "halving":
        return
    if not run_args.learning_rates:
        raise UsageError(
            "--learning_rate_selection halving chooses among --learning_rates; pass them too "
            "(e.g. --learning_rates 0.1 0.01 0.001 0.0001)."
        )
    if not training_args.max_steps > 0:
        raise UsageError(
            "--learning_rate_selection halving pauses runs at fractions of --max_steps, so it needs --max_steps > 0; "
            f"got {training_args.max_steps}. Pass --max_steps (the length of the full run)."
        )
    from ..search import halving_min_steps

    num = len(run_args.learning_rates)
    needed = halving_min_steps(num)
    if training_args.max_steps < needed:
        raise UsageError(
            f"--learning_rate_selection halving needs --max_steps >= {needed} for {num} learning rates; "
            f"got {training_args.max_steps}. Raise --max_steps or pass fewer --learning_rates."
        )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0
