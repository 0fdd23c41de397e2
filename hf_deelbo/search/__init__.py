"""Choosing hyperparameters: the L2-SP grid search DE ELBO replaces, DE ELBO's learning-rate
selection (every run to the end, or successive halving in `halving`), and the selection of the
methods that learn on a validation split; all train through `runs.search`."""

from .halving import (
    HALVING_COOLDOWN_FRACTION,
    PauseAtStep,
    halving_budget,
    halving_cooldown_steps,
    halving_min_steps,
    halving_schedule,
)
from .runs import SearchResult, SearchRun, objects_frozen_out_of_collections, search, train_and_score
from .selection import (
    PAPER_LEARNING_RATES,
    PAPER_STRENGTHS,
    SelectionStrategy,
    l2sp_grid_search,
    learning_rate_search,
    select_learning_rate,
    select_learning_rate_by_validation,
)

__all__ = [
    "HALVING_COOLDOWN_FRACTION",
    "PAPER_LEARNING_RATES",
    "PAPER_STRENGTHS",
    "PauseAtStep",
    "SearchResult",
    "SearchRun",
    "SelectionStrategy",
    "halving_budget",
    "halving_cooldown_steps",
    "halving_min_steps",
    "halving_schedule",
    "l2sp_grid_search",
    "learning_rate_search",
    "objects_frozen_out_of_collections",
    "search",
    "select_learning_rate",
    "select_learning_rate_by_validation",
    "train_and_score",
]
