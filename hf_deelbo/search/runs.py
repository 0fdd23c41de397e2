"""The one loop every search trains through (`search`), the record of a run and of a search, and
the rule that a run that diverged is scored inf (`train_and_score`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


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
        value, metrics = train_and_score(trainer, score)
        runs.append(
            SearchRun(
                dict(settings),
                value,
                time.perf_counter() - start,
                learned=learned(trainer) if learned else {},
                metrics=metrics,
            )
        )
        if keep_best and np.isfinite(value) and (best is None or value < best[0].score):
            best = (runs[-1], trainer)
        del trainer
    return runs, best


def train_and_score(trainer, score: Callable[[object], float], **train_kwargs) -> tuple[float, dict]:
    """Train `trainer` (`train_kwargs` to `train()`) and score it, lower being better: (score, the
    metrics `train()` returned). A run that diverges (FloatingPointError, metrics then empty) or
    scores NaN or inf scores inf, so that no search ever chooses it."""
    metrics = {}
    try:
        metrics = trainer.train(**train_kwargs).metrics
        value = float(score(trainer))
    except FloatingPointError:
        value = float("inf")
    return (value if math.isfinite(value) else float("inf")), metrics


def _chosen_trainer(best_trainer, args):
    """The best run's trainer, pointed at the search's output_dir and ready to be used again."""
    best_trainer.args = dataclasses.replace(best_trainer.args, output_dir=args.output_dir)
    # Building the later runs' arguments reset accelerate's process-wide state, which the best
    # trainer's accelerator reads: give it a fresh one before it is used again.
    best_trainer.create_accelerator_and_postprocess()
    return best_trainer
