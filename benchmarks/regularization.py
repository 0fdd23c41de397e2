"""Does the regularization strength matter? α-curves, plain fine-tuning, and a task where it does.

The transfer benchmark (`benchmarks/transfer.py`: digits 0–4 → 5–9, N ∈ {50, 100, 500}, 200
SGD-Nesterov steps, batch 32, clipping 1, cosine) is reused here with its backbones, data splits,
training settings and evaluation. Three things are measured, per backbone, N and seed:

1. **Plain fine-tuning** (α = β = 0), two ways a user would pick its learning rate among
   {0.1, 0.01, 0.001, 0.0001}:
   - `plain, lr by validation`: 4 runs on a stratified 80 % of N, the lowest validation NLL on the
     other 20 % wins, retrained on all N (`hf_deelbo.l2sp_grid_search` with the one-point grid
     α = β = 0): 5 runs;
   - `plain, lr by training loss`: 4 runs on all N, the lowest final training loss (mean cross-
     entropy on all N in evaluation mode, after training) wins: 4 runs, no validation data, as
     DE ELBO selects its learning rate.
   Compute is the wall time of the whole procedure, one thread per process, as in transfer.py.
2. **The α-curve**: L2-SP (`hf_deelbo.L2SPTrainer`) at fixed α ∈ {0, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10},
   β = 0 (the β the grid search chose most often in `benchmarks/results/transfer.json`: 9 of its
   24 records), lr 0.1 (what every selection in transfer.json chose), trained on all N. An oracle
   curve, not a method: it says whether a cell is regularization-sensitive at all.
3. **A regularization-sensitive task, chosen by the α-curve alone, before any DE ELBO run on it.**
   Candidate variants of the task, in this fixed order:

       noise-20         20 % symmetric label noise in the N training labels, 200 steps
       noise-40         40 % symmetric label noise, 200 steps
       steps-1000       clean labels, 1000 steps
       noise-20-steps-1000   20 % label noise and 1000 steps

   (Label noise: round(p·N) training examples, drawn with the seed, get a label drawn uniformly
   from the 4 other classes; the 20 % validation part of plain fine-tuning's split is noisy too,
   as a user's would be; test labels are clean.)

   Rule: each candidate's α-curve is run, in that order, on the screening cell (timm-resnet,
   N = 100, seeds 0, 1, 2); **the first candidate where the best fixed α beats α = 0 by ≥ 2 points
   of test accuracy (mean of the 3 seeds) is chosen**, and its full α-curve (both backbones,
   N ∈ {50, 100, 500}) is run; the chosen curve's cells are the task's cells. If no candidate
   passes on the screening cell, the full curves are run in the same order and the first with a
   ≥ 2-point cell is chosen. The screen's curves and the choice are saved before any DE ELBO run on
   the chosen task.
4. On the chosen task: DE ELBO at today's defaults (transfer.py's 4-lr selection by the lowest
   final training objective, nothing tuned) and the two plain fine-tuning rows, 3 seeds.

    python -m benchmarks.regularization --stage plain curve   # items 1–2 on the existing task (≈ 15 min on 2 cores)
    python -m benchmarks.regularization --stage screen        # item 3: screen, choose, full curve of the chosen task
    python -m benchmarks.regularization --stage chosen        # item 4: DE ELBO and plain rows on the chosen task
    python -m benchmarks.regularization --replot              # rebuild figures, docs section, summary
    python -m benchmarks.regularization --calibrate-diagonal  # diagonal_sigma_learning_rate's default (≈ 3 min)
    python -m benchmarks.regularization --quick --output-dir /tmp/reg-quick   # a smoke run (CI)

Every stage keeps the records already in OUTPUT_DIR/regularization.json and runs only the missing
ones (a killed run loses only its unfinished runs; `--resume` is accepted and is the default
behaviour; `--fresh` starts over). Results: benchmarks/results/regularization/ (regularization.json
with every run's numbers, one alpha-curve-TASK.png per task), the section in docs/benchmarks/protocol-v1.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

from benchmarks._baselines import BO_BOX, bayesian_optimization
from benchmarks._common import V1_DOCS, add_cell_flags, add_switches, save_figure, update_section
from benchmarks.task import select_by_training_loss, with_label_noise
from benchmarks.transfer import (
    GRID,
    ROOT,
    _setup_thread,
    evaluate,
    model_init,
    pretrained_path,
    pretraining,
    tensor_dataset,
    training_settings,
)

SECTION = ("<!-- regularization:start -->", "<!-- regularization:end -->")
EXISTING = "digits"
# name: (symmetric label-noise fraction in the N training labels, steps per run)
TASKS = {
    EXISTING: (0.0, 200),
    "noise-20": (0.2, 200),
    "noise-40": (0.4, 200),
    "steps-1000": (0.0, 1000),
    "noise-20-steps-1000": (0.2, 1000),
}
CANDIDATES = ("noise-20", "noise-40", "steps-1000", "noise-20-steps-1000")  # the fixed screening order
SCREEN_CELL = ("timm-resnet", 100)
MIN_GAIN = 0.02  # 2 points of test accuracy, mean of the seeds
ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
CURVE_BETA = 0.0  # the grid's most frequent choice in transfer.json (9 of 24 records)
CURVE_LR = 0.1
LEARNING_RATES = (0.1, 0.01, 0.001, 0.0001)
PAPER_ALPHA_MAX = 1e-2  # the paper's grid caps α here
PLAIN_VAL = "plain, lr by validation"
PLAIN_TRAIN = "plain, lr by training loss"
DEELBO = "DE ELBO"
CURVE = "α-curve"
BO = "L2-SP + BO"  # one job: a 36-trial study, read as two procedures (its first 12 trials, all 36)
BO_TRIALS = (12, 36)
# The paper's boxes for MAP + Bayesian optimization (Harvey et al. 2024, Sec. 5), log-uniform.
LAPLACE = "Laplace LA-LML"  # benchmarks/_baselines.py: online marglik, diagonal EF, prior centred at μ
IVON = "IVON"  # benchmarks/_baselines.py: ivon-opt, its own fixed prior precision
# The paper's grid search with α's range extended past its cap (α ∈ {0, 1e-6, …, 1e-2, 1e-1, 1, 10}),
# in the chosen task's cells whose α-curve peaks above the cap; β fixed at the curve's β and the
# 4-lr grid, so 36 runs + the retrain (the paper's α × β × lr grid, extended, would be 216 + 1 per pair).
GRID_EXTENDED = "L2-SP grid, α to 10"
GRID_EXTENDED_ALPHAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
BASELINES = (BO, LAPLACE, IVON, GRID_EXTENDED)  # what a user would pick instead: `--stage baselines`
# DE ELBO beyond the paper (`--stage variants`): its arguments changed, everything else as DE ELBO's row.
LAYER_WISE = "DE ELBO, layer-wise λ"
VARIANTS = {
    LAYER_WISE: {"prior_variance_grouping": "layer"},
    "DE ELBO, diagonal σ": {"posterior_covariance": "diagonal"},
    "DE ELBO, layer-wise λ, diagonal σ": {"prior_variance_grouping": "layer", "posterior_covariance": "diagonal"},
}
# PEFT adapters as the regularized weights (`--stage variants`): LoRA on the backbone, the head
# trained in full (`modules_to_save`), DE ELBO's prior N(μ, λI) on the adapter weights around their
# initial values; and plain LoRA fine-tuning (α = β = 0, lr by the final training loss) beside it.
LORA = "DE ELBO, LoRA"
PLAIN_LORA = "plain LoRA, lr by training loss"
LORA_CONFIGS = {
    "vit": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
    "timm-resnet": dict(r=4, lora_alpha=8, target_modules=r".*layer\d+\.\d+\.conv\d", modules_to_save=["fc"]),
}
KINDS = (PLAIN_VAL, PLAIN_TRAIN, DEELBO, CURVE, BO, LAPLACE, IVON, GRID_EXTENDED, *VARIANTS, LORA, PLAIN_LORA)
DEELBO_KINDS = (DEELBO, *VARIANTS, LORA)  # the rows DE ELBO's own selection produces


def lora_init(init, backbone: str):
    """`init`'s model with LoRA adapters of `LORA_CONFIGS[backbone]` (a fresh `peft.PeftModel` per call)."""

    def wrapped():
        import peft

        return peft.get_peft_model(init(), peft.LoraConfig(**LORA_CONFIGS[backbone]))

    return wrapped


def bo_kind(n_trials: int) -> str:
    return f"{BO}, {n_trials} trials"


def job_outputs(job) -> tuple[str, ...]:
    """The kinds of the records a job writes (it is done when all of them are stored)."""
    return tuple(bo_kind(n) for n in job[10]) if job[1] == BO else (job[1],)


def task_data(task: str, n: int, seed: int):
    """(train, test) of transfer.py's split for `seed`, with the task's label noise in train."""
    from hf_deelbo import digits

    train, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), n, seed=seed)
    return with_label_noise(tensor_dataset(train), TASKS[task][0], seed), tensor_dataset(test)


def bo_records(init, train, test, common: dict, work_dir: str, seed: int, base: dict, trial_counts) -> list[dict]:
    """One study of max(trial_counts) trials, read as one procedure per count n: the best of its
    first n trials, retrained on all N (a winner shared by two procedures is retrained once)."""
    from hf_deelbo import L2SPTrainer, L2SPTrainingArguments

    quick = max(trial_counts) < 10
    trials = bayesian_optimization(init, train, common, work_dir, max(trial_counts), seed, quick)
    retrained, records = {}, []
    for n_trials in trial_counts:
        kind = bo_kind(n_trials)
        best = min(trials[:n_trials], key=lambda t: t["validation_nll"])
        settings = {k: best[k] for k in BO_BOX}
        key = tuple(settings.values())
        if key not in retrained:
            start = time.perf_counter()
            args = L2SPTrainingArguments(output_dir=os.path.join(work_dir, "retrain"), **{**common, **settings})
            trainer = L2SPTrainer(model=init(), args=args, train_dataset=train)
            trainer.train()
            retrained[key] = (evaluate(trainer, test), time.perf_counter() - start)
        metrics, retrain_seconds = retrained[key]
        # The chosen α, β stay out of the record's top level, where `alpha` names an α-curve point.
        records.append(
            {
                **base,
                "kind": kind,
                **metrics,
                "learning_rate": settings["learning_rate"],
                "chosen": settings,
                "num_runs": n_trials + 1,
                "seconds": sum(t["seconds"] for t in trials[:n_trials]) + retrain_seconds,
                "runs": trials[:n_trials],
            }
        )
    return records


def run_one(job) -> list[dict]:
    """One job: a plain fine-tuning procedure, a DE ELBO procedure, one point of an α-curve, or a
    Bayesian-optimization study (two procedures). Returns its records."""
    _setup_thread()
    from hf_deelbo import (
        DEELBoTrainingArguments,
        L2SPTrainer,
        L2SPTrainingArguments,
        l2sp_grid_search,
        select_learning_rate,
    )

    task, kind, backbone, n, seed, alpha, steps, learning_rates, path, work_dir, trial_counts = job
    train, test = task_data(task, n, seed)
    common = training_settings(steps, seed)
    init = model_init(backbone, path, seed)
    if kind in (LORA, PLAIN_LORA):
        init = lora_init(init, backbone)
    record = {"task": task, "kind": kind, "backbone": backbone, "n": n, "seed": seed, "steps": steps}
    start = time.perf_counter()
    if kind == BO:
        return bo_records(init, train, test, common, work_dir, seed, record, trial_counts)
    if kind in (LAPLACE, IVON):
        from benchmarks._baselines import ivon_procedure, laplace_procedure

        procedure = laplace_procedure if kind == LAPLACE else ivon_procedure
        trainer, fields = procedure(init, train, common, learning_rates, work_dir)
        record.update(**evaluate(trainer, test), **fields, seconds=time.perf_counter() - start)
        return [record]
    if kind == CURVE:
        args = L2SPTrainingArguments(
            output_dir=work_dir, alpha=alpha, beta=CURVE_BETA, **{**common, "learning_rate": CURVE_LR}
        )
        trainer = L2SPTrainer(model=init(), args=args, train_dataset=train)
        try:
            trainer.train()
            metrics = evaluate(trainer, test)
        except FloatingPointError:
            metrics = {"accuracy": float("nan"), "nll": float("nan"), "ece": float("nan")}
        record.update(alpha=alpha, beta=CURVE_BETA, learning_rate=CURVE_LR, **metrics)
    elif kind == GRID_EXTENDED:
        labels = [int(v) for v in train.with_format(None)["labels"]]
        args = L2SPTrainingArguments(output_dir=work_dir, alpha=0.0, beta=0.0, **common)
        grid = dict(alphas=list(GRID_EXTENDED_ALPHAS), betas=[CURVE_BETA], learning_rates=learning_rates)
        result = l2sp_grid_search(init, train, labels, args, **grid)
        # The chosen α stays out of the record's top level, where `alpha` names an α-curve point.
        record.update(
            **evaluate(result.trainer, test),
            learning_rate=result.best["learning_rate"],
            chosen={k: result.best[k] for k in ("alpha", "beta", "learning_rate")},
            num_runs=len(result.runs) + 1,
            runs=[{**r.settings, "validation_nll": r.score, "seconds": r.seconds} for r in result.runs],
        )
    elif kind == PLAIN_VAL:
        labels = [int(v) for v in train.with_format(None)["labels"]]
        args = L2SPTrainingArguments(output_dir=work_dir, alpha=0.0, beta=0.0, **common)
        result = l2sp_grid_search(init, train, labels, args, alphas=[0.0], betas=[0.0], learning_rates=learning_rates)
        record.update(
            **evaluate(result.trainer, test),
            learning_rate=result.best["learning_rate"],
            num_runs=len(result.runs) + 1,
            runs=[
                {"learning_rate": r.settings["learning_rate"], "validation_nll": r.score, "seconds": r.seconds}
                for r in result.runs
            ],
        )
    elif kind in (PLAIN_TRAIN, PLAIN_LORA):
        args = L2SPTrainingArguments(output_dir=work_dir, alpha=0.0, beta=0.0, **common)
        result = select_by_training_loss(L2SPTrainer, init, train, args, learning_rates, "Plain fine-tuning")
        record.update(
            **evaluate(result.trainer, test),
            learning_rate=result.best["learning_rate"],
            num_runs=len(result.runs),
            runs=[
                {"learning_rate": r.settings["learning_rate"], "training_loss": r.score, "seconds": r.seconds}
                for r in result.runs
            ],
        )
    elif kind in DEELBO_KINDS:
        args = DEELBoTrainingArguments(output_dir=work_dir, **common, **VARIANTS.get(kind, {}))
        result = select_learning_rate(init, train, args, learning_rates=learning_rates)
        learned = result.trainer.learned_hyperparameters()
        record.update(
            **evaluate(result.trainer, test),
            learning_rate=result.best["learning_rate"],
            **{
                k: learned[k]
                for k in ("lambda", "tau", "sigma", "kappa", "alpha_eff", "beta_eff", "num_backbone_params")
            },
            # [name, λ_l] in the backbone's order (depth), with layer-wise λ
            **(
                {"backbone_prior_variances": [[k, v] for k, v in learned["backbone_prior_variances"].items()]}
                if "backbone_prior_variances" in learned
                else {}
            ),
            num_runs=len(result.runs),
            runs=[
                {
                    "learning_rate": r.settings["learning_rate"],
                    "objective": r.score,
                    "seconds": r.seconds,
                    "alpha_eff": r.learned["alpha_eff"],
                }
                for r in result.runs
            ],
        )
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    record["seconds"] = time.perf_counter() - start
    return [record]


# `--calibrate-diagonal`: the measurement behind `diagonal_sigma_learning_rate`'s default, on data no
# row uses (N = 100, seed 10: another training subset, label noise, test split and head init), both
# backbones, the regularization-sensitive task, lr 0.1 (what every DE ELBO selection here chose).
# Each candidate is one run; the default is the candidate with the lowest final training objective
# (10 draws, the objective DE ELBO's own selection compares) summed over the backbones: an optimizer
# setting is judged by how well it optimizes, with no test data.
DIAGONAL_CALIBRATION = {
    "task": "noise-40",
    "n": 100,
    "seed": 10,
    "learning_rate": 0.1,
    "candidates": [0.01, 0.03, 0.1, 0.3],
}


def run_diagonal_calibration(job) -> dict:
    _setup_thread()
    from hf_deelbo import DEELBoTrainingArguments, select_learning_rate

    backbone, candidate, path, work_dir = job
    c = DIAGONAL_CALIBRATION
    train, test = task_data(c["task"], c["n"], c["seed"])
    args = DEELBoTrainingArguments(
        output_dir=work_dir,
        **training_settings(TASKS[c["task"]][1], c["seed"]),
        posterior_covariance="diagonal",
        diagonal_sigma_learning_rate=candidate,
    )
    start = time.perf_counter()
    result = select_learning_rate(
        model_init(backbone, path, c["seed"]), train, args, learning_rates=[c["learning_rate"]]
    )
    learned = result.trainer.learned_hyperparameters()
    return {
        "backbone": backbone,
        "diagonal_sigma_learning_rate": candidate,
        "objective": result.runs[0].score,
        **evaluate(result.trainer, test),
        **{k: learned[k] for k in ("sigma", "lambda", "tau", "alpha_eff")},
        "seconds": time.perf_counter() - start,
    }


def calibrate_diagonal(backbones, paths, output_dir: str, workers: int) -> dict:
    jobs = [
        (b, candidate, paths[b], os.path.join(output_dir, "runs", f"calibration-diagonal-{b}-{candidate:g}"))
        for b in backbones
        for candidate in DIAGONAL_CALIBRATION["candidates"]
    ]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        records = list(pool.imap(run_diagonal_calibration, jobs))
    totals = {
        c: sum(r["objective"] for r in records if r["diagonal_sigma_learning_rate"] == c)
        for c in DIAGONAL_CALIBRATION["candidates"]
    }
    result = {
        "settings": DIAGONAL_CALIBRATION,
        "records": records,
        "summed_objective": totals,
        "chosen": min(totals, key=totals.get),
    }
    with open(os.path.join(output_dir, "diagonal-calibration.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in records:
        print(
            f"{r['backbone']} diagonal_sigma_learning_rate={r['diagonal_sigma_learning_rate']:g}: objective "
            f"{r['objective']:.4f}, sigma {r['sigma']:.3g}, lambda {r['lambda']:.3g}, acc {r['accuracy']:.3f}"
        )
    print(f"chosen: {result['chosen']:g} (summed objectives {totals})")
    return result


# `--reproduce`: committed α-curve points trained again on this machine's pretrained backbones
# (`pretrained_path` rebuilds them wherever they are missing), against the committed accuracy.
REPRODUCE = (
    ("noise-40", "timm-resnet", 500, 0, 1.0),
    ("noise-40", "timm-resnet", 100, 0, 0.0),
    ("noise-40", "vit", 100, 0, 0.0),
    ("digits", "timm-resnet", 100, 0, 0.0),
    ("digits", "vit", 100, 0, 0.0),
)


def reproduce(store: Store, paths: dict, output_dir: str) -> list[dict]:
    committed = {
        (r["task"], r["backbone"], r["n"], r["seed"], r["alpha"]): r for r in store.records if r["kind"] == CURVE
    }
    results = []
    for key in REPRODUCE:
        task, backbone, n, seed, alpha = key
        job = (
            task,
            CURVE,
            backbone,
            n,
            seed,
            alpha,
            TASKS[task][1],
            list(LEARNING_RATES),
            paths[backbone],
            os.path.join(output_dir, "runs", "reproduce"),
            (),
        )
        again = run_one(job)[0]
        results.append(
            {
                "task": task,
                "backbone": backbone,
                "n": n,
                "seed": seed,
                "alpha": alpha,
                "committed_accuracy": committed[key]["accuracy"],
                "accuracy": again["accuracy"],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(output_dir, "reproduce.json"), "w") as f:
        json.dump({"pretraining": {b: pretraining(p) for b, p in paths.items()}, "records": results}, f, indent=1)
    return results


def record_key(r: dict) -> tuple:
    # `alpha` tells the points of an α-curve apart; other records may carry a learned or chosen α.
    return (r["task"], r["kind"], r["backbone"], r["n"], r["seed"], r.get("alpha") if r["kind"] == CURVE else None)


class Store:
    """regularization.json: settings, every record, the screen and the choice; written after every
    job. Several stages may run at once (each its own process): every write first merges the
    records the others wrote since, under a file lock."""

    def __init__(self, path: str, fresh: bool = False):
        self.path = path
        self.data = {"records": [], "seconds": 0.0}
        if os.path.exists(path) and not fresh:
            self.data = json.load(open(path))
        self.done = {record_key(r) for r in self.data["records"]}

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.done.add(record_key(record))
        self.save()

    def save(self) -> None:
        from filelock import FileLock

        with FileLock(self.path + ".lock"):
            if os.path.exists(self.path):
                for record in json.load(open(self.path))["records"]:
                    if record_key(record) not in self.done:
                        self.records.append(record)
                        self.done.add(record_key(record))
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def run_jobs(store: Store, jobs: list, workers: int) -> None:
    jobs = [j for j in jobs if any((j[0], kind, *j[2:6]) not in store.done for kind in job_outputs(j))]
    if not jobs:
        return
    start = time.perf_counter()
    base = store.data.get("seconds", 0.0)
    # Longest first (procedures before single runs, large N first), so the workers finish together.
    jobs.sort(key=lambda j: (-j[6] * RELATIVE_COST.get(j[1], 4.5), -j[3]))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for records in pool.imap_unordered(run_one, jobs):
            store.data["seconds"] = base + time.perf_counter() - start
            for record in records:
                store.add(record)
                alpha = f" α={record['alpha']:g}" if record["kind"] == CURVE else f" lr={record['learning_rate']:g}"
                print(
                    f"{record['task']} {record['kind']} {record['backbone']} N={record['n']} seed={record['seed']}"
                    f"{alpha}: acc {record['accuracy']:.3f} nll {record['nll']:.3f} ({record['seconds']:.0f} s)",
                    flush=True,
                )


RELATIVE_COST = {
    CURVE: 1,
    BO: 38,
    LAPLACE: 12,
    GRID_EXTENDED: 37,
}  # about the runs per job (the other procedures: ~4.5)


def make_jobs(task, kinds, backbones, ns, seeds, alphas, settings, paths, work_dir) -> list:
    steps = settings["steps"] if settings["steps"] is not None else TASKS[task][1]
    jobs = []
    for kind, backbone, n, seed in itertools.product(kinds, backbones, ns, seeds):
        for alpha in alphas if kind == CURVE else [None]:
            name = f"{task}-{kind}-{backbone}-{n}-{seed}" + (f"-a{alpha:g}" if alpha is not None else "")
            jobs.append(
                (
                    task,
                    kind,
                    backbone,
                    n,
                    seed,
                    alpha,
                    steps,
                    settings["learning_rates"],
                    paths[backbone],
                    os.path.join(work_dir, name.replace(" ", "_").replace(",", "").replace("+", "")),
                    tuple(settings["bo_trials"]),
                )
            )
    return jobs


# ---------------------------------------------------------------- summaries


def _mean(values):
    values = [v for v in values if math.isfinite(v)]
    return statistics.mean(values) if values else float("nan")


def _std(values):
    values = [v for v in values if math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def curve_cells(records: list[dict], task: str) -> list[dict]:
    """Per (backbone, N): mean accuracy and NLL at each α, the best α, its gain over α = 0."""
    cells = []
    curve = [r for r in records if r["task"] == task and r["kind"] == CURVE]
    for backbone, n in sorted({(r["backbone"], r["n"]) for r in curve}):
        points = []
        for alpha in sorted({r["alpha"] for r in curve if r["backbone"] == backbone and r["n"] == n}):
            group = [r for r in curve if r["backbone"] == backbone and r["n"] == n and r["alpha"] == alpha]
            points.append(
                {
                    "alpha": alpha,
                    "seeds": sorted(r["seed"] for r in group),
                    "accuracy": _mean([r["accuracy"] for r in group]),
                    "accuracy_std": _std([r["accuracy"] for r in group]),
                    "nll": _mean([r["nll"] for r in group]),
                    "per_seed_accuracy": {str(r["seed"]): r["accuracy"] for r in group},
                }
            )
        zero = next((p for p in points if p["alpha"] == 0), None)
        nonzero = [p for p in points if p["alpha"] > 0 and math.isfinite(p["accuracy"])]
        cell = {"backbone": backbone, "n": n, "points": points}
        if zero is not None and nonzero:
            best = max(nonzero, key=lambda p: p["accuracy"])
            cell.update(
                best_alpha=best["alpha"],
                best_accuracy=best["accuracy"],
                zero_accuracy=zero["accuracy"],
                gain=best["accuracy"] - zero["accuracy"],
                best_nll_alpha=min(points, key=lambda p: p["nll"])["alpha"],
            )
        cells.append(cell)
    return cells


def _method_order(method: str) -> tuple:
    order = [
        DEELBO,
        *VARIANTS,
        LORA,
        PLAIN_TRAIN,
        PLAIN_LORA,
        PLAIN_VAL,
        *(bo_kind(n) for n in BO_TRIALS),
        GRID_EXTENDED,
        LAPLACE,
        IVON,
    ]
    return (order.index(method) if method in order else len(order), method)


def _chosen_alpha(record: dict):
    """The α a procedure ended with: BO's chosen α, Laplace's learned α (None for the others)."""
    if record["kind"].startswith(BO) or record["kind"] == GRID_EXTENDED:
        return record["chosen"]["alpha"]
    return record.get("alpha") if record["kind"] == LAPLACE else None


def method_rows(records: list[dict], task: str) -> list[dict]:
    rows = []
    procedures = [r for r in records if r["task"] == task and r["kind"] != CURVE]
    keys = {(r["backbone"], r["n"], r["kind"]) for r in procedures}
    for backbone, n, kind in sorted(keys, key=lambda k: (k[0], k[1], _method_order(k[2]))):
        group = [r for r in procedures if (r["backbone"], r["n"], r["kind"]) == (backbone, n, kind)]
        row = {
            "backbone": backbone,
            "n": n,
            "method": kind,
            "seeds": sorted(r["seed"] for r in group),
            "accuracy": _mean([r["accuracy"] for r in group]),
            "accuracy_std": _std([r["accuracy"] for r in group]),
            "nll": _mean([r["nll"] for r in group]),
            "ece": _mean([r["ece"] for r in group]),
            "seconds": _mean([r["seconds"] for r in group]),
            "num_runs": _mean([r.get("num_runs", float("nan")) for r in group]),
            "learning_rates": [r["learning_rate"] for r in sorted(group, key=lambda r: r["seed"])],
        }
        if kind in DEELBO_KINDS:
            row["alpha_eff"] = _mean([r["alpha_eff"] for r in group])
        if _chosen_alpha(group[0]) is not None:
            row["alphas"] = [_chosen_alpha(r) for r in sorted(group, key=lambda r: r["seed"])]
        rows.append(row)
    return rows


def transfer_reference(seeds=(0, 1, 2)) -> dict:
    """DE ELBO's α_eff and rows and the grid search's α and rows on the existing task, from the
    transfer benchmark's records on `seeds`: the ViT's DE ELBO from transfer.json (ρ at the weights'
    learning rate), the ResNet's from transfer-sigma-lr/transfer.json (today's ρ defaults)."""
    results = os.path.join(ROOT, "benchmarks", "results")
    reference = {}
    sources = {
        "transfer": os.path.join(results, "transfer.json"),
        "sigma-lr": os.path.join(results, "transfer-sigma-lr", "transfer.json"),
    }
    loaded = {k: json.load(open(p))["records"] for k, p in sources.items() if os.path.exists(p)}
    for backbone, n in itertools.product(("timm-resnet", "vit"), (50, 100, 500)):
        entry = {}
        de_source = "sigma-lr" if backbone == "timm-resnet" and "sigma-lr" in loaded else "transfer"
        for method, source in ((DEELBO, de_source), (GRID, "transfer")):
            group = [
                r[method]
                for r in loaded.get(source, [])
                if r["backbone"] == backbone and r["n"] == n and r["seed"] in seeds and method in r
            ]
            if group:
                entry[method] = {
                    "source": os.path.relpath(sources[source], ROOT),
                    "seeds": len(group),
                    "accuracy": _mean([g["accuracy"] for g in group]),
                    "nll": _mean([g["nll"] for g in group]),
                    "ece": _mean([g["ece"] for g in group]),
                    "seconds": _mean([g["seconds"] for g in group]),
                }
                if method == DEELBO:
                    entry[method]["alpha_eff"] = _mean([g["alpha_eff"] for g in group])
                else:
                    entry[method]["alpha"] = statistics.median(g["alpha"] for g in group)
                    entry[method]["beta"] = statistics.median(g["beta"] for g in group)
        reference[f"{backbone}/{n}"] = entry
    return reference


def screen_result(records: list[dict], candidate: str) -> dict | None:
    cell = next((c for c in curve_cells(records, candidate) if (c["backbone"], c["n"]) == SCREEN_CELL), None)
    if cell is None or "gain" not in cell:
        return None
    return {
        "task": candidate,
        "cell": list(SCREEN_CELL),
        "best_alpha": cell["best_alpha"],
        "gain": cell["gain"],
        "zero_accuracy": cell["zero_accuracy"],
        "best_accuracy": cell["best_accuracy"],
        "passes": cell["gain"] >= MIN_GAIN,
    }


# ---------------------------------------------------------------- figure and docs

ZERO_AT = 1e-7  # where α = 0 is drawn on the log axis (left edge)


def _x(alpha: float) -> float:
    return alpha if alpha > 0 else ZERO_AT


def figure(records: list[dict], task: str, path: str, reference: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = curve_cells(records, task)
    backbones = sorted({c["backbone"] for c in cells})
    deelbo = {(r["backbone"], r["n"]): r for r in method_rows(records, task) if r["method"] == DEELBO}
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones, strict=True):
        for i, cell in enumerate(c for c in cells if c["backbone"] == backbone):
            color = f"C{i}"
            xs = [_x(p["alpha"]) for p in cell["points"]]
            ax.errorbar(
                xs,
                [p["accuracy"] for p in cell["points"]],
                yerr=[p["accuracy_std"] for p in cell["points"]],
                marker="o",
                color=color,
                capsize=2,
                label=f"N={cell['n']}",
            )
            ref = (reference or {}).get(f"{backbone}/{cell['n']}", {})
            alpha_eff = deelbo.get((backbone, cell["n"]), ref.get(DEELBO, {})).get("alpha_eff")
            if alpha_eff:
                ax.axvline(alpha_eff, color=color, linestyle="--", linewidth=1)
            if GRID in ref:
                ax.plot(
                    [_x(ref[GRID]["alpha"])],
                    [0.03],
                    marker="^",
                    color=color,
                    markersize=9,
                    linestyle="none",
                    transform=ax.get_xaxis_transform(),
                )
        ax.set_xscale("log")
        ticks = [ZERO_AT] + [10.0**k for k in range(-6, 2)]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0"] + [f"{a:g}" for a in ticks[1:]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("L2-SP α (log scale; α = 0 at the left edge)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{backbone}, task {task}")
        ax.legend(
            fontsize=8,
            title="dashed: DE ELBO α_eff\n▲: grid's α (median)" if reference else "dashed: DE ELBO α_eff",
            title_fontsize=7,
        )
    save_figure(fig, path)


def layer_figure(records: list[dict], task: str, path: str) -> bool:
    """The learned λ_l of layer-wise DE ELBO by depth (backbone tensors in the model's order), one
    line per N (the mean of log λ_l over seeds), one panel per backbone; False if there are none."""
    runs = [r for r in records if r["task"] == task and r["kind"] == LAYER_WISE and r.get("backbone_prior_variances")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in runs})
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones, strict=True):
        for i, n in enumerate(sorted({r["n"] for r in runs if r["backbone"] == backbone})):
            group = [r for r in runs if (r["backbone"], r["n"]) == (backbone, n)]
            logs = [[math.log10(v) for _, v in r["backbone_prior_variances"]] for r in group]
            mean = [statistics.mean(column) for column in zip(*logs, strict=True)]
            ax.plot(range(len(mean)), mean, marker=".", color=f"C{i}", label=f"N={n} ({len(group)} seeds)")
            ax.axhline(
                math.log10(statistics.mean(r["lambda"] for r in group)), color=f"C{i}", linestyle=":", linewidth=1
            )
        ax.set_xlabel("backbone tensor, input to output (named_parameters order)")
        ax.set_ylabel("log10 λ_l (mean over seeds)")
        ax.set_title(f"{backbone}, task {task}: layer-wise λ by depth")
        ax.legend(fontsize=8, title="dotted: λ̄ (harmonic mean)", title_fontsize=7)
    save_figure(fig, path)
    return True


def _fmt_alpha(alpha) -> str:
    return "0" if alpha == 0 else f"{alpha:g}"


def curve_table(cells: list[dict], reference: dict | None, deelbo: dict) -> list[str]:
    alphas = sorted({p["alpha"] for c in cells for p in c["points"]})
    lines = [
        "| backbone | N | "
        + " | ".join(f"α = {_fmt_alpha(a)}" for a in alphas)
        + " | best α (gain over α = 0) | lowest-NLL α | DE ELBO α_eff | grid's α |",
        "|---|---|" + "---|" * len(alphas) + "---|---|---|---|",
    ]
    for cell in cells:
        by = {p["alpha"]: p for p in cell["points"]}
        values = " | ".join(f"{by[a]['accuracy']:.3f} / {by[a]['nll']:.2f}" if a in by else "" for a in alphas)
        best = f"{_fmt_alpha(cell['best_alpha'])} ({100 * cell['gain']:+.1f} pts)" if "gain" in cell else ""
        ref = (reference or {}).get(f"{cell['backbone']}/{cell['n']}", {})
        alpha_eff = deelbo.get((cell["backbone"], cell["n"]), ref.get(DEELBO, {})).get("alpha_eff")
        grid = ref.get(GRID, {}).get("alpha")
        lines.append(
            f"| {cell['backbone']} | {cell['n']} | {values} | {best} | "
            f"{_fmt_alpha(cell.get('best_nll_alpha', float('nan')))} | "
            f"{'' if alpha_eff is None else f'{alpha_eff:.2g}'} | {'' if grid is None else _fmt_alpha(grid)} |"
        )
    return lines


def rows_table(rows: list[dict], reference: dict | None, cells: list[dict]) -> list[str]:
    lines = [
        "| backbone | N | method | seeds | test accuracy | test NLL | ECE | runs | compute (s) | "
        "lr chosen (per seed) | α chosen or learned (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["backbone"], r["n"]) for r in rows} | {(c["backbone"], c["n"]) for c in cells})
    for backbone, n in keys:
        for row in (r for r in rows if (r["backbone"], r["n"]) == (backbone, n)):
            alphas = (
                f"α_eff {row['alpha_eff']:.2g}"
                if "alpha_eff" in row
                else ", ".join(f"{a:.2g}" for a in row["alphas"])
                if "alphas" in row
                else ""
            )
            runs = f"{row['num_runs']:.0f}" if math.isfinite(row["num_runs"]) else ""
            lines.append(
                f"| {backbone} | {n} | {row['method']} | {len(row['seeds'])} | {row['accuracy']:.3f} ± "
                f"{row['accuracy_std']:.3f} | {row['nll']:.3f} | {row['ece']:.3f} | {runs} | "
                f"{row['seconds']:.0f} | {', '.join(f'{lr:.2g}' for lr in row['learning_rates'])} | {alphas} |"
            )
        for method, entry in ((reference or {}).get(f"{backbone}/{n}", {})).items():
            lines.append(
                f"| {backbone} | {n} | {method} (`{entry['source']}`) | {entry['seeds']} | "
                f"{entry['accuracy']:.3f} | {entry['nll']:.3f} | {entry['ece']:.3f} | | "
                f"{entry['seconds']:.0f} | | |"
            )
        cell = next((c for c in cells if (c["backbone"], c["n"]) == (backbone, n) and "gain" in c), None)
        if cell is not None:
            lines.append(
                f"| {backbone} | {n} | best fixed α > 0: {_fmt_alpha(cell['best_alpha'])} (oracle) | "
                f"{len(next(p for p in cell['points'] if p['alpha'] == cell['best_alpha'])['seeds'])} | "
                f"{cell['best_accuracy']:.3f} | | | | | 0.1 | |"
            )
    return lines


def markdown(store: Store, output_dir: str, docs_path: str) -> str:
    records, data = store.records, store.data
    link = os.path.relpath(output_dir, os.path.dirname(os.path.abspath(docs_path)))
    reference = data.get("reference")
    lines = [
        SECTION[0],
        "## Is the transfer task regularization-sensitive? α-curves and plain fine-tuning "
        "(`benchmarks/regularization.py`)",
        "",
        "The transfer task of `benchmarks/transfer.py` (digits 0–4 → 5–9, 16×16, batch 32, SGD-Nesterov 0.9, "
        "cosine, clipping 1, one thread per process, 2 workers), same splits and seeds. "
        f"α-curve: L2-SP at fixed α, β = {CURVE_BETA:g} (the grid search's most frequent β in transfer.json, "
        f"9 of 24 records), lr {CURVE_LR:g}, trained on all N, tested on the held-out 30 % (an oracle, not a "
        "method). Plain fine-tuning: α = β = 0, lr ∈ {0.1, 0.01, 0.001, 0.0001} chosen on a stratified "
        "80/20 split and retrained on all N (5 runs), or by the lowest final training loss on all N (4 runs). "
        f"Total time of these runs: {data.get('seconds', 0.0) / 60:.0f} min.",
        "",
    ]
    if any(r["kind"].startswith(BO) or r["kind"] in (LAPLACE, IVON) for r in records):
        lines += [
            "**The baselines a user would pick instead** (`--stage baselines`, same splits, steps and training "
            "settings; compute is the wall time of the whole procedure, and `runs` counts its full training runs):",
            "",
            f'- `{BO}, 12 / 36 trials`: `Trainer.hyperparameter_search(backend="optuna")` on `L2SPTrainer` '
            "(which takes a `model_init`: a fresh model and anchor μ per trial), TPE sampler seeded with the "
            "seed, log-uniform α, β ∈ [1e-6, 1e-2] and lr ∈ [1e-4, 1e-1] (the paper's boxes); each trial "
            "trains on the stratified 80 % and is scored by its validation NLL on the other 20 % at the last "
            "step; the best trial is retrained on all N. TPE proposes trial k from trials 0…k−1 only, so one "
            "36-trial study is read as both procedures (its first 12 trials are the 12-trial study).",
            f"- `{LAPLACE}` (`benchmarks/_baselines.py`): online marginal-likelihood training (Immer et al. "
            "2021, as `laplace.marglik_training`, with the backbone prior centred at μ through "
            "`Laplace(..., prior_mean=...)`): L2-SP MAP training whose two prior precisions (backbone, head) "
            "are set every max_steps/8 steps after a burn-in by 100 Adam steps on laplace-torch's "
            "diagonal empirical-Fisher Laplace log marginal likelihood on all N; α = β = 1e-4 at the start; "
            "one run per lr of the 4-lr grid, the highest final log marginal likelihood wins (no validation "
            "data); predictions at the MAP weights.",
            f"- `{IVON}` (`benchmarks/_baselines.py`): the variational optimizer of Shen et al. 2024 "
            "(`ivon-opt`) as its README runs it: ess = N, one sample per step, its own prior precision "
            "(weight decay 1e-4, a prior centred at 0), hess_init 1, β₂ 0.99999, Trainer's cosine schedule, "
            "no clipping; one run per lr of the 4-lr grid, the lowest final training loss wins; predictions at "
            "the mean weights.",
            f"- `{GRID_EXTENDED}`: the paper's grid search (stratified 80/20 split, lowest validation NLL at "
            "the last step, the winner retrained on all N) with α's range extended past the paper's cap of "
            f"{PAPER_ALPHA_MAX:g}: α ∈ {{{', '.join(_fmt_alpha(a) for a in GRID_EXTENDED_ALPHAS)}}}, β = "
            f"{CURVE_BETA:g} (the α-curve's β), lr in the 4-lr grid: 36 runs + the retrain, in the cells whose "
            "α-curve peaks above the cap only.",
            "",
        ]
    tasks = [EXISTING] + [c for c in CANDIDATES if any(r["task"] == c for r in records)]
    for task in tasks:
        cells = curve_cells(records, task)
        rows = method_rows(records, task)
        if not cells and not rows:
            continue
        noise, steps = TASKS[task]
        steps = data.get("settings", {}).get("steps") or steps
        title = "the existing task" if task == EXISTING else f"candidate `{task}`"
        lines += [
            f"### α-curve, {title} ({100 * noise:.0f} % label noise, {steps} steps)",
            "",
            "Test accuracy / NLL, mean over seeds; per-seed numbers in `regularization.json`.",
            "",
        ]
        deelbo = {(r["backbone"], r["n"]): r for r in rows if r["method"] == DEELBO}
        lines += curve_table(cells, reference if task == EXISTING else None, deelbo) + [""]
        if (EXISTING == task and reference) or task != EXISTING:
            lines += [f"![α-curve, {task}]({link}/alpha-curve-{task}.png)", ""]
        if rows or (task == EXISTING and reference):
            lines += [
                f"Procedures on {title}"
                + (
                    " (DE ELBO and grid-search rows: from the transfer benchmark's "
                    "records on the same seeds, 0–2; the best fixed α > 0 row is the α-curve's maximum over α > 0, an oracle; α = 0 is plain fine-tuning at lr 0.1):"
                    if task == EXISTING
                    else " (the best fixed α > 0 row is the α-curve's maximum over α > 0, an oracle; α = 0 is plain fine-tuning at lr 0.1):"
                ),
                "",
            ]
            lines += rows_table(rows, reference if task == EXISTING else None, cells) + [""]
        if any(r["task"] == task and r["kind"] == LAYER_WISE for r in records):
            lines += [f"![layer-wise λ by depth, {task}]({link}/layer-lambda-{task}.png)", ""]
    screen = data.get("screen", [])
    if screen:
        lines += [
            "### The screen and the choice",
            "",
            f"Rule (fixed before any run of a candidate): candidates in the order {', '.join(CANDIDATES)}; on "
            f"the screening cell ({SCREEN_CELL[0]}, N = {SCREEN_CELL[1]}, seeds 0–2) the first whose best "
            f"fixed α beats α = 0 by ≥ {100 * MIN_GAIN:.0f} points of test accuracy (mean of the seeds) is "
            "chosen; its full α-curve defines the task's cells.",
            "",
            "| candidate | α = 0 | best α | best α's accuracy | gain | passes |",
            "|---|---|---|---|---|---|",
        ]
        for s in screen:
            lines.append(
                f"| {s['task']} | {s['zero_accuracy']:.3f} | {_fmt_alpha(s['best_alpha'])} | "
                f"{s['best_accuracy']:.3f} | {100 * s['gain']:+.1f} pts | {'yes' if s['passes'] else 'no'} |"
            )
        choice = data.get("choice")
        lines += [
            "",
            f"Chosen: **{choice['task']}**." if choice and choice.get("task") else "No candidate passed the screen.",
            "",
        ]
        if choice and choice.get("task"):
            above = [c for c in curve_cells(records, choice["task"]) if c.get("best_alpha", 0) > PAPER_ALPHA_MAX]
            if above:
                lines += [
                    f"In {len(above)} of its cells the curve's best α lies above {PAPER_ALPHA_MAX:g}, where "
                    "the paper's grid stops ({}): there the procedures above include `{}`.".format(
                        ", ".join(f"{c['backbone']} N = {c['n']}: α = {_fmt_alpha(c['best_alpha'])}" for c in above),
                        GRID_EXTENDED,
                    ),
                    "",
                ]
    lines.append(SECTION[1])
    return "\n".join(lines)


def rebuild(store: Store, output_dir: str, docs_path: str) -> None:
    store.data["reference"] = transfer_reference()
    store.data["summary"] = {
        task: {"alpha_curve": curve_cells(store.records, task), "procedures": method_rows(store.records, task)}
        for task in sorted({r["task"] for r in store.records})
    }
    store.save()
    for task in store.data["summary"]:
        if curve_cells(store.records, task):
            figure(
                store.records,
                task,
                os.path.join(output_dir, f"alpha-curve-{task}.png"),
                store.data["reference"] if task == EXISTING else None,
            )
        layer_figure(store.records, task, os.path.join(output_dir, f"layer-lambda-{task}.png"))
    update_section(docs_path, SECTION, markdown(store, output_dir, docs_path))


SWITCHES = {
    "--resume": "Keep finished runs (the default; kept for symmetry with the other benchmarks).",
    "--fresh": "Forget the records in OUTPUT_DIR/regularization.json.",
    "--replot": "Only rebuild the figures, the docs section and the summary.",
    "--reproduce": "Only train a few committed α-curve points again, here: OUTPUT_DIR/reproduce.json.",
    "--calibrate-diagonal": "Only measure diagonal_sigma_learning_rate's default (OUTPUT_DIR/diagonal-calibration.json).",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_flags(
        parser,
        os.path.join(ROOT, "benchmarks", "results", "regularization"),
        "A smoke run: 1 backbone, N=50, 1 seed, 5 steps, 2 α values, 1 candidate, every stage.",
    )
    parser.add_argument(
        "--stage",
        nargs="+",
        default=["plain", "curve"],
        choices=["plain", "curve", "screen", "chosen", "baselines", "variants"],
        help="plain: plain fine-tuning rows; curve: the α-curve, both on the existing task; screen: "
        "the candidates' α-curves, the choice, the chosen task's full curve; chosen: DE ELBO and "
        "plain rows on the chosen task; baselines: L2-SP + Bayesian optimization, Laplace and IVON on "
        "the chosen task, then on the existing one; variants: DE ELBO's layer-wise λ, diagonal σ "
        "and LoRA rows, same order.",
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=list(BASELINES),
        choices=list(BASELINES),
        help="The baselines `--stage baselines` runs (default: all).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*VARIANTS, LORA, PLAIN_LORA],
        choices=[*VARIANTS, LORA, PLAIN_LORA],
        help="The variants `--stage variants` runs beside DE ELBO's own row (default: all).",
    )
    add_switches(parser, SWITCHES)
    args = parser.parse_args(argv)
    global CANDIDATES, SCREEN_CELL
    if args.quick:
        settings = {
            "steps": 5,
            "learning_rates": [0.1, 0.01],
            "alphas": [0.0, 1e-2],
            "ns": [50],
            "seeds": [0],
            "backbones": ["timm-resnet"],
            "candidates": ["noise-20"],
            "bo_trials": [2, 3],
        }
        CANDIDATES, SCREEN_CELL = ("noise-20",), ("timm-resnet", 50)
        args.stage = ["plain", "curve", "screen", "chosen", "baselines", "variants"]
    else:
        settings = {
            "steps": None,
            "learning_rates": list(LEARNING_RATES),
            "alphas": list(ALPHAS),
            "ns": args.ns,
            "seeds": args.seeds,
            "backbones": args.backbones,
            "candidates": list(CANDIDATES),
            "bo_trials": list(BO_TRIALS),
        }
    os.makedirs(args.output_dir, exist_ok=True)
    docs_path = args.docs or (os.path.join(args.output_dir, "benchmarks.md") if args.quick else V1_DOCS)
    store = Store(os.path.join(args.output_dir, "regularization.json"), fresh=args.fresh)
    previous = store.data.get("settings", {})
    store.data["settings"] = {
        **{k: v for k, v in settings.items() if k not in ("ns", "seeds", "backbones")},
        "curve_beta": CURVE_BETA,
        "curve_learning_rate": CURVE_LR,
        "screen_cell": list(SCREEN_CELL),
        "min_gain": MIN_GAIN,
        "tasks": {k: {"label_noise": v[0], "steps": v[1]} for k, v in TASKS.items()},
    }
    if args.replot:  # the backbones of the last training pass stay on record
        store.data["settings"]["pretraining"] = previous.get("pretraining")
        rebuild(store, args.output_dir, docs_path)
        return
    _setup_thread()
    cache_dir = (
        os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "pretrained")
        if not args.quick
        else os.path.join(args.output_dir, "pretrained")
    )
    paths = {b: pretrained_path(b, cache_dir) for b in settings["backbones"]}
    if args.calibrate_diagonal:
        calibrate_diagonal(settings["backbones"], paths, args.output_dir, args.workers)
        return
    if args.reproduce:
        reproduce(store, paths, args.output_dir)
        return
    store.data["settings"]["pretraining"] = {b: pretraining(p) for b, p in paths.items()}
    work_dir = os.path.join(args.output_dir, "runs")
    cells = (settings["backbones"], settings["ns"], settings["seeds"])

    def jobs(task, kinds, backbones=None, ns=None):
        return make_jobs(
            task, kinds, backbones or cells[0], ns or cells[1], cells[2], settings["alphas"], settings, paths, work_dir
        )

    existing = []
    if "plain" in args.stage:
        existing += jobs(EXISTING, [PLAIN_VAL, PLAIN_TRAIN])
    if "curve" in args.stage:
        existing += jobs(EXISTING, [CURVE])
    run_jobs(store, existing, args.workers)
    if existing:
        rebuild(store, args.output_dir, docs_path)
    if "screen" in args.stage:
        screen, chosen = [], None
        for candidate in CANDIDATES:  # 1. the screening cell, in the fixed order
            run_jobs(store, jobs(candidate, [CURVE], [SCREEN_CELL[0]], [SCREEN_CELL[1]]), args.workers)
            result = screen_result(store.records, candidate)
            screen.append(result)
            if result["passes"]:
                chosen = candidate
                break
        store.data["screen"] = screen
        if chosen is None:  # 2. no candidate passed on the screening cell: full curves, same order
            for candidate in CANDIDATES:
                run_jobs(store, jobs(candidate, [CURVE]), args.workers)
                if any(c.get("gain", 0) >= MIN_GAIN for c in curve_cells(store.records, candidate)):
                    chosen = candidate
                    break
        if chosen is None and args.quick:  # the smoke run takes its one candidate, to exercise every stage
            chosen = CANDIDATES[0]
        store.data["choice"] = {
            "task": chosen,
            "rule": f"first of {list(CANDIDATES)} with best fixed α − α=0 ≥ "
            f"{MIN_GAIN} (mean test accuracy of the seeds) on {list(SCREEN_CELL)}",
        }
        store.save()
        if chosen is not None:  # 3. the chosen task's full curve defines its cells
            run_jobs(store, jobs(chosen, [CURVE]), args.workers)
            store.data["choice"]["cells"] = [
                {"backbone": c["backbone"], "n": c["n"], "best_alpha": c.get("best_alpha"), "gain": c.get("gain")}
                for c in curve_cells(store.records, chosen)
            ]
        rebuild(store, args.output_dir, docs_path)
    if "chosen" in args.stage:
        chosen = (store.data.get("choice") or {}).get("task")
        if chosen is None:
            raise SystemExit("--stage chosen: no task has been chosen yet (run --stage screen first)")
        run_jobs(store, jobs(chosen, [DEELBO, PLAIN_VAL, PLAIN_TRAIN]), args.workers)
        rebuild(store, args.output_dir, docs_path)
    if "baselines" in args.stage:  # the chosen task first, then the existing one
        chosen = (store.data.get("choice") or {}).get("task")
        for task in ([chosen] if chosen else []) + [EXISTING]:
            run_jobs(store, jobs(task, [k for k in args.baselines if k != GRID_EXTENDED]), args.workers)
        if chosen and GRID_EXTENDED in args.baselines:  # only where the α-curve peaks above the paper's cap
            above = [
                (c["backbone"], c["n"])
                for c in curve_cells(store.records, chosen)
                if args.quick or c.get("best_alpha", 0) > PAPER_ALPHA_MAX
            ]
            run_jobs(
                store,
                [job for backbone, n in above for job in jobs(chosen, [GRID_EXTENDED], [backbone], [n])],
                args.workers,
            )
        rebuild(store, args.output_dir, docs_path)
    if "variants" in args.stage:
        chosen = (store.data.get("choice") or {}).get("task")
        for task in ([chosen] if chosen else []) + [EXISTING]:
            # DE ELBO's own row is the reference each variant is read against: run it where it is missing.
            run_jobs(store, jobs(task, [DEELBO, *args.variants]), args.workers)
            rebuild(store, args.output_dir, docs_path)
    print(f"wrote {store.path} and the section of {docs_path}")


if __name__ == "__main__":
    sys.exit(main())
