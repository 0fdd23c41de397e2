"""Learning-rate selection by successive halving: the schedule, exact resume of the paused runs,
divergence, the choice, and the command line."""

import functools
import json
import math

import pytest
import torch
from conftest import build_model, image_dataset, training_args
from transformers import TrainerCallback

from hf_deelbo import DEELBoTrainer, select_learning_rate
from hf_deelbo.cli import main
from hf_deelbo.search import halving_budget, halving_cooldown_steps, halving_schedule

select_learning_rate_by_halving = functools.partial(select_learning_rate, strategy="halving")


@pytest.mark.parametrize(
    "num_candidates, max_steps, schedule, cooldowns, budget",
    [
        (1, 8, [(8, 1)], [], 8),
        (2, 8, [(1, 2), (8, 1)], [1], 11),  # 2·T/8 + 7T/8, cool-downs 2·1
        (2, 80, [(10, 2), (80, 1)], [2], 94),  # 1.125T + 2·(0.2·T/8) = 1.175T
        (3, 16, [(1, 3), (2, 2), (16, 1)], [1, 1], 24),  # 3·1 + 2·1 + 14, cool-downs 3·1 + 2·1
        (4, 16, [(1, 4), (2, 2), (16, 1)], [1, 1], 26),
        (4, 160, [(10, 4), (20, 2), (160, 1)], [2, 4], 216),  # 1.25T + 4·(0.2·T/16) + 2·(0.2·T/8) = 1.35T
        (4, 200, [(12, 4), (25, 2), (200, 1)], [3, 5], 271),  # floor(T/16), floor(T/8), ceil(0.2·t_r)
        (8, 320, [(10, 8), (20, 4), (40, 2), (320, 1)], [2, 4, 8], 488),  # 1.375T + 3·(0.2·T/4) = 1.525T
    ],
)
def test_schedule_and_budget_follow_the_closed_form(num_candidates, max_steps, schedule, cooldowns, budget):
    assert halving_schedule(num_candidates, max_steps) == schedule
    assert [halving_cooldown_steps(step) for step, _ in schedule[:-1]] == cooldowns
    assert halving_budget(num_candidates, max_steps) == budget
    previous, total = 0, 0
    for r, (step, survivors) in enumerate(schedule):
        total += survivors * (step - previous + (cooldowns[r] if r < len(cooldowns) else 0))
        previous = step
    assert total == budget
    # without the cool-downs: the schedule's steps alone
    assert halving_budget(num_candidates, max_steps, cooldown_fraction=0) == budget - sum(
        survivors * c for (_, survivors), c in zip(schedule, cooldowns, strict=False)
    )


def test_schedule_needs_enough_steps_to_pause():
    with pytest.raises(ValueError, match="max_steps >= 16; got max_steps=15"):
        halving_schedule(4, 15)


def _args(tmp_path, **overrides):
    values = dict(
        max_steps=16,
        learning_rate=0.05,
        per_device_train_batch_size=4,
        max_grad_norm=0.0,
        objective_batch_norm="running",
    )
    return training_args(tmp_path, **{**values, **overrides})


def test_halving_requires_max_steps(tmp_path):
    with pytest.raises(ValueError, match="max_steps must be > 0; got -1"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0], image_dataset(8), _args(tmp_path, max_steps=-1, num_train_epochs=1)
        )


class StepCounter(TrainerCallback):
    """Records the optimizer steps actually taken, by every trainer it is given to, with the learning
    rate of every optimizer group at that step, and lists the checkpoints on disk as each run (re)starts."""

    def __init__(self, root):
        self.steps, self.checkpoints_at_start, self.root = [], [], root

    def on_train_begin(self, args, state, control, **kwargs):
        found = sorted(str(p.relative_to(self.root)) for p in self.root.glob("lr-*/checkpoint-*"))
        self.checkpoints_at_start.append((args.learning_rate, found))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # global_step is still the previous step's here: the step taken is global_step + 1
        self.steps.append(
            (args.learning_rate, state.global_step + 1, tuple(group["lr"] for group in optimizer.param_groups))
        )


def test_runs_follow_the_schedule_and_the_winner_is_bitwise_the_uninterrupted_run(tmp_path):
    """4 learning rates, T = 16: all to 1, two to 2, one to 16, each early score after a 1-step
    cool-down branch (26 steps); the chosen run, paused at 1 and 2 and continued each time from
    the checkpoint by a fresh trainer, equals a run of 16 steps."""
    dataset = image_dataset(16)
    learning_rates = (0.05, 0.02, 0.005, 0.001)
    counter = StepCounter(tmp_path / "halving" / "out")
    result = select_learning_rate_by_halving(
        lambda: build_model("resnet")[0],
        dataset,
        _args(tmp_path / "halving"),
        learning_rates=learning_rates,
        num_samples=2,
        callbacks=[counter],
    )
    runs = {run.settings["learning_rate"]: run for run in result.runs}
    assert len(counter.steps) == 26 == result.total_steps == halving_budget(4, 16)
    # per run: the steps of each segment; a cool-down step (the branch) is taken again by the continued run
    expected = {1: [1, 2], 2: [1, 2, 2, 3], None: [1, 2, 2, 3, *range(3, 17)]}
    for lr, run in runs.items():
        assert [step for rate, step, _ in counter.steps if rate == lr] == expected[run.eliminated_at]
        assert run.steps == len(expected[run.eliminated_at])
    assert sorted(len(run.round_scores) for run in result.runs) == [1, 1, 2, 3]
    assert sorted(run.eliminated_at or 0 for run in result.runs) == [0, 1, 1, 2]
    for run in result.runs:
        assert run.seconds > 0 and run.score == run.round_scores[-1]
    assert result.total_seconds == pytest.approx(sum(run.seconds for run in result.runs))
    best = result.best["learning_rate"]
    # on disk: only the checkpoints still needed (an eliminated run's and a superseded one are deleted)
    survivors = sorted(lr for lr, run in runs.items() if run.eliminated_at != 1)
    assert counter.checkpoints_at_start[4:] == [
        (survivors[1], [f"lr-{survivors[0]:g}/checkpoint-1", f"lr-{survivors[1]:g}/checkpoint-1"]),
        (survivors[0], [f"lr-{survivors[0]:g}/checkpoint-1", f"lr-{survivors[1]:g}/checkpoint-2"]),
        (best, [f"lr-{best:g}/checkpoint-2"]),
    ]
    assert not runs[best].eliminated and result.trainer.args.learning_rate == best
    assert result.trainer.state.global_step == 16
    assert result.trainer.args.output_dir == str(tmp_path / "halving" / "out")
    assert not list((tmp_path / "halving" / "out").glob("lr-*"))  # every checkpoint deleted, run directories too

    straight_model = build_model("resnet")[0]
    straight_counter = StepCounter(tmp_path / "straight")
    straight = DEELBoTrainer(
        model=straight_model,
        args=_args(tmp_path / "straight", learning_rate=best),
        train_dataset=dataset,
        callbacks=[straight_counter],
    )
    straight.train()
    chosen_state = result.trainer.model.state_dict()
    for name, value in straight_model.state_dict().items():
        assert torch.equal(value, chosen_state[name]), name
    assert straight.learned_hyperparameters() == result.trainer.learned_hyperparameters()  # λ, τ, σ, ...
    assert torch.equal(straight.posterior.rho, result.trainer.posterior.rho)
    assert straight.training_objective(dataset, num_samples=1) == runs[best].round_scores[-1]
    # learning rates: the schedule's everywhere, but halved (1 − 1/(c + 1), c = 1) on each cool-down step
    scheduled = {step: lrs for _, step, lrs in straight_counter.steps}
    taken = [(step, lrs) for rate, step, lrs in counter.steps if rate == best]
    cooldown_positions = {1, 3}  # the second and fourth steps the chosen run took: the branches at 1 and 2
    for position, (step, lrs) in enumerate(taken):
        factor = 0.5 if position in cooldown_positions else 1.0
        assert lrs == pytest.approx(tuple(factor * lr for lr in scheduled[step]), rel=1e-12), (position, step)
    assert scheduled[2][0] > 0 and len(scheduled[2]) >= 2  # the weights' group and ρ's


def test_a_diverging_learning_rate_is_eliminated_and_never_chosen(tmp_path):
    result = select_learning_rate_by_halving(
        lambda: build_model("resnet")[0],
        image_dataset(12),
        _args(tmp_path),
        learning_rates=(1e12, 0.05),
        num_samples=2,
    )
    runs = {run.settings["learning_rate"]: run for run in result.runs}
    assert runs[1e12].round_scores == [math.inf] and runs[1e12].eliminated_at == 1 and runs[1e12].steps <= 4
    assert result.best == {"learning_rate": 0.05} and math.isfinite(runs[0.05].score)
    assert result.trainer.state.global_step == 16


def test_every_learning_rate_diverging_raises(tmp_path):
    with pytest.raises(FloatingPointError, match=r"every learning rate of \[1000000000000.0, 10000000000000.0\]"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0],
            image_dataset(12),
            _args(tmp_path),
            learning_rates=(1e12, 1e13),
            num_samples=2,
        )
    assert not list((tmp_path / "out").glob("lr-*"))


# Scores by (learning rate, step scored) where the ranking changes between rounds (T = 16: the
# rounds pause at 1 and 2 and score after a 1-step cool-down, at steps 2 and 3): 0.04 leads in
# round 1, 0.01 in round 2; 0.001 is worst in round 1 but would be best in round 2 (it never gets there).
SCORES = {
    (0.04, 2): 1.0,
    (0.01, 2): 2.0,
    (0.02, 2): 3.0,
    (0.001, 2): 4.0,
    (0.04, 3): 2.5,
    (0.01, 3): 1.5,
    (0.02, 3): 0.5,
    (0.001, 3): 0.1,
    (0.04, 16): 9.0,
    (0.01, 16): 9.0,
    (0.02, 16): 9.0,
    (0.001, 16): 9.0,
}


def _halving_with_scores(scores, tmp_path, monkeypatch, draws=None):
    """Successive halving over 4 learning rates whose objective at (lr, step) is `scores`'s; each
    call's (step, num_samples) goes to `draws`."""

    def known_score(trainer, dataset=None, num_samples=10):
        if draws is not None:
            draws.append((trainer.state.global_step, num_samples))
        return scores[(trainer.args.learning_rate, trainer.state.global_step)]

    monkeypatch.setattr(DEELBoTrainer, "training_objective", known_score)
    result = select_learning_rate_by_halving(
        lambda: build_model("resnet")[0],
        image_dataset(8),
        _args(tmp_path),
        learning_rates=(0.04, 0.01, 0.02, 0.001),
        num_samples=5,
        halving_num_samples=2,
    )
    return result, {run.settings["learning_rate"]: run for run in result.runs}


def test_the_chosen_learning_rate_has_the_lowest_score_at_the_last_round(tmp_path, monkeypatch):
    draws = []
    result, runs = _halving_with_scores(SCORES, tmp_path, monkeypatch, draws)
    # every round, the chosen run's end included, uses halving_num_samples draws (num_samples is the full selection's)
    assert draws == [(2, 2)] * 4 + [(3, 2)] * 2 + [(16, 2)]
    assert result.best == {"learning_rate": 0.01}
    assert {lr: run.eliminated_at for lr, run in runs.items()} == {0.04: 2, 0.01: None, 0.02: 1, 0.001: 1}
    assert runs[0.01].round_scores == [2.0, 1.5, 9.0] and runs[0.04].round_scores == [1.0, 2.5]
    assert runs[0.02].round_scores == [3.0]


def test_a_non_finite_score_is_eliminated_and_never_chosen(tmp_path, monkeypatch):
    scores = {**SCORES, (0.04, 2): math.nan}  # 0.04 would lead in round 1
    result, runs = _halving_with_scores(scores, tmp_path, monkeypatch)
    assert runs[0.04].round_scores == [math.inf] and runs[0.04].eliminated_at == 1
    assert {lr: run.eliminated_at for lr, run in runs.items()} == {0.04: 1, 0.01: 2, 0.02: None, 0.001: 1}
    assert result.best == {"learning_rate": 0.02}


def test_the_last_run_diverging_raises_naming_it(tmp_path, monkeypatch):
    scores = {**SCORES, (0.01, 16): math.inf}

    monkeypatch.setattr(
        DEELBoTrainer,
        "training_objective",
        lambda trainer, dataset=None, num_samples=10: scores[(trainer.args.learning_rate, trainer.state.global_step)],
    )
    with pytest.raises(FloatingPointError, match="at learning rate 0.01 between steps 2 and 16"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0],
            image_dataset(8),
            _args(tmp_path),
            learning_rates=(0.04, 0.01, 0.02, 0.001),
            num_samples=2,
        )


def test_a_search_that_fails_midway_leaves_no_checkpoints(tmp_path, monkeypatch):
    def failing_score(trainer, dataset=None, num_samples=10):
        if trainer.state.global_step == 3:  # round 2's score
            raise RuntimeError("interrupted")
        return SCORES[(trainer.args.learning_rate, trainer.state.global_step)]

    monkeypatch.setattr(DEELBoTrainer, "training_objective", failing_score)
    with pytest.raises(RuntimeError, match="interrupted"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0],
            image_dataset(8),
            _args(tmp_path),
            learning_rates=(0.04, 0.01, 0.02, 0.001),
            num_samples=2,
        )
    assert not list((tmp_path / "out").glob("lr-*"))


def test_an_output_dir_holding_a_run_directory_is_refused(tmp_path):
    (tmp_path / "out" / "lr-0.05").mkdir(parents=True)
    (tmp_path / "out" / "lr-0.05" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="lr-0.05"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0], image_dataset(8), _args(tmp_path), learning_rates=(0.05, 0.01)
        )
    assert (tmp_path / "out" / "lr-0.05" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_halving_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--output_dir",
            str(out),
            "--max_steps",
            "8",
            "--max_train_samples",
            "30",
            "--learning_rates",
            "0.05",
            "0.001",
            "--learning_rate_selection",
            "halving",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    selection = json.loads((out / "learning_rate_selection.json").read_text())
    assert selection["selection"] == "halving" and selection["total_steps"] == 11  # 2·T/8 + 7T/8 + 2 cool-down steps
    runs = {run["learning_rate"]: run for run in selection["runs"]}
    assert set(runs) == {0.05, 0.001}
    chosen = selection["chosen"]["learning_rate"]
    other = ({0.05, 0.001} - {chosen}).pop()
    assert runs[chosen]["steps"] == 9 and runs[chosen]["eliminated_at"] is None  # its 8 and one cool-down step
    assert runs[other]["steps"] == 2 and runs[other]["eliminated_at"] == 1
    assert runs[chosen]["round_scores"][0] <= runs[other]["round_scores"][0]
    assert runs[chosen]["learned"]["sigma"] == json.loads((out / "config.json").read_text())["deelbo"]["sigma"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert "successive halving" in capsys.readouterr().out
    assert not any(p.name.startswith("lr-") for p in out.iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--learning_rates", "0.1", "0.01", "--learning_rate_selection", "quick"],
            "--learning_rate_selection/--learning-rate-selection: invalid choice: 'quick' (choose from 'full', 'halving')",
        ),
        (
            ["--learning_rate_selection", "halving"],
            "--learning_rate_selection halving chooses among --learning_rates; pass them too",
        ),
        (
            ["--learning_rates", "0.1", "0.01", "--learning_rate_selection", "halving", "--max_steps", "-1"],
            "--learning_rate_selection halving pauses runs at fractions of --max_steps, so it needs --max_steps > 0; "
            "got -1",
        ),
        (
            ["--learning_rates", "0.1", "0.01", "0.001", "--learning_rate_selection", "halving", "--max_steps", "3"],
            "needs --max_steps >= 16 for 3 learning rates; got 3",
        ),
    ],
)
def test_bad_halving_flags_fail_in_one_line(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-deelbo")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_a_bad_selection_in_an_arguments_file_is_refused(tmp_path, capsys):
    (tmp_path / "args.json").write_text(json.dumps({"learning_rates": [0.1, 0.01], "learning_rate_selection": "fast"}))
    out = tmp_path / "run"
    assert main(["train", "--config_file", str(tmp_path / "args.json"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate_selection must be 'full'" in err and "got 'fast'" in err
    assert not out.exists()


@pytest.mark.parametrize("value", [0, 1.5, None])
def test_bad_halving_num_samples_is_refused_before_training(value, tmp_path):
    with pytest.raises(ValueError, match=f"halving_num_samples must be an int >= 1 .*; got {value!r}"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0],
            image_dataset(8),
            _args(tmp_path),
            learning_rates=(0.05, 0.01),
            halving_num_samples=value,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, None, True])
def test_bad_halving_cooldown_fraction_is_refused_before_training(value, tmp_path):
    with pytest.raises(ValueError, match=rf"halving_cooldown_fraction must be a number in \[0, 1\] .*; got {value!r}"):
        select_learning_rate_by_halving(
            lambda: build_model("resnet")[0],
            image_dataset(8),
            _args(tmp_path),
            learning_rates=(0.05, 0.01),
            halving_cooldown_fraction=value,
        )
    assert not (tmp_path / "out").exists()


def test_without_a_cool_down_each_round_is_scored_at_its_pause(tmp_path, monkeypatch):
    scores = {(lr, step): value for (lr, scored), value in SCORES.items() for step in [{2: 1, 3: 2, 16: 16}[scored]]}
    draws = []

    def known_score(trainer, dataset=None, num_samples=10):
        draws.append(trainer.state.global_step)
        return scores[(trainer.args.learning_rate, trainer.state.global_step)]

    monkeypatch.setattr(DEELBoTrainer, "training_objective", known_score)
    result = select_learning_rate_by_halving(
        lambda: build_model("resnet")[0],
        image_dataset(8),
        _args(tmp_path),
        learning_rates=(0.04, 0.01, 0.02, 0.001),
        halving_cooldown_fraction=0,
    )
    assert draws == [1] * 4 + [2] * 2 + [16]
    assert result.best == {"learning_rate": 0.01} and result.total_steps == 20 == halving_budget(4, 16, 0)


class FreezeCount(TrainerCallback):
    """Records how many objects the garbage collector holds frozen while each run trains."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, **kwargs):
        import gc

        self.counts.append(gc.get_freeze_count())


@pytest.mark.parametrize("strategy", ["full", "halving"])
def test_the_objects_before_a_search_are_left_out_of_its_collections(strategy, tmp_path):
    """Each run's Trainer.train() ends with a full garbage collection; the objects older than the
    search are frozen out of them (gc.freeze) during the search and released after it."""
    import gc

    counter = FreezeCount()
    assert gc.get_freeze_count() == 0
    select_learning_rate(
        lambda: build_model("resnet")[0],
        image_dataset(8),
        _args(tmp_path),
        learning_rates=(0.05, 0.01),
        num_samples=1,
        strategy=strategy,
        callbacks=[counter],
    )
    assert counter.counts and all(count > 0 for count in counter.counts)
    assert gc.get_freeze_count() == 0
