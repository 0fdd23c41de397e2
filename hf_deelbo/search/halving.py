"""Successive halving of DE ELBO's learning rates (`select_learning_rate(strategy="halving")`): the
same choice as the full selection at 1.35 runs' steps for 4 learning rates, each early score taken
after a short cool-down branch, each run paused and resumed exactly (`_select_by_halving`).

Why the cool-down: early in a schedule the objective at a large learning rate is that of iterates
bouncing across a valley, so an early comparison favours small learning rates that lose at T.
Decaying the learning rate for a few steps takes most of that noise out (Hägele et al. 2024) and
compares the runs at what they would reach if annealed. It does not help where the large
learning rate is worse even annealed until late (the ViT on the noise-40 task at N = 500 leads
only from 3T/4: docs/benchmarks/protocol-v1.md, "What the halving numbers say").

Each run is trained with the full `max_steps` (its learning-rate schedule is the full run's),
paused at t_r with a checkpoint, and continued later from that checkpoint by a fresh trainer
with a fresh model from `model_init`: the package's exact resume makes the chosen run bitwise
the uninterrupted run with its learning rate. Checkpoints go to `<output_dir>/lr-<lr>/`; each is
deleted once its run moved past it or was eliminated, and the run directories once empty.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.run_files import RUN_FILES_NAME
from ..methods.deelbo.arguments import DEELBoTrainingArguments
from ..methods.deelbo.trainer import DEELBoTrainer
from .runs import (
    SearchResult,
    SearchRun,
    _chosen_trainer,
    _run_args,
    objects_frozen_out_of_collections,
    train_and_score,
)

# The cool-down of each scored branch of successive halving, as a fraction of the steps trained
# before it: Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
# Durations") find that decaying the learning rate over the last ~20 % of a constant-learning-rate
# run reaches a cosine schedule's loss.
HALVING_COOLDOWN_FRACTION = 0.2


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


def halving_budget(num_candidates: int, max_steps: int, cooldown_fraction: float = HALVING_COOLDOWN_FRACTION) -> int:
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
    model_init: Callable[[], object],
    train_dataset,
    args: DEELBoTrainingArguments,
    learning_rates: Sequence[float],
    score: Callable[[object], float],
    cooldown_fraction: float = HALVING_COOLDOWN_FRACTION,
    **trainer_kwargs,
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
    learning_rates = list(learning_rates)
    _check_halving_arguments(max_steps, learning_rates)
    schedule = halving_schedule(len(learning_rates), max_steps)
    search = _HalvingRuns(model_init, train_dataset, args, learning_rates, score, trainer_kwargs)
    alive, chosen = list(range(len(learning_rates))), None
    try:
        for round_index, (step, _) in enumerate(schedule, start=1):
            last = step == max_steps
            cooldown = 0 if last else halving_cooldown_steps(step, cooldown_fraction)
            resumed_at = schedule[round_index - 2][0] if round_index > 1 else 0  # where this round's runs paused
            for i in alive:
                trainer = search.train_segment(i, step, cooldown, resumed_at, last)
                if last and trainer is not None:
                    chosen = trainer
            if last:
                break
            alive = search.eliminate(alive, schedule[round_index][1], round_index, step)
    finally:
        search.remove_checkpoints(schedule)
    (i,) = alive
    if chosen is None:
        search.runs[i].eliminated_at = len(schedule)
        raise FloatingPointError(
            f"DE ELBO diverged at learning rate {learning_rates[i]:g} between steps {schedule[-2][0]} and "
            f"{max_steps}, after successive halving had eliminated the others of {learning_rates}; drop it, or choose "
            "with select_learning_rate (full runs)."
        )
    return SearchResult(
        best=dict(search.runs[i].settings),
        runs=search.runs,
        final_seconds=0.0,
        trainer=_chosen_trainer(chosen, args),
        total_steps=sum(run.steps for run in search.runs),
    )


def _check_halving_arguments(max_steps, learning_rates: list[float]) -> None:
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(
            f"select_learning_rate(strategy='halving') pauses runs at fractions of max_steps, so max_steps must be > 0; got "
            f"{max_steps}. Set max_steps to the length of the full run (num_train_epochs is not used)."
        )
    if len(set(learning_rates)) != len(learning_rates):
        raise ValueError(f"learning_rates must be distinct; got {learning_rates}")


class _HalvingRuns:
    """The runs of one successive halving, one per learning rate, each trained in segments from the
    checkpoint its last segment paused at (`<output_dir>/lr-<lr>/`)."""

    def __init__(self, model_init, train_dataset, args, learning_rates: list[float], score, trainer_kwargs: dict):
        self.model_init, self.train_dataset, self.args, self.score = model_init, train_dataset, args, score
        self.learning_rates = learning_rates
        self.user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        self.trainer_kwargs = trainer_kwargs
        self.run_dirs = [os.path.join(args.output_dir, f"lr-{lr:g}") for lr in learning_rates]
        for run_dir in self.run_dirs:
            # The runs' checkpoints are deleted as the search goes: refuse a directory that already holds files.
            if os.path.isdir(run_dir) and os.listdir(run_dir):
                raise FileExistsError(
                    f"{run_dir!r} already holds files, where successive halving would write and delete its "
                    "checkpoints; move it away or choose another output_dir."
                )
        self.runs = [SearchRun({"learning_rate": lr}, float("inf"), 0.0, steps=0) for lr in learning_rates]
        self.checkpoints: dict[int, str] = {}  # run -> the checkpoint it continues from

    def train_segment(self, i: int, step: int, cooldown: int, resumed_at: int, last: bool):
        """Run i from its checkpoint to `step` (then a cool-down branch of `cooldown` steps, unless
        `last`), scored; returns its trainer if it ended the schedule with a finite score, else None."""
        start = time.perf_counter()
        run = self.runs[i]
        run_args = _run_args(
            self.args,
            self.run_dirs[i],
            learning_rate=self.learning_rates[i],
            save_total_limit=None,
            save_only_model=False,
            ignore_data_skip=False,
        )
        callbacks = self.user_callbacks + ([] if last else [PauseAtStep(step, cooldown)])
        trainer = DEELBoTrainer(
            model=self.model_init(),
            args=run_args,
            train_dataset=self.train_dataset,
            callbacks=callbacks or None,
            **self.trainer_kwargs,
        )
        value, run.metrics = train_and_score(trainer, self.score, resume_from_checkpoint=self.checkpoints.get(i))
        run.steps += trainer.state.global_step - resumed_at
        run.round_scores.append(value)
        run.score = value
        run.learned = trainer.learned_hyperparameters()
        self.drop_checkpoint(i)  # superseded by the one written at `step` (or no longer needed)
        paused = os.path.join(self.run_dirs[i], f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not last and np.isfinite(value) and os.path.isdir(paused):
            self.checkpoints[i] = paused
        run.seconds += time.perf_counter() - start
        return trainer if last and np.isfinite(value) else None

    def eliminate(self, alive: list[int], keep: int, round_index: int, step: int) -> list[int]:
        """The best `keep` of the runs still alive (the first of equal scores); the others are marked
        eliminated in `round_index` and their checkpoints dropped."""
        finite = [i for i in alive if np.isfinite(self.runs[i].score)]
        if not finite:
            raise FloatingPointError(
                f"DE ELBO diverged at every learning rate of {self.learning_rates} (successive halving, round "
                f"{round_index}, step {step}); try smaller ones."
            )
        survivors = sorted(finite, key=lambda i: self.runs[i].score)[:keep]  # stable: the first of equal scores
        for i in alive:
            if i not in survivors:
                self.runs[i].eliminated_at = round_index
                self.drop_checkpoint(i)
        return [i for i in alive if i in survivors]

    def drop_checkpoint(self, i: int) -> None:
        path = self.checkpoints.pop(i, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def remove_checkpoints(self, schedule) -> None:
        """Every checkpoint of the search, also one written by a segment that failed before it was
        recorded: the run directories held nothing before the search, so every checkpoint in them is
        the search's; then the directories left empty."""
        for run_dir in self.run_dirs:
            for step, _ in schedule:
                shutil.rmtree(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), ignore_errors=True)
            if os.path.isfile(os.path.join(run_dir, RUN_FILES_NAME)):  # the record of those checkpoints
                os.unlink(os.path.join(run_dir, RUN_FILES_NAME))
            if os.path.isdir(run_dir) and not os.listdir(run_dir):
                os.rmdir(run_dir)
