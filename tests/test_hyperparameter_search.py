"""L2-SP through `Trainer.hyperparameter_search` (optuna): one fresh model, and anchor, per trial."""

import pytest
from conftest import build_model, image_dataset

from hf_deelbo import DEELBoTrainer, L2SPTrainer, L2SPTrainingArguments

optuna = pytest.importorskip("optuna")

COMMON = dict(
    per_device_train_batch_size=8,
    max_steps=3,
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    save_strategy="no",
    optim="sgd",
    seed=0,
)


def _init():
    return build_model("resnet")[0]


def _space(trial):
    return {
        "alpha": trial.suggest_float("alpha", 1e-2, 10.0, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True),
    }


def test_each_trial_equals_a_run_of_its_own_with_the_same_settings(tmp_path):
    """A trial trains a fresh model anchored at *its* pretrained weights: its final training state
    equals that of a standalone L2SPTrainer with the trial's α and lr (a stale anchor, pointing at
    the previous trial's model, would pull toward the wrong weights and not leave them at μ)."""
    train, validation = image_dataset(16), image_dataset(8, seed=1)
    args = L2SPTrainingArguments(output_dir=str(tmp_path / "search"), alpha=0.0, beta=0.0, **COMMON)
    trainer = L2SPTrainer(model_init=_init, args=args, train_dataset=train, eval_dataset=validation)
    storage = optuna.storages.InMemoryStorage()
    best = trainer.hyperparameter_search(
        hp_space=_space,
        backend="optuna",
        n_trials=3,
        direction="minimize",
        compute_objective=lambda m: m["eval_loss"],
        sampler=optuna.samplers.RandomSampler(seed=0),
        storage=storage,
        study_name="l2sp",
    )
    trials = optuna.load_study(study_name="l2sp", storage=storage).trials
    assert len(trials) == 3 and len({t.params["alpha"] for t in trials}) == 3
    for trial in trials:
        alone = L2SPTrainer(
            model=_init(),
            train_dataset=train,
            eval_dataset=validation,
            args=L2SPTrainingArguments(
                output_dir=str(tmp_path / f"alone-{trial.number}"), beta=0.0, **{**COMMON, **trial.params}
            ),
        )
        alone.train()
        assert alone.evaluate()["eval_loss"] == pytest.approx(trial.value, rel=1e-6)
    assert best.objective == min(t.value for t in trials)


def test_model_init_is_refused_where_the_method_cannot_take_it(tmp_path):
    from hf_deelbo import DEELBoTrainingArguments

    with pytest.raises(ValueError, match="DEELBoTrainer does not take model_init"):
        DEELBoTrainer(model_init=_init, args=DEELBoTrainingArguments(output_dir=str(tmp_path), **COMMON))
    args = L2SPTrainingArguments(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="a model or a model_init, not both"):
        L2SPTrainer(model=_init(), model_init=_init, args=args)
    with pytest.raises(ValueError, match="needs a model or a model_init"):
        L2SPTrainer(args=args)
