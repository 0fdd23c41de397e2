"""Protocol v2's main comparison: DE ELBO against the methods it replaces, each cell over 3
pretraining replicates × 3 seeds, with paired 95 % intervals (benchmarks/protocol_v2.json).

Tier 1: plain fine-tuning (lr by training loss), DE ELBO (4-lr selection; scored at the
posterior mean, as a 16-draw model average and, on the ResNet, after `recompute_batch_norm`) and
DE ELBO with successive halving. Tier 2: the fixed-α oracle (α = 0 included) and the L2-SP grid.
Tier 3: L2-SP with Bayesian optimization (36 trials), Laplace LA-LML and IVON. The procedures are
`benchmarks.procedures`.
Tiers run in order; within a tier, noise-40 before digits, each cell complete before the next.

    python -m benchmarks.comparison --tier 1            # resumable: run again to continue
    python -m benchmarks.comparison --tier 1 --cells noise-40/timm-resnet/50   # one cell
    python -m benchmarks.comparison --report            # the tables from the records
    python -m benchmarks.comparison --quick --output-dir /tmp/comparison       # a smoke run

Results: benchmarks/results/v2/comparison.json (every record: backbone SHA-256, code commit,
protocol id); the steps come from benchmarks/results/v2/convergence.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import convergence, harness, task
from benchmarks.procedures import (
    BO,
    DEELBO,
    GRID,
    HALVING,
    IVON,
    LAPLACE,
    ORACLE,
    ORACLE_ALPHAS,
    PLAIN,
    PROCEDURES,
)

TIERS = {1: (PLAIN, DEELBO, HALVING), 2: (ORACLE, GRID), 3: (BO, LAPLACE, IVON)}
# The rows of a cell, as records name them: DE ELBO's record gives three predictions.
DEELBO_MEAN, DEELBO_BMA, DEELBO_BN = (
    "DE ELBO (mean)",
    "DE ELBO (16-draw average)",
    "DE ELBO (mean, BatchNorm recomputed)",
)


def record_key(record: dict) -> tuple:
    # The oracle writes one record per α.
    return (
        record["method"],
        record["task"],
        record["backbone"],
        record["n"],
        record["replicate"],
        record["seed"],
        record.get("alpha") if record["method"] == ORACLE else None,
    )


def job_keys(job) -> list[tuple]:
    alphas = ORACLE_ALPHAS if job[0] == ORACLE else (None,)
    return [(*job[:6], alpha) for alpha in alphas]


def all_cells() -> list[tuple]:
    return [(t, b, n) for t in ("noise-40", "digits") for b in ("timm-resnet", "vit") for n in (50, 100, 500)]


def jobs(tier: int, cells, replicates, seeds, step_counts: dict, output_dir: str) -> list[tuple]:
    return [
        (method, t, b, n, r, s, step_counts[(t, b, n)], output_dir)
        for t, b, n in cells
        for r in replicates
        for s in seeds
        for method in TIERS[tier]
    ]


def run_one(job) -> list[dict]:
    task.setup_worker()
    method, task_name, backbone, n, replicate, seed, steps, output_dir = job
    path = task.backbone_path(backbone, replicate, os.path.join(output_dir, "pretrained"))
    train, test = task.training_data(task_name, n, seed)
    init = task.model_init(backbone, path, seed)
    work_dir = os.path.join(output_dir, "runs", f"{task_name}-{backbone}-{n}-r{replicate}-s{seed}", method)
    args = {**task.training_settings(steps, seed), "output_dir": work_dir}
    base = {
        "method": method,
        "task": task_name,
        "backbone": backbone,
        "n": n,
        "replicate": replicate,
        "seed": seed,
        "steps": steps,
        "backbone_sha256": task.pretraining(path)["weights_sha256"],
        **harness.provenance(),
    }
    start = time.perf_counter()
    fields = PROCEDURES[method](init, train, test, args)
    if method == ORACLE:
        return [{**base, **f} for f in fields]
    return [{**base, **fields, "seconds": time.perf_counter() - start}]


# ---- reading the records --------------------------------------------------------------------------


def predictions(records: list[dict]) -> dict[tuple, dict]:
    """{(row, task, backbone, n, replicate, seed): metrics}: one entry per prediction a record gives
    (DE ELBO's three; the oracle's best α per cell and seed is chosen in `oracle_rows`)."""
    out = {}
    for r in records:
        unit = (r["task"], r["backbone"], r["n"], r["replicate"], r["seed"])
        if r["method"] == DEELBO:
            out[(DEELBO_MEAN, *unit)] = r
            out[(DEELBO_BMA, *unit)] = r["model_average"]
            if "batch_norm_recomputed" in r:
                out[(DEELBO_BN, *unit)] = r["batch_norm_recomputed"]
        elif r["method"] != ORACLE:
            out[(r["method"], *unit)] = r
    return out


def oracle_best(records: list[dict]) -> dict[tuple, dict]:
    """The fixed α with the best mean test accuracy per cell (over its replicates and seeds), then
    that α's record per unit: an upper bound that reads the test set."""
    cells = {}
    for r in records:
        if r["method"] == ORACLE:
            cells.setdefault((r["task"], r["backbone"], r["n"]), []).append(r)
    out = {}
    for cell, rs in cells.items():
        by_alpha = {}
        for r in rs:
            by_alpha.setdefault(r["alpha"], []).append(r)
        best = max(by_alpha, key=lambda a: statistics.mean(x["accuracy"] for x in by_alpha[a]))
        for r in by_alpha[best]:
            out[(ORACLE, *cell, r["replicate"], r["seed"])] = r
    return out


ROWS = (PLAIN, DEELBO_MEAN, DEELBO_BMA, DEELBO_BN, HALVING, ORACLE, GRID, BO, LAPLACE, IVON)


def rows(records: list[dict], metric: str = "accuracy") -> list[dict]:
    """Per cell and row: the mean, the units, and the paired differences against plain fine-tuning
    and against DE ELBO (mean) with their intervals (replicate as the random factor)."""
    values = {**predictions(records), **oracle_best(records)}
    table = []
    for cell in all_cells():
        units = {key[4:]: None for key in values if key[1:4] == cell}
        for row in ROWS:
            own = {u: values[(row, *cell, *u)][metric] for u in units if (row, *cell, *u) in values}
            if not own:
                continue
            entry = {
                "task": cell[0],
                "backbone": cell[1],
                "n": cell[2],
                "row": row,
                "units": len(own),
                "replicates": len({u[0] for u in own}),
                "mean": statistics.mean(own.values()),
                "per_unit": {f"r{u[0]}s{u[1]}": v for u, v in sorted(own.items())},
            }
            for name, reference in (("vs_plain", PLAIN), ("vs_deelbo", DEELBO_MEAN)):
                pairs = [
                    (u[0], v - values[(reference, *cell, *u)][metric])
                    for u, v in own.items()
                    if (reference, *cell, *u) in values
                ]
                if row != reference and pairs:
                    entry[name] = harness.paired_interval(pairs)
            table.append(entry)
    return table


def markdown(table: list[dict], metric: str = "accuracy") -> str:
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = "points" if metric == "accuracy" else "nats"
    lines = [
        f"| task | backbone | N | row | units (replicates) | mean {metric} | − plain ({unit}, 95 % interval) "
        f"| − DE ELBO ({unit}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['task']} | {e['backbone']} | {e['n']} | {e['row']} | {e['units']} ({e['replicates']}) "
            f"| {e['mean']:.3f} | {harness.format_interval(e['vs_plain'], scale, 1 if scale > 1 else 3) if 'vs_plain' in e else ''} "
            f"| {harness.format_interval(e['vs_deelbo'], scale, 1 if scale > 1 else 3) if 'vs_deelbo' in e else ''} |"
        )
    return "\n".join(lines)


def parse_cells(values) -> list[tuple]:
    cells = []
    for value in values:
        t, b, n = value.split("/")
        cells.append((t, b, int(n)))
    return cells


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", type=int, choices=sorted(TIERS), default=1)
    parser.add_argument(
        "--cells",
        nargs="+",
        help="task/backbone/N, e.g. noise-40/timm-resnet/50 (default: all, in the protocol's order)",
    )
    parser.add_argument("--output-dir", default=harness.RESULTS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="Only print the tables from the records.")
    parser.add_argument("--quick", action="store_true", help="One cell, 1 replicate × 2 seeds, 16 steps per run.")
    args = parser.parse_args(argv)
    store = harness.RecordStore(os.path.join(args.output_dir, "comparison.json"), record_key)
    if not args.report:
        cells = parse_cells(args.cells) if args.cells else all_cells()
        if args.quick:
            cells, replicates, seeds = cells[:1], [0], [0, 1]
            step_counts = {cell: 16 for cell in cells}
        else:
            replicates, seeds = range(harness.protocol()["replicates"]["count"]), harness.protocol()["seeds"]
            step_counts = {cell: convergence.steps(*cell) for cell in cells}
        for backbone in sorted({b for _, b, _ in cells}):
            for replicate in replicates:
                task.backbone_path(backbone, replicate, os.path.join(args.output_dir, "pretrained"))
        harness.run(
            store,
            jobs(args.tier, cells, replicates, seeds, step_counts, args.output_dir),
            run_one,
            job_keys,
            args.workers,
            describe=lambda r: (
                f"{r['method']} {r['task']} {r['backbone']} N={r['n']} r{r['replicate']} "
                f"s{r['seed']}: acc {r['accuracy']:.3f} ({r['seconds']:.0f} s)"
            ),
        )
    print(markdown(rows(store.records)))


if __name__ == "__main__":
    main()
