"""Protocol v2's steps per (task, backbone, N), from its convergence rule on the calibration draw.

Plain fine-tuning and DE ELBO (lr 0.1, replicate 0, training set drawn with the calibration seed)
are trained for each candidate S and for the longest; S converges when the next longer run's
final value moves by less than 2 %: plain's final training loss, DE ELBO's final training
objective and its σ. A cell's steps are the smallest S where both converge (benchmarks/protocol_v2.json).

    python -m benchmarks.convergence                 # every cell (≈ 45 min on 2 cores)
    python -m benchmarks.convergence --quick --output-dir /tmp/convergence   # a smoke run

Results: benchmarks/results/v2/convergence.json; `steps(task, backbone, n)` reads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

from benchmarks import harness, task

CALIBRATION_SEED = 100
LEARNING_RATE = 0.1
TOLERANCE = 0.02
PLAIN, DEELBO = "plain", "DE ELBO"
CELLS = [(t, b, n) for t in ("noise-40", "digits") for b in ("timm-resnet", "vit") for n in (50, 100, 500)]


def record_key(record: dict) -> tuple:
    return (record["task"], record["backbone"], record["n"], record["method"], record["steps"])


def jobs(cells, step_counts, output_dir: str) -> list[tuple]:
    return [
        (t, b, n, method, steps, output_dir)
        for (t, b, n), method, steps in itertools.product(cells, (PLAIN, DEELBO), step_counts)
    ]


def run_one(job) -> list[dict]:
    task.setup_worker()
    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, L2SPTrainer, L2SPTrainingArguments

    task_name, backbone, n, method, steps, output_dir = job
    path = task.backbone_path(backbone, 0, os.path.join(output_dir, "pretrained"))
    train, _ = task.training_data(task_name, n, CALIBRATION_SEED)
    settings = {
        **task.training_settings(steps, CALIBRATION_SEED),
        "learning_rate": LEARNING_RATE,
        "output_dir": os.path.join(output_dir, "runs", f"convergence-{task_name}-{backbone}-{n}-{method}-{steps}"),
    }
    model = task.model_init(backbone, path, CALIBRATION_SEED)()
    start = time.perf_counter()
    record = {
        "task": task_name,
        "backbone": backbone,
        "n": n,
        "method": method,
        "steps": steps,
        "backbone_sha256": task.pretraining(path)["weights_sha256"],
        **harness.provenance(),
    }
    if method == PLAIN:
        trainer = L2SPTrainer(
            model=model, args=L2SPTrainingArguments(alpha=0.0, beta=0.0, **settings), train_dataset=train
        )
        trainer.train()
        record["training_loss"] = trainer.evaluate(train)["eval_loss"]
    else:
        trainer = DEELBoTrainer(model=model, args=DEELBoTrainingArguments(**settings), train_dataset=train)
        trainer.train()
        record["objective"] = trainer.training_objective(train, num_samples=10)
        record["sigma"] = trainer.learned_hyperparameters()["sigma"]
    record["seconds"] = time.perf_counter() - start
    return [record]


def _moved(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def cell_steps(records: list[dict], cell: tuple, candidates, longest: int) -> dict:
    """The rule on one cell: {"steps": S, "converged": bool, "changes": {method: {S: relative change}}}."""
    values = {(r["method"], r["steps"]): r for r in records if (r["task"], r["backbone"], r["n"]) == cell}
    ladder = [*candidates, longest]
    changes, passed = {}, {}
    for method, fields in ((PLAIN, ("training_loss",)), (DEELBO, ("objective", "sigma"))):
        changes[method] = {}
        for short, long in zip(ladder, ladder[1:], strict=False):
            if (method, short) not in values or (method, long) not in values:
                continue
            moved = max(_moved(values[(method, short)][f], values[(method, long)][f]) for f in fields)
            changes[method][short] = moved
            passed.setdefault(method, [])
            if moved < TOLERANCE:
                passed[method].append(short)
    both = [s for s in candidates if all(s in passed.get(m, []) for m in (PLAIN, DEELBO))]
    complete = all(len(changes[m]) == len(candidates) for m in changes)
    if both:
        return {"steps": min(both), "converged": True, "changes": changes, "complete": complete}
    return {"steps": max(candidates), "converged": False, "changes": changes, "complete": complete}


def results_path(output_dir: str) -> str:
    return os.path.join(output_dir, "convergence.json")


def steps(task_name: str, backbone: str, n: int, output_dir: str = harness.RESULTS) -> int:
    """The steps protocol v2 trains (task, backbone, N) for, from the committed calibration runs."""
    rule = harness.protocol()["steps"]
    store = harness.RecordStore(results_path(output_dir), record_key)
    result = cell_steps(store.records, (task_name, backbone, n), rule["candidates"], rule["longest"])
    if not result["complete"]:
        raise RuntimeError(
            f"the convergence runs of {(task_name, backbone, n)} are not all in "
            f"{results_path(output_dir)}: run python -m benchmarks.convergence first"
        )
    return result["steps"]


def rows(records: list[dict], candidates, longest: int) -> list[dict]:
    return [
        {"task": t, "backbone": b, "n": n, **cell_steps(records, (t, b, n), candidates, longest)}
        for t, b, n in CELLS
        if any((r["task"], r["backbone"], r["n"]) == (t, b, n) for r in records)
    ]


def markdown(table: list[dict]) -> str:
    lines = [
        "| task | backbone | N | steps | plain: change at 250 / 500 / 1000 / 2000 | "
        "DE ELBO: change at 250 / 500 / 1000 / 2000 |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        cells = [
            " / ".join(f"{100 * row['changes'][m].get(s, float('nan')):.1f} %" for s in sorted(row["changes"][m]))
            for m in (PLAIN, DEELBO)
        ]
        mark = "" if row["converged"] else " (not converged by the rule)"
        lines.append(
            f"| {row['task']} | {row['backbone']} | {row['n']} | {row['steps']}{mark} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=harness.RESULTS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="One cell, candidates 2 and 4 steps, longest 8.")
    args = parser.parse_args(argv)
    rule = harness.protocol()["steps"]
    candidates, longest, cells = rule["candidates"], rule["longest"], CELLS
    if args.quick:
        candidates, longest, cells = [2, 4], 8, [("noise-40", "timm-resnet", 50)]
    # The backbones first, in the main process: the workers then only read them.
    for backbone in sorted({b for _, b, _ in cells}):
        task.backbone_path(backbone, 0, os.path.join(args.output_dir, "pretrained"))
    store = harness.RecordStore(results_path(args.output_dir), record_key)
    harness.run(
        store,
        jobs(cells, [*candidates, longest], args.output_dir),
        run_one,
        lambda job: [job[:5]],
        args.workers,
        describe=lambda r: (
            f"{r['task']} {r['backbone']} N={r['n']} {r['method']} {r['steps']} steps ({r['seconds']:.0f} s)"
        ),
    )
    print(markdown(rows(store.records, candidates, longest)))
    with open(os.path.join(args.output_dir, "convergence.md"), "w") as f:
        f.write(markdown(rows(store.records, candidates, longest)) + "\n")
    print(json.dumps({"records": len(store.records)}))


if __name__ == "__main__":
    main()
