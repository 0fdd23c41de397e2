"""Protocol v2's κ check: DE ELBO over the data emphasis κ = D/N × {0.1, 1, 10, 100} on noise-40,
where the prior matters (benchmarks/protocol_v2.json, `claims_checks.kappa`).

The paper's claim (Harvey et al., Fig. 3): accuracy is flat over a wide range of κ around D/N, so
κ = D/N needs no tuning. Each run: one backbone replicate (0), seeds 0–2, lr 0.1, the cell's steps
from the convergence rule; scored at the posterior mean on the protocol's fixed test set. The
differences against κ = D/N are paired by seed.

    python -m benchmarks.kappa_sweep                  # resumable: run again to continue
    python -m benchmarks.kappa_sweep --report         # the table from the records
    python -m benchmarks.kappa_sweep --quick --output-dir /tmp/kappa    # a smoke run

Results: benchmarks/results/v2/kappa.json; `python -m benchmarks.report` writes the table into
docs/benchmarks/protocol-v2.md.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks import convergence, harness, task

FACTORS = (0.1, 1.0, 10.0, 100.0)  # κ / (D/N)
CELLS = tuple(("noise-40", b, n) for b in ("timm-resnet", "vit") for n in (100, 500))
LEARNING_RATE = 0.1
REPLICATE = 0


def record_key(record: dict) -> tuple:
    return (record["task"], record["backbone"], record["n"], record["factor"], record["seed"])


def jobs(cells, seeds, step_counts: dict, output_dir: str) -> list[tuple]:
    return [
        (*cell, factor, seed, step_counts[cell], output_dir) for cell in cells for seed in seeds for factor in FACTORS
    ]


def job_keys(job) -> list[tuple]:
    return [job[:5]]


def run_one(job) -> list[dict]:
    task.setup_worker()
    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments

    task_name, backbone, n, factor, seed, steps, output_dir = job
    path = task.backbone_path(backbone, REPLICATE, os.path.join(output_dir, "pretrained"))
    train, test = task.training_data(task_name, n, seed)
    model = task.model_init(backbone, path, seed)()
    kappa = factor * sum(p.numel() for p in model.parameters()) / n
    work_dir = os.path.join(output_dir, "runs", "kappa", f"{task_name}-{backbone}-{n}-x{factor:g}-s{seed}")
    args = DEELBoTrainingArguments(
        kappa=kappa, learning_rate=LEARNING_RATE, output_dir=work_dir, **task.training_settings(steps, seed)
    )
    start = time.perf_counter()
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    learned = trainer.method_config()
    return [
        {
            "task": task_name,
            "backbone": backbone,
            "n": n,
            "factor": factor,
            "seed": seed,
            "replicate": REPLICATE,
            "steps": steps,
            "kappa": kappa,
            **task.evaluate(trainer, test),
            "lambda": learned.backbone_prior_variance,
            "sigma": learned.sigma,
            "seconds": time.perf_counter() - start,
            "backbone_sha256": task.pretraining(path)["weights_sha256"],
            **harness.provenance(),
        }
    ]


def rows(records: list[dict]) -> list[dict]:
    """Per cell and κ factor: mean accuracy, NLL and σ over seeds, and the accuracy difference
    against κ = D/N paired by seed (95 % t interval over the seeds)."""
    by = {record_key(r): r for r in records}
    table = []
    for cell in CELLS:
        for factor in FACTORS:
            own = {k[4]: r for k, r in by.items() if k[:4] == (*cell, factor)}
            if not own:
                continue
            pairs = [
                (s, r["accuracy"] - by[(*cell, 1.0, s)]["accuracy"]) for s, r in own.items() if (*cell, 1.0, s) in by
            ]
            table.append(
                {
                    "cell": cell,
                    "factor": factor,
                    "seeds": len(own),
                    **{m: statistics.mean(r[m] for r in own.values()) for m in ("accuracy", "nll", "sigma")},
                    "per_seed": {s: own[s]["accuracy"] for s in sorted(own)},
                    **({"vs_default": harness.paired_interval(pairs)} if factor != 1.0 and pairs else {}),
                }
            )
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| backbone | N | κ / (D/N) | seeds | accuracy | − κ = D/N (points, 95 % interval) | NLL | σ | accuracy per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        difference = harness.format_interval(e["vs_default"]) if "vs_default" in e else "(the default)"
        per_seed = ", ".join(f"{v:.3f}" for v in e["per_seed"].values())
        lines.append(
            f"| {e['cell'][1]} | {e['cell'][2]} | {e['factor']:g} | {e['seeds']} | {e['accuracy']:.3f} | {difference} "
            f"| {e['nll']:.3f} | {e['sigma']:.3g} | {per_seed} |"
        )
    return "\n".join(lines)


def results_path(output_dir: str) -> str:
    return os.path.join(output_dir, "kappa.json")


def main(argv=None) -> None:
    args = harness.command_line(__doc__, "One cell, 1 seed, 16 steps per run.", argv)
    store = harness.RecordStore(results_path(args.output_dir), record_key)
    if not args.report:
        cells, seeds = (CELLS[:1], [0]) if args.quick else (CELLS, harness.protocol()["seeds"])
        step_counts = {cell: 16 if args.quick else convergence.steps(*cell) for cell in cells}
        for backbone in sorted({b for _, b, _ in cells}):
            task.backbone_path(backbone, REPLICATE, os.path.join(args.output_dir, "pretrained"))
        harness.run(
            store,
            jobs(cells, seeds, step_counts, args.output_dir),
            run_one,
            job_keys,
            args.workers,
            describe=lambda r: (
                f"kappa {r['factor']:g} x D/N {r['backbone']} N={r['n']} s{r['seed']}: "
                f"acc {r['accuracy']:.3f} ({r['seconds']:.0f} s)"
            ),
        )
    print(markdown(rows(store.records)))


if __name__ == "__main__":
    main()
