"""What `hf-deelbo train` prints: the learning-rate selection, the learned hyperparameters and test
metrics, failed pushes; and learning_rate_selection.json's record."""

from __future__ import annotations

import math
import os
import sys

from ..methods.deelbo.config import DEELBoConfig


def selection_record(result, selection: str) -> dict:
    """learning_rate_selection.json: the chosen settings and every run's score, time and learned
    values; for successive halving also its steps, its score at each round and when it was eliminated."""
    runs = []
    for run in result.runs:
        record = {**run.settings, "training_objective": run.score, "seconds": run.seconds, "learned": run.learned}
        if selection == "halving":
            record.update(steps=run.steps, round_scores=run.round_scores, eliminated_at=run.eliminated_at)
        runs.append(record)
    record = {"selection": selection, "chosen": result.best, "runs": runs}
    if selection == "halving":
        record.update(total_steps=result.total_steps, total_seconds=result.total_seconds)
    return record


def num_labels(trainer) -> int | None:
    from ..core.checks import num_model_labels

    return num_model_labels(trainer.accelerator.unwrap_model(trainer.model))


def print_summary(deelbo: DEELBoConfig, metrics: dict, output_dir: str, log_history=None, num_labels=None) -> None:
    print("\nDE ELBO learned hyperparameters")
    lam, tau, num_params = deelbo.backbone_prior_variance, deelbo.head_prior_variance, deelbo.num_params
    print(f"  lambda (backbone prior variance) {lam:.4g}   alpha_eff = 1/(D lambda) = {deelbo.alpha_eff:.4g}")
    print(f"  tau    (head prior variance)     {tau:.4g}   beta_eff  = 1/(D tau)    = {deelbo.beta_eff:.4g}")
    print(f"  sigma  (posterior std)           {deelbo.sigma:.4g}")
    print(
        f"  kappa  (data emphasis)           {deelbo.kappa:.4g}   (D = {num_params:,}, N = {deelbo.num_train_examples})"
    )
    if metrics:
        print(f"Test accuracy {metrics['accuracy']:.4f}   NLL {metrics['nll']:.4f}   ECE {metrics['ece']:.4f}")
    print(f"Model, config.json (with `deelbo`), model card and plots written to {os.path.abspath(output_dir)}")
    nlls = [entry["nll"] for entry in log_history or [] if "nll" in entry]
    if nlls and num_labels and num_labels > 1 and not nlls[-1] < math.log(num_labels):
        print(
            f"Warning: the final training NLL {nlls[-1]:.4g} is no better than predicting every class equally "
            f"(log C = {math.log(num_labels):.4g}, C = {num_labels}): the model learned nothing. Lower "
            "--learning_rate (or --sigma_init); with --kappa 1 (the plain ELBO) this collapse is the expected "
            "result when D >> N."
        )


def print_selection(result, selection: str) -> None:
    """One line: each learning rate's score (and, by halving, its steps and the round that eliminated it)."""
    if selection == "halving":
        print(
            f"Learning rate by successive halving ({result.total_steps} steps in all): "
            + ", ".join(
                f"{run.settings['learning_rate']:g} -> {run.score:.4g} after {run.steps} steps"
                + (f" (eliminated in round {run.eliminated_at})" if run.eliminated else "")
                for run in result.runs
            )
            + f"; chosen {result.best['learning_rate']:g}"
        )
    else:
        print(
            "Learning rate by final training objective: "
            + ", ".join(
                f"{run.settings['learning_rate']:g} -> {run.score:.4g} (sigma {run.learned['sigma']:.3g})"
                for run in result.runs
            )
            + f"; chosen {result.best['learning_rate']:g}"
        )


def finish(trainer, metrics: dict, training_args) -> int:
    """The run's summary on stdout; exit status 1 (with one line on stderr) if a checkpoint push failed."""
    output_dir = training_args.output_dir
    if not training_args.do_train:
        if metrics:
            print(
                f"Test accuracy {metrics['accuracy']:.4f}   NLL {metrics['nll']:.4f}   ECE {metrics['ece']:.4f} "
                f"(not trained: --do_eval without --do_train); written to {os.path.abspath(output_dir)}"
            )
        return 0
    print_summary(trainer.method_config(), metrics, output_dir, trainer.state.log_history, num_labels(trainer))
    if trainer.failed_pushes:
        print(
            f"hf-deelbo train: error: {len(trainer.failed_pushes)} checkpoint push(es) to the Hub failed "
            f"({'; '.join(trainer.failed_pushes)}); everything is saved in {output_dir}: push it with "
            f"hf-deelbo push {output_dir} --repo_id {trainer.hub_model_id or training_args.hub_model_id}.",
            file=sys.stderr,
        )
        return 1
    return 0
