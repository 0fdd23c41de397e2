"""Choosing hyperparameters the two ways the benchmark compares.

- `l2sp_grid_search`: the protocol DE ELBO replaces (Harvey et al., following Li et al. 2018):
  hold out a stratified 20 % of the N examples, train L2-SP for every (α, β, lr) of the grid on the
  other 80 %, keep the configuration with the lowest validation NLL at the last step, and retrain it
  on all N examples. Compute = every tuning run + the retrain.
- `select_learning_rate`: DE ELBO's only search, without any validation data: train one run per
  learning rate on all N examples and keep the one with the lowest final training objective (the
  DE ELBO loss on the non-augmented training set, averaged over 10 posterior draws).

Why not `Trainer.hyperparameter_search`: it needs an optional backend (optuna, ray, ...) and a
`model_init`, searches one objective per trial, and knows nothing of the retrain on all data or
of per-run wall time. Over an exhaustive grid, optuna's `GridSampler` would enumerate the same
points as the loop below; the loop keeps the protocol visible and needs no extra dependency.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .arguments import DEELBoTrainingArguments
from .l2sp import L2SPTrainer, L2SPTrainingArguments
from .trainer import DEELBoTrainer
from .validation import stratified_split

# The paper's grids (Harvey et al. 2024, Sec. 5, after Li et al. 2018).
PAPER_STRENGTHS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0)
PAPER_LEARNING_RATES = (0.1, 0.01, 0.001, 0.0001)


@dataclass
class SearchRun:
    """One training run of a search: its settings, its score (lower is better), wall time, and what
    the run learned (`learned`: DE ELBO's `learned_hyperparameters()`; empty for L2-SP)."""

    settings: dict
    score: float
    seconds: float
    learned: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    best: dict
    runs: list[SearchRun]
    final_seconds: float
    trainer: object = field(repr=False)

    @property
    def total_seconds(self) -> float:
        """Compute of the whole procedure: every run of the search plus the final retrain (if any)."""
        return sum(run.seconds for run in self.runs) + self.final_seconds


def _run_args(args, output_dir: str, **changes):
    # A search run writes nothing: no checkpoints, no Hub pushes, no report_to integrations.
    return dataclasses.replace(
        args, output_dir=output_dir, save_strategy="no", push_to_hub=False, report_to="none", **changes
    )


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
    runs = []
    for i, (alpha, beta, lr) in enumerate(itertools.product(alphas, betas, learning_rates)):
        start = time.perf_counter()
        trainer = L2SPTrainer(
            model=model_init(),
            args=_run_args(args, os.path.join(args.output_dir, f"grid-{i}"), alpha=alpha, beta=beta, learning_rate=lr),
            train_dataset=tuning_set,
            **trainer_kwargs,
        )
        try:
            trainer.train()
            nll = float(trainer.evaluate(validation_set)["eval_loss"])
        except FloatingPointError:  # a diverged configuration is recorded, and never chosen
            nll = float("inf")
        nll = nll if np.isfinite(nll) else float("inf")
        runs.append(SearchRun({"alpha": alpha, "beta": beta, "learning_rate": lr}, nll, time.perf_counter() - start))
        del trainer
    finite = [run for run in runs if np.isfinite(run.score)]
    if not finite:
        raise FloatingPointError(
            f"L2-SP diverged for every configuration of the grid ({len(runs)} runs); try smaller learning rates."
        )
    best = min(finite, key=lambda run: run.score).settings
    start = time.perf_counter()
    final = L2SPTrainer(model=model_init(), args=dataclasses.replace(args, **best), train_dataset=train_dataset,
                        **trainer_kwargs)
    final.train()
    return SearchResult(best=best, runs=runs, final_seconds=time.perf_counter() - start, trainer=final)


def select_learning_rate(
    model_init: Callable[[], object],
    train_dataset,
    args: DEELBoTrainingArguments,
    learning_rates: Sequence[float] = PAPER_LEARNING_RATES,
    num_samples: int = 10,
    objective_dataset=None,
    **trainer_kwargs,
) -> SearchResult:
    """DE ELBO with each learning rate on all N examples; the winner has the lowest final training
    objective (`DEELBoTrainer.training_objective` on `objective_dataset`, the training set without
    augmentation, default `train_dataset`, over `num_samples` draws). No validation data is used."""
    runs, best = [], None
    for lr in learning_rates:
        start = time.perf_counter()
        trainer = DEELBoTrainer(
            model=model_init(),
            args=_run_args(args, os.path.join(args.output_dir, f"lr-{lr:g}"), learning_rate=lr),
            train_dataset=train_dataset,
            **trainer_kwargs,
        )
        try:
            trainer.train()
            score = trainer.training_objective(objective_dataset or train_dataset, num_samples=num_samples)
        except FloatingPointError:  # a diverged learning rate is simply not chosen
            score = float("inf")
        score = float(score) if np.isfinite(score) else float("inf")  # NaN or inf: never chosen
        runs.append(SearchRun({"learning_rate": lr}, score, time.perf_counter() - start,
                              learned=trainer.learned_hyperparameters()))
        if np.isfinite(score) and (best is None or score < best[0].score):
            best = (runs[-1], trainer)  # only the best run's model stays in memory
        del trainer
    if best is None:
        raise FloatingPointError(f"DE ELBO diverged at every learning rate of {list(learning_rates)}; try smaller ones.")
    best_run, best_trainer = best
    best_trainer.args = dataclasses.replace(best_trainer.args, output_dir=args.output_dir)
    # Building the later runs' arguments reset accelerate's process-wide state, which the best
    # trainer's accelerator reads: give it a fresh one before it is used again.
    best_trainer.create_accelerator_and_postprocess()
    return SearchResult(best=best_run.settings, runs=runs, final_seconds=0.0, trainer=best_trainer)
