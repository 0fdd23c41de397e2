"""Protocol v2's learning-rate check: both selections where lr 0.1 is not the answer
(benchmarks/protocol_v2.json, `claims_checks.learning_rate`).

The ViT on digits at N = 500 with Adam (`optim="adamw_torch"`), learning rates {1e-2, 1e-3, 1e-4,
1e-5}, replicate 0, seeds 0–2, the cell's steps from the convergence rule. Every (method, lr, seed)
is trained once through the library's own selection path (`select_learning_rate` for DE ELBO: the
final training objective over 10 draws; plain fine-tuning's final training loss), and scored on
the protocol's fixed test set. Per seed, each selection's choice is compared with the oracle lr
(the best mean test accuracy over the seeds, which reads the test set): the points it loses.

    python -m benchmarks.lr_check                   # resumable: run again to continue
    python -m benchmarks.lr_check --report
    python -m benchmarks.lr_check --quick --output-dir /tmp/lr_check

Results: benchmarks/results/v2/lr_check.json; `python -m benchmarks.report` writes the table into
docs/benchmarks/protocol-v2.md.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks import convergence, harness, task

CELL = ("digits", "vit", 500)
LEARNING_RATES = (1e-2, 1e-3, 1e-4, 1e-5)
OPTIMIZER = "adamw_torch"
METHODS = ("plain", "DE ELBO")
REPLICATE = 0


def record_key(record: dict) -> tuple:
    return (record["method"], record["learning_rate"], record["seed"])


def jobs(seeds, steps: int, output_dir: str) -> list[tuple]:
    return [(method, lr, seed, steps, output_dir) for seed in seeds for lr in LEARNING_RATES for method in METHODS]


def job_keys(job) -> list[tuple]:
    return [job[:3]]


def run_one(job) -> list[dict]:
    task.setup_worker()
    from hf_deelbo import DEELBoTrainingArguments, L2SPTrainer, L2SPTrainingArguments, select_learning_rate

    method, lr, seed, steps, output_dir = job
    path = task.backbone_path(CELL[1], REPLICATE, os.path.join(output_dir, "pretrained"))
    train, test = task.training_data(CELL[0], CELL[2], seed)
    init = task.model_init(CELL[1], path, seed)
    work_dir = os.path.join(output_dir, "runs", "lr_check", f"{method.replace(' ', '-')}-{lr:g}-s{seed}")
    # Adam instead of the recipe's SGD (whose optim_args, momentum and nesterov, Adam does not take)
    settings = {**task.training_settings(steps, seed), "optim": OPTIMIZER, "optim_args": None, "output_dir": work_dir}
    start = time.perf_counter()
    if method == "plain":
        args = L2SPTrainingArguments(alpha=0.0, beta=0.0, **settings)
        result = task.select_by_training_loss(L2SPTrainer, init, train, args, [lr], "Plain fine-tuning")
    else:
        result = select_learning_rate(init, train, DEELBoTrainingArguments(**settings), learning_rates=[lr])
    return [
        {
            "method": method,
            "learning_rate": lr,
            "seed": seed,
            "task": CELL[0],
            "backbone": CELL[1],
            "n": CELL[2],
            "replicate": REPLICATE,
            "steps": steps,
            "optim": OPTIMIZER,
            "selection_score": result.runs[0].score,
            **task.evaluate(result.trainer, test),
            "seconds": time.perf_counter() - start,
            "backbone_sha256": task.pretraining(path)["weights_sha256"],
            **harness.provenance(),
        }
    ]


def rows(records: list[dict]) -> list[dict]:
    """Per method: the mean test accuracy of each lr, the oracle lr, and per seed the lr its
    selection chose and the points that choice loses against the oracle lr."""
    by = {record_key(r): r for r in records}
    table = []
    for method in METHODS:
        seeds = sorted({k[2] for k in by if k[0] == method})
        complete = [s for s in seeds if all((method, lr, s) in by for lr in LEARNING_RATES)]
        if not complete:
            continue
        accuracy = {lr: statistics.mean(by[(method, lr, s)]["accuracy"] for s in complete) for lr in LEARNING_RATES}
        oracle = max(accuracy, key=accuracy.get)
        chosen = {s: min(LEARNING_RATES, key=lambda lr, s=s: by[(method, lr, s)]["selection_score"]) for s in complete}
        regret = [by[(method, oracle, s)]["accuracy"] - by[(method, chosen[s], s)]["accuracy"] for s in complete]
        table.append(
            {
                "method": method,
                "seeds": len(complete),
                "accuracy": accuracy,
                "oracle": oracle,
                "chosen": chosen,
                "regret": regret,
                "regret_interval": harness.paired_interval(list(enumerate(regret))),
            }
        )
    return table


def markdown(table: list[dict]) -> str:
    columns = ["method", "seeds", *(f"accuracy at lr {lr:g}" for lr in LEARNING_RATES), "oracle lr"]
    columns += ["lr chosen per seed", "points lost to the oracle lr (per seed; mean, 95 % interval)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for e in table:
        lost = ", ".join(f"{100 * v:.1f}" for v in e["regret"])
        lines.append(
            f"| {e['method']} | {e['seeds']} | "
            + " | ".join(f"{e['accuracy'][lr]:.3f}" for lr in LEARNING_RATES)
            + f" | {e['oracle']:g} | {', '.join(f'{lr:g}' for lr in e['chosen'].values())} "
            f"| {lost}; {harness.format_interval(e['regret_interval'])} |"
        )
    return "\n".join(lines)


def results_path(output_dir: str) -> str:
    return os.path.join(output_dir, "lr_check.json")


def main(argv=None) -> None:
    args = harness.command_line(__doc__, "1 seed, 16 steps per run.", argv)
    store = harness.RecordStore(results_path(args.output_dir), record_key)
    if not args.report:
        seeds = [0] if args.quick else harness.protocol()["seeds"]
        task.backbone_path(CELL[1], REPLICATE, os.path.join(args.output_dir, "pretrained"))
        harness.run(
            store,
            jobs(seeds, 16 if args.quick else convergence.steps(*CELL), args.output_dir),
            run_one,
            job_keys,
            args.workers,
            describe=lambda r: (
                f"{r['method']} lr {r['learning_rate']:g} s{r['seed']}: acc {r['accuracy']:.3f} "
                f"score {r['selection_score']:.4g} ({r['seconds']:.0f} s)"
            ),
        )
    print(markdown(rows(store.records)))


if __name__ == "__main__":
    main()
