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

import contextlib
import dataclasses
import functools
import gc
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .core.run_files import RUN_FILES_NAME
from .core.validation import stratified_split
from .methods.deelbo.arguments import DEELBoTrainingArguments
from .methods.deelbo.trainer import DEELBoTrainer
from .methods.l2sp import L2SPTrainer, L2SPTrainingArguments

# The paper's grids (Harvey et al. 2024, Sec. 5, after Li et al. 2018).
PAPER_STRENGTHS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0)
PAPER_LEARNING_RATES = (0.1, 0.01, 0.001, 0.0001)

# The cool-down of each scored branch of successive halving, as a fraction of the steps trained
# before it: Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
# Durations") find that decaying the learning rate over the last ~20 % of a constant-learning-rate
# run reaches a cosine schedule's loss.
HALVING_COOLDOWN_FRACTION = 0.2


@dataclass
class SearchRun:
    """One training run of a search: its settings, its score (lower is better), wall time, what
    the run learned (`learned`: DE ELBO's `learned_hyperparameters()`; empty for the others) and
    the metrics `train()` returned (empty for a run that diverged).

    Successive halving (`select_learning_rate(strategy="halving")`) also records the optimizer steps
    the run trained (`steps`, its cool-down branches included), its score in each round it took part
    in (`round_scores`; `score` is the last of them) and the round that eliminated it
    (`eliminated_at`, 1-based; None for the chosen run). The other searches leave them at None / empty."""

    settings: dict
    score: float
    seconds: float
    learned: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    steps: int | None = None
    round_scores: list[float] = field(default_factory=list)
    eliminated_at: int | None = None

    @property
    def eliminated(self) -> bool:
        return self.eliminated_at is not None


@dataclass
class SearchResult:
    best: dict
    runs: list[SearchRun]
    final_seconds: float
    trainer: object = field(repr=False)
    total_steps: int | None = None  # optimizer steps of every run together (successive halving only)

    @property
    def total_seconds(self) -> float:
        """Compute of the whole procedure: every run of the search plus the final retrain (if any)."""
        return sum(run.seconds for run in self.runs) + self.final_seconds


def _run_args(args, output_dir: str, **changes):
    # A search run writes nothing: no checkpoints, no Hub pushes, no report_to integrations.
    return dataclasses.replace(
        args, output_dir=output_dir, save_strategy="no", push_to_hub=False, report_to="none", **changes
    )


@contextlib.contextmanager
def objects_frozen_out_of_collections():
    """Freezes the objects that exist now out of the garbage collector's full collections
    (`gc.freeze`) until the block ends (`gc.unfreeze`), unless the caller froze some already.

    Every `Trainer.train()` ends with a full collection (accelerate's `free_memory`), which walks
    every object the process tracks: about 0.8 s once torch and transformers are imported (half a
    million objects), paid by each run of a search and by each segment of successive halving. The
    objects that exist before a search outlive it, so nothing is lost by leaving them out; the
    runs' own objects are collected as before. On the functions that train (`search`, the grid's
    retrain, successive halving); the others reach them."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@objects_frozen_out_of_collections()
def search(
    candidates: Sequence[dict],
    make_trainer: Callable[[int, dict], object],
    score: Callable[[object], float],
    learned: Callable[[object], dict] | None = None,
    keep_best: bool = False,
) -> tuple[list[SearchRun], tuple[SearchRun, object] | None]:
    """Train one run per settings in `candidates` and score it (lower is better).

    A run that diverges (FloatingPointError) or scores NaN or inf is recorded with score inf and is
    never chosen. Returns every run and, with `keep_best`, (the best run, its trainer): only that
    run's model stays in memory; the first of equal scores wins.

    Args:
        make_trainer: (index, settings) -> a trainer for that run.
        score: the run's score from its trained trainer.
        learned: what the run learned, from its trained trainer (kept in `SearchRun.learned`).
    """
    runs, best = [], None
    for i, settings in enumerate(candidates):
        start = time.perf_counter()
        trainer = make_trainer(i, settings)
        metrics = {}
        try:
            metrics = trainer.train().metrics
            value = float(score(trainer))
        except FloatingPointError:
            value = float("inf")
        value = value if np.isfinite(value) else float("inf")
        runs.append(SearchRun(dict(settings), value, time.perf_counter() - start,
                              learned=learned(trainer) if learned else {}, metrics=metrics))
        if keep_best and np.isfinite(value) and (best is None or value < best[0].score):
            best = (runs[-1], trainer)
        del trainer
    return runs, best


def _chosen_trainer(best_trainer, args):
    """The best run's trainer, pointed at the search's output_dir and ready to be used again."""
    best_trainer.args = dataclasses.replace(best_trainer.args, output_dir=args.output_dir)
    # Building the later runs' arguments reset accelerate's process-wide state, which the best
    # trainer's accelerator reads: give it a fresh one before it is used again.
    best_trainer.create_accelerator_and_postprocess()
    return best_trainer


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
    grid = [{"alpha": a, "beta": b, "learning_rate": lr} for a, b, lr in itertools.product(alphas, betas, learning_rates)]
    runs, _ = search(
        grid,
        lambda i, settings: L2SPTrainer(model=model_init(), train_dataset=tuning_set, **trainer_kwargs,
                                        args=_run_args(args, os.path.join(args.output_dir, f"grid-{i}"), **settings)),
        lambda trainer: trainer.evaluate(validation_set)["eval_loss"],
    )
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
    strategy: Literal["full", "halving"] = "full",
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
    score_dataset = objective_dataset if objective_dataset is not None else train_dataset

    def score(trainer, draws: int = num_samples):
        return trainer.training_objective(score_dataset, num_samples=draws)

    if strategy == "halving":
        if not (isinstance(halving_num_samples, int) and halving_num_samples >= 1):
            raise ValueError(f"halving_num_samples must be an int >= 1 (draws of the objective at each round of "
                             f"successive halving); got {halving_num_samples!r}")
        fraction = halving_cooldown_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(f"halving_cooldown_fraction must be a number in [0, 1] (the cool-down before each early "
                             f"score, as a fraction of the steps trained; 0 scores the paused run as it is); got "
                             f"{fraction!r}")
        return _select_by_halving(model_init, train_dataset, args, learning_rates,
                                  functools.partial(score, draws=halving_num_samples), cooldown_fraction=fraction,
                                  **trainer_kwargs)
    if strategy != "full":
        raise ValueError(f"strategy must be 'full' (every run to the end) or 'halving' (successive halving); "
                         f"got {strategy!r}")
    return learning_rate_search(
        DEELBoTrainer, model_init, train_dataset, args, learning_rates, score=score,
        learned=lambda trainer: trainer.learned_hyperparameters(), method_name="DE ELBO", **trainer_kwargs,
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
        trainer_class, model_init, train_dataset, args, learning_rates,
        score=lambda trainer: trainer.evaluate(trainer.validation_dataset)["eval_loss"],
        method_name=trainer_class.__name__, **trainer_kwargs,
    )


def learning_rate_search(trainer_class, model_init, train_dataset, args, learning_rates, score, method_name: str,
                          learned=None, **trainer_kwargs) -> SearchResult:
    """One `trainer_class` run per learning rate on `train_dataset`; the lowest `score(trainer)` wins
    and its trainer is returned, pointed at `args.output_dir` (e.g. plain fine-tuning's lr chosen by
    the final training loss: `L2SPTrainer` at α = β = 0, `score=lambda t: t.evaluate(train)["eval_loss"]`)."""
    runs, best = search(
        [{"learning_rate": lr} for lr in learning_rates],
        lambda _, settings: trainer_class(
            model=model_init(), train_dataset=train_dataset, **trainer_kwargs,
            args=_run_args(args, os.path.join(args.output_dir, f"lr-{settings['learning_rate']:g}"), **settings),
        ),
        score,
        learned=learned,
        keep_best=True,
    )
    if best is None:
        raise FloatingPointError(f"{method_name} diverged at every learning rate of {list(learning_rates)}; try smaller ones.")
    best_run, best_trainer = best
    return SearchResult(best=best_run.settings, runs=runs, final_seconds=0.0, trainer=_chosen_trainer(best_trainer, args))


def halving_min_steps(num_candidates: int) -> int:
    """The shortest `max_steps` successive halving of `num_candidates` can pause in: its first
    round ends at max_steps / 2^(R+2), R = ceil(log2 k) eliminations (1 for a single candidate)."""
    eliminations = math.ceil(math.log2(num_candidates)) if num_candidates > 1 else 0
    return 2 ** (eliminations + 2) if eliminations else 1


def halving_schedule(num_candidates: int, max_steps: int) -> list[tuple[int, int]]:
    """The rounds of successive halving: [(t_r, n_r)] for r = 1 … R + 1, where n_r runs are trained
    up to step t_r, and the best ceil(n_r / 2) of them (by their score after a cool-down from t_r,
    `halving_cooldown_steps`) go on to round r + 1.

    With k = `num_candidates`, T = `max_steps` and R = ceil(log2 k) eliminations:

        n_1 = k,  n_{r+1} = ceil(n_r / 2)          (n_{R+1} = 1: the chosen run)
        t_r = floor(T / 2^(R+3-r)) for r ≤ R,  t_{R+1} = T,  t_0 = 0
                                                     (the chosen run is complete)

    The eliminations happen in the first eighth of the schedule, each round twice as long as the
    one before: for 4 candidates at T/16 and T/8."""
    if num_candidates < 1:
        raise ValueError(f"successive halving needs at least one candidate; got {num_candidates}")
    eliminations = math.ceil(math.log2(num_candidates)) if num_candidates > 1 else 0
    shortest = halving_min_steps(num_candidates)
    if max_steps < shortest:
        raise ValueError(
            f"successive halving of {num_candidates} candidates pauses first at max_steps / {shortest}, so it needs "
            f"max_steps >= {shortest}; got max_steps={max_steps}. Raise max_steps or pass fewer candidates."
        )
    rounds, survivors = [], num_candidates
    for r in range(1, eliminations + 1):
        rounds.append((max_steps // 2 ** (eliminations + 3 - r), survivors))
        survivors = math.ceil(survivors / 2)
    return rounds + [(max_steps, survivors)]


def halving_cooldown_steps(step: int, cooldown_fraction: float = HALVING_COOLDOWN_FRACTION) -> int:
    """c_r = ceil(f · t_r): the optimizer steps of the cool-down branch that scores a run paused at
    step t_r (f = `cooldown_fraction`; 0 scores the run at t_r itself)."""
    return math.ceil(round(cooldown_fraction * step, 9))


def halving_budget(num_candidates: int, max_steps: int,
                   cooldown_fraction: float = HALVING_COOLDOWN_FRACTION) -> int:
    """The optimizer steps successive halving trains in all (when no run diverges): the schedule's
    Σ_r n_r · (t_r − t_{r−1}) plus the cool-downs Σ_{r ≤ R} n_r · c_r.

    For k = 2^R candidates and T divisible by 2^(R+3): T · (1 + R/8) + f · R·T/4, so with the
    default f = 0.2, (1 + 7R/40) · T: 1.175T for 2, **1.35T for 4** (the full selection: 4T), 1.525T
    for 8."""
    total, previous = 0, 0
    for step, survivors in halving_schedule(num_candidates, max_steps):
        total += survivors * (step - previous)
        if step != max_steps:
            total += survivors * halving_cooldown_steps(step, cooldown_fraction)
        previous = step
    return total


class PauseAtStep(TrainerCallback):
    """Pauses a run at step `step` of its full schedule: saves a checkpoint there, then trains
    `cooldown_steps` = c more steps with the learning rate decayed linearly towards 0 (the k-th of
    them, k = 1 … c, at the schedule's rate × (1 − k/(c + 1)), every optimizer group) and stops.
    The cool-down is a branch: it is scored and dropped, and the run continues from the checkpoint.

    The run is built with its full `max_steps`, so its learning-rate schedule is the full run's
    whatever the pause; `trainer.train(resume_from_checkpoint=...)` continues it exactly (the
    checkpoint is written before the cool-down changes anything). The callback keeps no state, so
    nothing of it is restored on resume, and each segment of a run gets its own (or none, for the
    last one)."""

    def __init__(self, step: int, cooldown_steps: int = 0):
        self.step, self.cooldown_steps = step, cooldown_steps

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        k = state.global_step - self.step + 1  # the step being taken is global_step + 1
        if 1 <= k <= self.cooldown_steps:
            # The scheduler sets every group's lr afresh after each step, so scaling here is per step.
            for group in optimizer.param_groups:
                group["lr"] *= 1 - k / (self.cooldown_steps + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
        if state.global_step == self.step + self.cooldown_steps:
            control.should_training_stop = True


@objects_frozen_out_of_collections()
def _select_by_halving(
    model_init: Callable[[], object], train_dataset, args: DEELBoTrainingArguments, learning_rates: Sequence[float],
    score: Callable[[object], float], cooldown_fraction: float = HALVING_COOLDOWN_FRACTION, **trainer_kwargs,
) -> SearchResult:
    """`select_learning_rate(strategy="halving")`: the choice by successive halving, 1.35 runs' steps
    for 4 learning rates instead of 4 runs, no validation data; the chosen run is a complete run of
    `args.max_steps`.

    With T = `args.max_steps` (required > 0) and the rounds of `halving_schedule`: every learning
    rate trains up to t_1 (T/16 for 4 of them) and is scored after a cool-down branch (c_1 =
    ceil(f · t_1) more steps with its learning rate decayed linearly towards 0, f =
    `cooldown_fraction`, `PauseAtStep`; scored by the training objective, the full selection's,
    with `halving_num_samples` draws); the best half continue from t_1 (not from the branch's end)
    to t_2 (T/8), are scored the same way, and so on until one run is left; it continues to T and
    is scored once more (its objective at the end, for the record). Total steps: `halving_budget`,
    1.35T for 4 learning rates. Each score costs one forward pass over the objective's examples per
    draw (the full selection's 10 draws at N = 500 cost a fifth of a 200-step run), hence one here.

    Why the cool-down: early in a schedule the objective at a large learning rate is that of iterates
    bouncing across a valley, so an early comparison favours small learning rates that lose at T.
    Decaying the learning rate for a few steps takes most of that noise out (Hägele et al. 2024) and
    compares the runs at what they would reach if annealed. It does not help where the large
    learning rate is worse even annealed until late (the ViT on the noise-40 task at N = 500 leads
    only from 3T/4: docs/benchmarks.md, "What the halving numbers say").

    Each run is trained with the full `max_steps` (its learning-rate schedule is the full run's),
    paused at t_r with a checkpoint, and continued later from that checkpoint by a fresh trainer
    with a fresh model from `model_init`: the package's exact resume makes the chosen run bitwise
    the uninterrupted run with its learning rate. Checkpoints go to `<output_dir>/lr-<lr>/`; each is
    deleted once its run moved past it or was eliminated, and the run directories once empty.

    A run that diverges (FloatingPointError) or scores NaN or inf is scored inf, eliminated and
    never chosen; FloatingPointError if every learning rate does, or if the last run left diverges
    after its competitors were eliminated. Agrees with `select_learning_rate` only where the ranking
    of the cooled-down objective at the early rounds is the ranking at T.

    Returns a `SearchResult` whose `runs` hold per learning rate the optimizer steps trained
    (cool-downs included), the score at each round, the wall time and the round that eliminated it;
    `total_steps` and `total_seconds` are those of the whole procedure; `trainer` is the chosen
    run's, pointed at `args.output_dir`.
    """
    max_steps = args.max_steps
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(
            f"select_learning_rate(strategy='halving') pauses runs at fractions of max_steps, so max_steps must be > 0; got "
            f"{max_steps}. Set max_steps to the length of the full run (num_train_epochs is not used)."
        )
    learning_rates = list(learning_rates)
    if len(set(learning_rates)) != len(learning_rates):
        raise ValueError(f"learning_rates must be distinct; got {learning_rates}")
    schedule = halving_schedule(len(learning_rates), max_steps)
    run_dirs = [os.path.join(args.output_dir, f"lr-{lr:g}") for lr in learning_rates]
    for run_dir in run_dirs:
        # The runs' checkpoints are deleted as the search goes: refuse a directory that already holds files.
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise FileExistsError(
                f"{run_dir!r} already holds files, where successive halving would write and delete its "
                "checkpoints; move it away or choose another output_dir."
            )
    user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    runs = [SearchRun({"learning_rate": lr}, float("inf"), 0.0, steps=0) for lr in learning_rates]
    checkpoints: dict[int, str] = {}  # run -> the checkpoint it continues from
    alive, chosen = list(range(len(learning_rates))), None

    def drop_checkpoint(i: int) -> None:
        path = checkpoints.pop(i, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    try:
        for round_index, (step, _) in enumerate(schedule, start=1):
            last = step == max_steps
            cooldown = 0 if last else halving_cooldown_steps(step, cooldown_fraction)
            resumed_at = schedule[round_index - 2][0] if round_index > 1 else 0  # where this round's runs paused
            for i in alive:
                start = time.perf_counter()
                run_args = _run_args(args, run_dirs[i], learning_rate=learning_rates[i], save_total_limit=None,
                                     save_only_model=False, ignore_data_skip=False)
                callbacks = user_callbacks + ([] if last else [PauseAtStep(step, cooldown)])
                trainer = DEELBoTrainer(model=model_init(), args=run_args, train_dataset=train_dataset,
                                        callbacks=callbacks or None, **trainer_kwargs)
                try:
                    runs[i].metrics = trainer.train(resume_from_checkpoint=checkpoints.get(i)).metrics
                    value = float(score(trainer))
                except FloatingPointError:
                    value = float("inf")
                value = value if np.isfinite(value) else float("inf")
                runs[i].steps += trainer.state.global_step - resumed_at
                runs[i].round_scores.append(value)
                runs[i].score = value
                runs[i].learned = trainer.learned_hyperparameters()
                drop_checkpoint(i)  # superseded by the one written at `step` (or no longer needed)
                paused = os.path.join(run_dirs[i], f"{PREFIX_CHECKPOINT_DIR}-{step}")
                if not last and np.isfinite(value) and os.path.isdir(paused):
                    checkpoints[i] = paused
                if last and np.isfinite(value):
                    chosen = trainer
                runs[i].seconds += time.perf_counter() - start
                del trainer
            if last:
                break
            finite = [i for i in alive if np.isfinite(runs[i].score)]
            if not finite:
                raise FloatingPointError(
                    f"DE ELBO diverged at every learning rate of {learning_rates} (successive halving, round "
                    f"{round_index}, step {step}); try smaller ones."
                )
            keep = schedule[round_index][1]
            survivors = sorted(finite, key=lambda i: runs[i].score)[:keep]  # stable: the first of equal scores
            for i in alive:
                if i not in survivors:
                    runs[i].eliminated_at = round_index
                    drop_checkpoint(i)
            alive = [i for i in alive if i in survivors]
    finally:
        # Also a checkpoint written by a segment that failed before it was recorded: the run
        # directories held nothing before the search, so every checkpoint in them is the search's.
        for run_dir in run_dirs:
            for step, _ in schedule:
                shutil.rmtree(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), ignore_errors=True)
            if os.path.isfile(os.path.join(run_dir, RUN_FILES_NAME)):  # the record of those checkpoints
                os.unlink(os.path.join(run_dir, RUN_FILES_NAME))
            if os.path.isdir(run_dir) and not os.listdir(run_dir):
                os.rmdir(run_dir)
    if chosen is None:
        (i,) = alive
        runs[i].eliminated_at = len(schedule)
        raise FloatingPointError(
            f"DE ELBO diverged at learning rate {learning_rates[i]:g} between steps {schedule[-2][0]} and "
            f"{max_steps}, after successive halving had eliminated the others of {learning_rates}; drop it, or choose "
            "with select_learning_rate (full runs)."
        )
    (i,) = alive
    return SearchResult(best=dict(runs[i].settings), runs=runs, final_seconds=0.0,
                        trainer=_chosen_trainer(chosen, args), total_steps=sum(run.steps for run in runs))
