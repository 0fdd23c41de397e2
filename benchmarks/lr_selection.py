"""DE ELBO's learning rate by successive halving against the full 4-run selection and the grid search.

`select_learning_rate(strategy="halving")` chooses among the same 4 learning rates by the same
training objective as the full selection (`strategy="full"`, the paper's: 4 complete runs, the
lowest final objective wins), training 1.35 runs' steps (`hf_deelbo.search.halving_schedule`; each
early round scored after a cool-down branch, `hf_deelbo.search.PauseAtStep`).
Per (task, backbone, N, seed), in one process, one after the other (alternating which goes
first), this runs:

- successive halving: the chosen learning rate, the returned model's test accuracy, NLL and ECE,
  and the wall time of the whole procedure;
- one DE ELBO run, the unit of the full selection (`select_learning_rate` with lr 0.1 alone: a
  complete run and its final 10-draw objective), as `benchmarks/run_cost.py` measures it;
- the grid search's units, also as `run_cost.py` measures them: one grid tuning run
  (`l2sp_grid_search` with a one-point grid: L2-SP on the stratified 80 % of N, then the
  validation NLL) and the grid's retrain (L2-SP on all N), lr 0.1.

From these, per pair: halving / DE ELBO run (the acceptance: ≤ 2; the full selection is 4) and
grid / halving = (144 · tuning run + retrain) / halving (≥ 60).

The full selection's choice and accuracy are its records in
`benchmarks/results/regularization/regularization.json` (the `DE ELBO` rows: the same tasks,
splits, seeds, settings and code path). Successive halving resumes its runs exactly, so where it
chooses the full selection's learning rate its model is bitwise the full selection's: the
benchmark checks that the two records' accuracies are then equal, which also checks that the
records are comparable.

Tasks: `digits` (the transfer task of `benchmarks/transfer.py`: a backbone pretrained on digits
0–4, N ∈ {50, 100, 500} images of 5–9, 200 SGD-Nesterov steps, cosine, clipping 1, batch 32) and
`noise-40` (the regularization-sensitive task of `benchmarks/regularization.py`: the same with 40 %
of the N training labels replaced), both backbones (timm ResNet, ViT), seeds 0–2; learning rates
{0.1, 0.01, 0.001, 0.0001}; one thread per process. Nothing here is tuned.

    python -m benchmarks.lr_selection                 # ≈ 40 min on 2 cores: benchmarks/results/lr_selection.json, docs
    python -m benchmarks.lr_selection --summarize     # the table and docs from the records so far
    python -m benchmarks.lr_selection --crossover     # ≈ 6 min: when lr 0.1 overtakes 0.01 (lr_crossover.json)
    python -m benchmarks.lr_selection --quick --output-dir /tmp/lr-quick   # a smoke run (CI)

Records are saved after every pair and a rerun skips the pairs already done.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time

from benchmarks._common import V1_DOCS, add_cell_flags, update_section
from benchmarks.regularization import DEELBO, EXISTING, LEARNING_RATES, TASKS, task_data
from benchmarks.run_cost import GRID_RUNS
from benchmarks.transfer import ROOT, _setup_thread, evaluate, model_init, pretrained_path, training_settings

SECTION = ("<!-- lr_selection:start -->", "<!-- lr_selection:end -->")
TASK_NAMES = (EXISTING, "noise-40")
FULL, HALVING = "full", "halving"


def run_pair(job) -> dict:
    """One (task, backbone, N, seed): successive halving, one DE ELBO run and the grid's two units,
    in an order that alternates with the seed."""
    _setup_thread()
    from hf_deelbo import DEELBoTrainingArguments, L2SPTrainingArguments, l2sp_grid_search, select_learning_rate

    task, backbone, n, seed, steps, learning_rates, path, work_dir = job
    train, test = task_data(task, n, seed)
    labels = [int(v) for v in train.with_format(None)["labels"]]
    common = training_settings(steps, seed)
    init = model_init(backbone, path, seed)
    record = {"task": task, "backbone": backbone, "n": n, "seed": seed, "steps": steps}

    def halving() -> dict:
        args = DEELBoTrainingArguments(output_dir=os.path.join(work_dir, HALVING), **common)
        start = time.perf_counter()
        result = select_learning_rate(init, train, args, learning_rates=learning_rates, strategy=HALVING)
        seconds = time.perf_counter() - start
        return {
            HALVING: {
                **evaluate(result.trainer, test),
                "learning_rate": result.best["learning_rate"],
                "seconds": seconds,
                "total_steps": result.total_steps,
                "runs": [
                    {
                        "learning_rate": r.settings["learning_rate"],
                        "objective": r.score,
                        "seconds": r.seconds,
                        "steps": r.steps,
                        "round_scores": r.round_scores,
                        "eliminated_at": r.eliminated_at,
                    }
                    for r in result.runs
                ],
            }
        }

    def deelbo_run() -> dict:
        args = DEELBoTrainingArguments(output_dir=os.path.join(work_dir, "run"), **common)
        return {"deelbo_run_seconds": select_learning_rate(init, train, args, learning_rates=[0.1]).runs[0].seconds}

    def grid_units() -> dict:
        args = L2SPTrainingArguments(output_dir=os.path.join(work_dir, "grid"), **common)
        result = l2sp_grid_search(init, train, labels, args, alphas=[1e-4], betas=[1e-4], learning_rates=[0.1])
        return {"grid": {"tuning_run_seconds": result.runs[0].seconds, "retrain_seconds": result.final_seconds}}

    order = [halving, deelbo_run, grid_units] if seed % 2 == 0 else [grid_units, deelbo_run, halving]
    for unit in order:
        record.update(unit())
    record["order"] = [unit.__name__ for unit in order]
    record["halving_over_deelbo_run"] = record[HALVING]["seconds"] / record["deelbo_run_seconds"]
    grid_seconds = GRID_RUNS * record["grid"]["tuning_run_seconds"] + record["grid"]["retrain_seconds"]
    record["grid_over_halving"] = grid_seconds / record[HALVING]["seconds"]
    return record


# `--crossover`: when does the learning rate that wins at T take the lead? Per seed, one run per
# learning rate, paused at each of CROSSOVER_PAUSES × T and scored there after the same cool-down
# branch successive halving uses (10 draws), then scored at T: the cooled-down objective against
# the step it was taken at. The cells: where halving missed, and one where it agreed.
CROSSOVER_PAUSES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)
CROSSOVER_CELLS = (("noise-40", "vit", 500), ("noise-40", "timm-resnet", 500))
CROSSOVER_LEARNING_RATES = (0.1, 0.01)


def crossover_run(job) -> dict:
    """One (task, backbone, N, seed, lr): its cooled-down objective at each pause and at T."""
    _setup_thread()
    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments
    from hf_deelbo.search import PauseAtStep, halving_cooldown_steps

    task, backbone, n, seed, learning_rate, steps, path, work_dir = job
    train, _ = task_data(task, n, seed)
    init = model_init(backbone, path, seed)
    args = DEELBoTrainingArguments(
        output_dir=work_dir,
        **{**training_settings(steps, seed), "learning_rate": learning_rate, "ignore_data_skip": False},
    )
    pauses = [max(1, int(steps * f)) for f in CROSSOVER_PAUSES]
    scores, checkpoint = [], None
    for pause in [*pauses, steps]:
        cooldown = halving_cooldown_steps(pause) if pause != steps else 0
        trainer = DEELBoTrainer(
            model=init(),
            args=args,
            train_dataset=train,
            callbacks=[PauseAtStep(pause, cooldown)] if pause != steps else None,
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        scores.append(
            {
                "step": pause,
                "cooldown_steps": cooldown,
                "objective": float(trainer.training_objective(train, num_samples=10)),
            }
        )
        checkpoint = os.path.join(work_dir, f"checkpoint-{pause}")
    return {
        "task": task,
        "backbone": backbone,
        "n": n,
        "seed": seed,
        "learning_rate": learning_rate,
        "steps": steps,
        "scores": scores,
    }


def crossover(output_dir: str, workers: int, seeds) -> None:
    cache_dir = os.path.join(output_dir, "pretrained")
    paths = {b: pretrained_path(b, cache_dir) for b in {c[1] for c in CROSSOVER_CELLS}}
    jobs = [
        (
            task,
            backbone,
            n,
            seed,
            lr,
            TASKS[task][1],
            paths[backbone],
            os.path.join(output_dir, "runs", f"lr_crossover-{task}-{backbone}-{n}-{seed}-{lr:g}"),
        )
        for task, backbone, n in CROSSOVER_CELLS
        for seed in seeds
        for lr in CROSSOVER_LEARNING_RATES
    ]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        records = list(pool.imap(crossover_run, jobs))
    save(
        {
            "settings": {
                "pauses": list(CROSSOVER_PAUSES),
                "learning_rates": list(CROSSOVER_LEARNING_RATES),
                "draws": 10,
            },
            "records": records,
        },
        os.path.join(output_dir, "lr_crossover.json"),
    )
    for task, backbone, n in CROSSOVER_CELLS:
        for seed in seeds:
            rows = {
                r["learning_rate"]: r["scores"]
                for r in records
                if (r["task"], r["backbone"], r["n"], r["seed"]) == (task, backbone, n, seed)
            }
            print(
                f"{task} {backbone} N={n} seed {seed}: "
                + "; ".join(
                    f"step {a['step']}: " + ", ".join(f"{lr:g} {rows[lr][i]['objective']:.3f}" for lr in rows)
                    for i, a in enumerate(rows[CROSSOVER_LEARNING_RATES[0]])
                )
            )


def with_full_selection(record: dict, full: dict | None) -> dict:
    """`record` with the full selection's record of the same pair (None until it exists)."""
    if full is None:
        return {**record, FULL: None, "agrees": None}
    same = full["learning_rate"] == record[HALVING]["learning_rate"]
    return {
        **record,
        FULL: {k: full[k] for k in ("accuracy", "nll", "ece", "learning_rate", "seconds")},
        "agrees": same,
        "identical_model": same and full["accuracy"] == record[HALVING]["accuracy"],
    }


def key(record: dict) -> tuple:
    return record["task"], record["backbone"], record["n"], record["seed"]


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"records": []}


def save(data: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def full_selections(path: str) -> dict:
    """(task, backbone, N, seed) -> the full selection's record in regularization.json."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = json.load(f)["records"]
    return {key(r): r for r in records if r["kind"] == DEELBO and r["task"] in TASK_NAMES}


def summarize(records: list[dict]) -> list[dict]:
    """Per (task, backbone, N), over the seeds whose full selection is on record: means, agreement,
    the cost ratios (and their worst seed)."""
    rows = []
    joined = [r for r in records if r.get(FULL)]
    cells = sorted({key(r)[:3] for r in joined}, key=lambda k: (TASK_NAMES.index(k[0]), k[1], k[2]))
    for task, backbone, n in cells:
        group = sorted((r for r in joined if key(r)[:3] == (task, backbone, n)), key=lambda r: r["seed"])
        rows.append(
            {
                "task": task,
                "backbone": backbone,
                "n": n,
                "seeds": [r["seed"] for r in group],
                **{
                    f"{field}_{s}": statistics.mean(r[s][field] for r in group)
                    for s in (FULL, HALVING)
                    for field in ("accuracy", "nll", "ece")
                },
                "per_seed_accuracy": {s: [round(r[s]["accuracy"], 4) for r in group] for s in (FULL, HALVING)},
                "learning_rates": {s: [r[s]["learning_rate"] for r in group] for s in (FULL, HALVING)},
                "agreements": sum(r["agrees"] for r in group),
                "identical_models": sum(r["identical_model"] for r in group),
                "halving_over_deelbo_run": statistics.mean(r["halving_over_deelbo_run"] for r in group),
                "halving_over_deelbo_run_max": max(r["halving_over_deelbo_run"] for r in group),
                "grid_over_halving": statistics.mean(r["grid_over_halving"] for r in group),
                "grid_over_halving_min": min(r["grid_over_halving"] for r in group),
                "grid_over_full": statistics.mean(r["grid_over_full"] for r in group),
            }
        )
    return rows


def markdown(rows: list[dict], records: list[dict], data: dict) -> str:
    joined = [r for r in records if r.get(FULL)]
    pairs = len(joined)
    agree = sum(r["agrees"] for r in joined)
    identical = sum(r["identical_model"] for r in joined)
    lost = [r for r in rows if r["accuracy_halving"] < r["accuracy_full"] - 0.005]
    costly = [r for r in joined if r["halving_over_deelbo_run"] > 2]
    cheap_grid = [r for r in joined if r["grid_over_halving"] < 60]
    lines = [
        SECTION[0],
        "## The learning rate at 1.35 runs: successive halving with cool-down branches (`benchmarks/lr_selection.py`)",
        "",
        'DE ELBO\'s learning rate among {} by `select_learning_rate(strategy="halving")` (all 4 to T/16, the best 2 '
        "to T/8, the best to T; each early round scored after a cool-down branch of 0.2 × the steps trained, the "
        "learning rate decayed linearly towards 0, then dropped; scored by the training objective with 1 draw at "
        "every round; 1.35T steps) against the full selection (4 complete runs, the lowest final objective: the `DE ELBO` rows "
        "of the regularization benchmark, same splits, seeds and settings). Per (task, backbone, N, seed), in one "
        "process, one after the other: halving, one DE ELBO run (lr 0.1 alone, the full selection's unit: the full "
        "selection costs 4 of them) and the grid search's two units (a tuning run on the stratified 80 % of N, the "
        "retrain; grid = 144 tuning runs + retrain), as `benchmarks/run_cost.py` measures them. Accuracy, NLL, "
        "ECE: the returned model on the test split, means over seeds. {} steps, 3 seeds; whole run: {:.0f} min.".format(
            list(data["settings"]["learning_rates"]), data["settings"]["steps"], data.get("seconds", 0) / 60
        ),
        "",
        f"Acceptance: halving ≤ 2 DE ELBO runs in **{pairs - len(costly)} of {pairs}** pairs; grid ≥ 60× halving in "
        f"**{pairs - len(cheap_grid)} of {pairs}** pairs; accuracy ≥ full − 0.5 points in **{len(rows) - len(lost)} "
        f"of {len(rows)}** cells; the same learning rate in **{agree} of {pairs}** pairs "
        f"({100 * agree / max(pairs, 1):.0f} %). Where the learning rate agreed, halving's model had the full "
        f"selection's test accuracy exactly in {identical} of {agree} pairs (exact resume).",
        "",
        "| task | backbone | N | acc full | acc halving | NLL full | NLL halving | ECE full | ECE halving | lr full | "
        "lr halving | same lr | halving (runs) | worst seed (runs) | grid / halving | worst seed | grid / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " ✗" if r in lost else ""
        lines.append(
            f"| {r['task']} | {r['backbone']} | {r['n']} | {r['accuracy_full']:.3f} | {r['accuracy_halving']:.3f}{mark} | "
            f"{r['nll_full']:.3f} | {r['nll_halving']:.3f} | {r['ece_full']:.3f} | {r['ece_halving']:.3f} | "
            f"{', '.join(f'{v:g}' for v in r['learning_rates'][FULL])} | "
            f"{', '.join(f'{v:g}' for v in r['learning_rates'][HALVING])} | {r['agreements']}/{len(r['seeds'])} | "
            f"{r['halving_over_deelbo_run']:.2f} | {r['halving_over_deelbo_run_max']:.2f} | "
            f"{r['grid_over_halving']:.0f}× | {r['grid_over_halving_min']:.0f}× | {r['grid_over_full']:.0f}× |"
        )
    lines += ["", "Per-seed test accuracy (full / halving):", ""]
    for r in rows:
        lines.append(
            f"- {r['task']}, {r['backbone']}, N = {r['n']}: {r['per_seed_accuracy'][FULL]} / "
            f"{r['per_seed_accuracy'][HALVING]}"
        )
    lines += ["", SECTION[1]]
    return "\n".join(lines)


def rebuild(data: dict, full_path: str, docs_path: str) -> None:
    full = full_selections(full_path)
    data["records"] = [with_full_selection(r, full.get(key(r))) for r in data["records"]]
    for r in data["records"]:
        r["grid_over_full"] = (GRID_RUNS * r["grid"]["tuning_run_seconds"] + r["grid"]["retrain_seconds"]) / (
            4 * r["deelbo_run_seconds"]
        )
    rows = summarize(data["records"])
    data["summary"] = rows
    if rows:
        update_section(docs_path, SECTION, markdown(rows, data["records"], data))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_flags(
        parser,
        os.path.join(ROOT, "benchmarks", "results"),
        "A smoke run: one pair, 16 steps, 2 learning rates, and its own full selection.",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=list(TASK_NAMES))
    parser.add_argument(
        "--full-selection",
        default=None,
        help="The regularization benchmark's records holding the full selections (default: "
        "OUTPUT_DIR/regularization/regularization.json).",
    )
    parser.add_argument("--summarize", action="store_true", help="Only rebuild the summary and the docs section.")
    parser.add_argument(
        "--crossover",
        action="store_true",
        help="Only measure, per seed, the cooled-down objective of lr 0.1 and 0.01 at fractions of the "
        "schedule in CROSSOVER_CELLS (OUTPUT_DIR/lr_crossover.json).",
    )
    args = parser.parse_args(argv)
    if args.crossover:
        crossover(args.output_dir, args.workers, args.seeds)
        return
    if args.quick:
        args.tasks, args.backbones, args.ns, args.seeds = ["noise-40"], ["timm-resnet"], [50], [0]
    steps = 16 if args.quick else None
    learning_rates = [0.1, 0.01] if args.quick else list(LEARNING_RATES)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "lr_selection.json")
    full_path = args.full_selection or os.path.join(args.output_dir, "regularization", "regularization.json")
    docs_path = args.docs or (os.path.join(args.output_dir, "benchmarks.md") if args.quick else V1_DOCS)
    data = load(path)
    from hf_deelbo.search import HALVING_COOLDOWN_FRACTION

    data["settings"] = {
        "learning_rates": learning_rates,
        "steps": steps or TASKS[EXISTING][1],
        "cooldown_fraction": HALVING_COOLDOWN_FRACTION,
        "grid_runs": GRID_RUNS,
        "full_selection": os.path.relpath(full_path, ROOT),
    }
    if not args.summarize:
        cache_dir = os.path.join(args.output_dir, "pretrained")
        paths = {b: pretrained_path(b, cache_dir) for b in args.backbones}
        if args.quick:  # the smoke run's full selection: the regularization benchmark's own DE ELBO row
            from benchmarks.regularization import Store, make_jobs, run_jobs

            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            store = Store(full_path, fresh=True)
            settings = {"steps": steps, "learning_rates": learning_rates, "bo_trials": [2]}
            run_jobs(
                store,
                make_jobs(
                    "noise-40",
                    [DEELBO],
                    args.backbones,
                    args.ns,
                    args.seeds,
                    [0.0],
                    settings,
                    paths,
                    os.path.join(args.output_dir, "runs"),
                ),
                1,
            )
        done = {key(r) for r in data["records"]}
        jobs = [
            (
                task,
                backbone,
                n,
                seed,
                steps or TASKS[task][1],
                learning_rates,
                paths[backbone],
                os.path.join(args.output_dir, "runs", f"lr_selection-{task}-{backbone}-{n}-{seed}"),
            )
            for task, backbone, n, seed in itertools.product(args.tasks, args.backbones, args.ns, args.seeds)
            if (task, backbone, n, seed) not in done
        ]
        jobs.sort(key=lambda j: -j[2])  # large N first, so the workers finish together
        start, base = time.perf_counter(), data.get("seconds", 0.0)
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for record in pool.imap_unordered(run_pair, jobs):
                data["records"].append(record)
                data["seconds"] = base + time.perf_counter() - start
                save(data, path)
                print(
                    f"{record['task']} {record['backbone']} N={record['n']} seed={record['seed']}: halving lr "
                    f"{record[HALVING]['learning_rate']:g} acc {record[HALVING]['accuracy']:.3f}; "
                    f"{record['halving_over_deelbo_run']:.2f} DE ELBO runs, grid / halving "
                    f"{record['grid_over_halving']:.0f}×",
                    flush=True,
                )
    rebuild(data, full_path, docs_path)
    save(data, path)
    print(f"wrote {path} and the section of {docs_path}")


if __name__ == "__main__":
    sys.exit(main())
