"""Choosing hyperparameters the ways the benchmark compares, all through one search loop (`search`).

- `l2sp_grid_search`: the protocol DE ELBO replaces (Harvey et al., following Li et al. 2018):
  hold out a stratified 20 % of the N examples, train L2-SP for every (α, β, lr) of the grid on the
  other 80 %, keep the configuration with the lowest validation NLL at the last step, and retrain it
  on all N examples. Compute = every tuning run + the retrain.
- `select_learning_rate`: DE ELBO's only search, without any validation data: train one run per
  learning rate on all N examples and keep the one with the lowest final training objective (the
  DE ELBO loss on the non-augmented training set, averaged over 10 posterior draws).
- `select_learning_rate(strategy="halving")`: the same choice at a third of the cost (1.35 runs' steps
  for 4 learning rates instead of 4 runs): successive halving over the same training objective,
  each early score taken after a short learning-rate cool-down branch, each run paused and resumed
  exactly, so that the chosen run is a complete run of the full schedule.
- `select_learning_rate_by_validation`: the same for the methods that learn on a validation split
  (TPGM, T1–T2): one run per learning rate, the lowest final NLL on that split wins.

Why not `Trainer.hyperparameter_search`: it needs an optional backend (optuna, ray, ...) and a
`model_init`, searches one objective per trial, and knows nothing of the retrain on all data or
of per-run wall time. Over an exhaustive grid, optuna's `GridSampler` would enumerate the same
points as the loop below; the loop keeps the protocol visible and needs no extra dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..core.choices import Choice
from ..core.validation import stratified_split
from ..methods.deelbo.arguments import DEELBoTrainingArguments
from ..methods.deelbo.trainer import DEELBoTrainer
from ..methods.l2sp import L2SPTrainer, L2SPTrainingArguments
from .halving import HALVING_COOLDOWN_FRACTION, _select_by_halving
from .runs import SearchResult, _chosen_trainer, _run_args, objects_frozen_out_of_collections, search


class SelectionStrategy(Choice):
    """How `select_learning_rate` (and `hf-deelbo train --learning_rate_selection`) chooses."""

    FULL = "full", "one complete run per learning rate"
    HALVING = "halving", "successive halving"


# The paper's grids (Harvey et al. 2024, Sec. 5, after Li et al. 2018).
PAPER_STRENGTHS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0)
PAPER_LEARNING_RATES = (0.1, 0.01, 0.001, 0.0001)


@objects_frozen_out_of_collections()
def l2sp_grid_search(
    model_init: Callable[[], object],
    train_dataset,
    labels: Sequence[int],
    args: L2SPTrainingArguments,
    alphas: Sequence[float] = PAPER_STRENGTHS,
    betas: Sequence[float] = PAPER_STRENGTHS,
    learning_rates: Sequence[float] = PAPER_LEARNING_RATES,
    validation_fraction: float = 0.2,
    validation_view=None,
    **trainer_kwargs,
) -> SearchResult:
    """Grid search of L2-SP's (α, β, lr) with the paper's protocol; returns the retrained winner.

    Args:
        model_init: returns a fresh pretrained model with a new head (called once per run).
        train_dataset: the N training examples (possibly with training augmentation).
        labels: their labels, for the stratified split.
        args: settings shared by every run (alpha, beta, learning_rate are replaced).
        validation_view: the same N examples without augmentation, for the validation NLL
            (default: `train_dataset`).
        trainer_kwargs: passed to every `L2SPTrainer` (data_collator, ...).
    """
    train_idx, val_idx = stratified_split(labels, validation_fraction, args.seed)
    tuning_set = train_dataset.select(train_idx)
    validation_set = (validation_view if validation_view is not None else train_dataset).select(val_idx)
    grid = [
        {"alpha": a, "beta": b, "learning_rate": lr} for a, b, lr in itertools.product(alphas, betas, learning_rates)
    ]
    runs, _ = search(
        grid,
        lambda i, settings: L2SPTrainer(
            model=model_init(),
            train_dataset=tuning_set,
            **trainer_kwargs,
            args=_run_args(args, os.path.join(args.output_dir, f"grid-{i}"), **settings),
        ),
        lambda trainer: trainer.evaluate(validation_set)["eval_loss"],
    )
    finite = [run for run in runs if np.isfinite(run.score)]
    if not finite:
        raise FloatingPointError(
            f"L2-SP diverged for every configuration of the grid ({len(runs)} runs); try smaller learning rates."
        )
    best = min(finite, key=lambda run: run.score).settings
    start = time.perf_counter()
    final = L2SPTrainer(
        model=model_init(), args=dataclasses.replace(args, **best), train_dataset=train_dataset, **trainer_kwargs
    )
    final.train()
    return SearchResult(best=best, runs=runs, final_seconds=time.perf_counter() - start, trainer=final)


def select_learning_rate(
    model_init: Callable[[], object],
    train_dataset,
    args: DEELBoTrainingArguments,
    learning_rates: Sequence[float] = PAPER_LEARNING_RATES,
    num_samples: int = 10,
    objective_dataset=None,
    strategy: SelectionStrategy | str = SelectionStrategy.FULL,
    halving_num_samples: int = 1,
    halving_cooldown_fraction: float = HALVING_COOLDOWN_FRACTION,
    **trainer_kwargs,
) -> SearchResult:
    """DE ELBO with each learning rate on all N examples; the winner has the lowest training
    objective (`DEELBoTrainer.training_objective` on `objective_dataset`, the training set without
    augmentation, default `train_dataset`, over `num_samples` draws). No validation data is used.

    `strategy`: "full" (the paper's) trains every learning rate to the end and compares the final
    objectives; "halving" reaches the choice by successive halving over the same objective at
    1.35 runs' steps for 4 learning rates (`_select_by_halving`), scoring every round (the chosen
    run's end included) with `halving_num_samples` draws instead of `num_samples`, each early round
    after a cool-down branch of `halving_cooldown_fraction` × the steps trained (0: no cool-down)."""
    strategy = SelectionStrategy.check("strategy", strategy)
    score_dataset = objective_dataset if objective_dataset is not None else train_dataset

    def score(trainer, draws: int = num_samples):
        return trainer.training_objective(score_dataset, num_samples=draws)

    if strategy == "halving":
        if not (isinstance(halving_num_samples, int) and halving_num_samples >= 1):
            raise ValueError(
                f"halving_num_samples must be an int >= 1 (draws of the objective at each round of "
                f"successive halving); got {halving_num_samples!r}"
            )
        fraction = halving_cooldown_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(
                f"halving_cooldown_fraction must be a number in [0, 1] (the cool-down before each early "
                f"score, as a fraction of the steps trained; 0 scores the paused run as it is); got "
                f"{fraction!r}"
            )
        return _select_by_halving(
            model_init,
            train_dataset,
            args,
            learning_rates,
            functools.partial(score, draws=halving_num_samples),
            cooldown_fraction=fraction,
            **trainer_kwargs,
        )
    return learning_rate_search(
        DEELBoTrainer,
        model_init,
        train_dataset,
        args,
        learning_rates,
        score=score,
        learned=lambda trainer: trainer.learned_hyperparameters(),
        method_name="DE ELBO",
        **trainer_kwargs,
    )


def select_learning_rate_by_validation(
    trainer_class: type,
    model_init: Callable[[], object],
    train_dataset,
    args,
    learning_rates: Sequence[float] = PAPER_LEARNING_RATES,
    **trainer_kwargs,
) -> SearchResult:
    """A method that learns on validation data (`TPGMTrainer`, `T1T2Trainer`) with each learning rate;
    the winner has the lowest final NLL on its validation set (`trainer.validation_dataset`:
    `eval_dataset`, or the `validation_fraction` of `train_dataset` it held out)."""
    return learning_rate_search(
        trainer_class,
        model_init,
        train_dataset,
        args,
        learning_rates,
        score=lambda trainer: trainer.evaluate(trainer.validation_dataset)["eval_loss"],
        method_name=trainer_class.__name__,
        **trainer_kwargs,
    )


def learning_rate_search(
    trainer_class,
    model_init,
    train_dataset,
    args,
    learning_rates,
    score,
    method_name: str,
    learned=None,
    **trainer_kwargs,
) -> SearchResult:
    """One `trainer_class` run per learning rate on `train_dataset`; the lowest `score(trainer)` wins
    and its trainer is returned, pointed at `args.output_dir` (e.g. plain fine-tuning's lr chosen by
    the final training loss: `L2SPTrainer` at α = β = 0, `score=lambda t: t.evaluate(train)["eval_loss"]`)."""
    runs, best = search(
        [{"learning_rate": lr} for lr in learning_rates],
        lambda _, settings: trainer_class(
            model=model_init(),
            train_dataset=train_dataset,
            **trainer_kwargs,
            args=_run_args(args, os.path.join(args.output_dir, f"lr-{settings['learning_rate']:g}"), **settings),
        ),
        score,
        learned=learned,
        keep_best=True,
    )
    if best is None:
        raise FloatingPointError(
            f"{method_name} diverged at every learning rate of {list(learning_rates)}; try smaller ones."
        )
    best_run, best_trainer = best
    return SearchResult(
        best=best_run.settings, runs=runs, final_seconds=0.0, trainer=_chosen_trainer(best_trainer, args)
    )
