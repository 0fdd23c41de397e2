"""The procedures protocol v2 compares (benchmarks/protocol_v2.json, `methods`), each a function
`(init, train, test, args) -> fields` that chooses its settings without the test set, trains on
the N examples and scores its predictions on `test`; `benchmarks.comparison` runs them.

`init` makes a fresh pretrained model with a new head; `args` are the `TrainingArguments` every run
shares (`task.training_settings`, with the output directory). Tier 1: plain fine-tuning, DE ELBO,
DE ELBO with halving; tier 2: the fixed-α oracle and the L2-SP grid; tier 3: L2-SP with Bayesian
optimization (36 trials), Laplace LA-LML and IVON (`benchmarks._baselines`).
"""

from __future__ import annotations

import os
import time

from benchmarks import _baselines, harness, task

PLAIN, DEELBO, HALVING = "plain, lr by training loss", "DE ELBO", "DE ELBO, halving"
ORACLE, GRID = "fixed-alpha oracle", "L2-SP grid"
BO, LAPLACE, IVON = "L2-SP + BO-36", "Laplace LA-LML", "IVON"
ORACLE_ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
GRID_STRENGTHS = (1e-2, 1e-4, 1e-6, 0.0)
BMA_SAMPLES = 16
BO_TRIALS = 36
IVON_HESS_INITS = (0.1, 1.0)  # the values its authors' guidance suggests trying; ess = N


def _plain(init, train, test, args) -> dict:
    from hf_deelbo import L2SPTrainer, L2SPTrainingArguments

    args = L2SPTrainingArguments(alpha=0.0, beta=0.0, **args)
    learning_rates = harness.protocol()["learning_rates"]
    result = task.select_by_training_loss(L2SPTrainer, init, train, args, learning_rates, "Plain fine-tuning")
    return {
        **task.evaluate(result.trainer, test),
        "learning_rate": result.best["learning_rate"],
        "runs": [{"learning_rate": r.settings["learning_rate"], "training_loss": r.score} for r in result.runs],
    }


def _deelbo(init, train, test, args, strategy: str = "full") -> dict:
    from hf_deelbo import DEELBoTrainingArguments, select_learning_rate
    from hf_deelbo.core.modeling import batch_norm_layers

    result = select_learning_rate(
        init,
        train,
        DEELBoTrainingArguments(**args),
        learning_rates=harness.protocol()["learning_rates"],
        strategy=strategy,
    )
    trainer = result.trainer
    learned = trainer.learned_hyperparameters()
    fields = {
        **task.evaluate(trainer, test),
        "learning_rate": result.best["learning_rate"],
        **{k: learned[k] for k in ("lambda", "tau", "sigma", "kappa", "alpha_eff")},
        "runs": [{"learning_rate": r.settings["learning_rate"], "objective": r.score} for r in result.runs],
    }
    if strategy != "full":
        return fields
    trainer.args.bma_samples = BMA_SAMPLES
    fields["model_average"] = task.evaluate(trainer, test)
    trainer.args.bma_samples = 0
    if batch_norm_layers(trainer.model):
        trainer.recompute_batch_norm(train)
        fields["batch_norm_recomputed"] = task.evaluate(trainer, test)
    return fields


def _halving(init, train, test, args) -> dict:
    return _deelbo(init, train, test, args, strategy="halving")


def _oracle(init, train, test, args) -> list[dict]:
    """L2-SP at each fixed α (β = 0, lr 0.1) on all N: one record per α."""
    from hf_deelbo import L2SPTrainer, L2SPTrainingArguments

    records = []
    for alpha in ORACLE_ALPHAS:
        start = time.perf_counter()
        trainer = L2SPTrainer(
            model=init(),
            train_dataset=train,
            args=L2SPTrainingArguments(alpha=alpha, beta=0.0, **{**args, "learning_rate": 0.1}),
        )
        try:
            trainer.train()
            metrics = task.evaluate(trainer, test)
        except FloatingPointError:
            metrics = {"accuracy": float("nan"), "nll": float("nan"), "ece": float("nan")}
        records.append({**metrics, "alpha": alpha, "seconds": time.perf_counter() - start})
    return records


def _grid(init, train, test, args) -> dict:
    from hf_deelbo import L2SPTrainingArguments, l2sp_grid_search

    labels = [int(v) for v in train.with_format(None)["labels"]]
    result = l2sp_grid_search(
        init,
        train,
        labels,
        L2SPTrainingArguments(alpha=0.0, beta=0.0, **args),
        alphas=list(GRID_STRENGTHS),
        betas=list(GRID_STRENGTHS),
        learning_rates=harness.protocol()["learning_rates"],
    )
    return {**task.evaluate(result.trainer, test), "chosen": result.best, "num_runs": len(result.runs) + 1}


PROCEDURES = {PLAIN: _plain, DEELBO: _deelbo, HALVING: _halving, ORACLE: _oracle, GRID: _grid}


def _bayesian_optimization(init, train, test, args) -> dict:
    """`Trainer.hyperparameter_search` (optuna TPE, seeded) over α, β, lr on a stratified 80/20
    split of N, the lowest validation NLL of its 36 trials retrained on all N."""
    from hf_deelbo import L2SPTrainer, L2SPTrainingArguments

    common = {k: v for k, v in args.items() if k != "output_dir"}
    trials = _baselines.bayesian_optimization(init, train, common, args["output_dir"], BO_TRIALS, args["seed"])
    best = min(trials, key=lambda t: t["validation_nll"])
    settings = {k: best[k] for k in _baselines.BO_BOX}
    retrain = L2SPTrainingArguments(**{**args, **settings, "output_dir": os.path.join(args["output_dir"], "retrain")})
    trainer = L2SPTrainer(model=init(), args=retrain, train_dataset=train)
    trainer.train()
    return {**task.evaluate(trainer, test), "chosen": settings, "num_runs": len(trials) + 1, "trials": trials}


def _laplace(init, train, test, args) -> dict:
    common = {k: v for k, v in args.items() if k != "output_dir"}
    trainer, fields = _baselines.laplace_procedure(
        init, train, common, harness.protocol()["learning_rates"], args["output_dir"]
    )
    return {**task.evaluate(trainer, test), **fields}


def _ivon(init, train, test, args) -> dict:
    common = {k: v for k, v in args.items() if k != "output_dir"}
    trainer, fields = _baselines.ivon_procedure(
        init, train, common, harness.protocol()["learning_rates"], args["output_dir"], IVON_HESS_INITS
    )
    return {**task.evaluate(trainer, test), **fields}


PROCEDURES = {
    PLAIN: _plain,
    DEELBO: _deelbo,
    HALVING: _halving,
    ORACLE: _oracle,
    GRID: _grid,
    BO: _bayesian_optimization,
    LAPLACE: _laplace,
    IVON: _ivon,
}
