"""What the grid search's runs cost against DE ELBO's, one run of each, side by side.

The transfer benchmark's compute ratio divides the grid search's wall time by DE ELBO's, each
summed over many runs; on a shared machine that ratio moves by tens of percent between benchmark
runs. This measures the runs it is made of directly, through the library calls the benchmark
makes, alternating in one process, one thread, on the transfer benchmark's task (a pretrained
backbone, N examples of digits 5–9, its optimizer and schedule, lr 0.1):

- a grid tuning run: `l2sp_grid_search` with a one-point grid, L2-SP on the stratified 80 % of N,
  then the validation NLL on the other 20 % (`SearchRun.seconds`);
- the grid's retrain: L2-SP on all N (`SearchResult.final_seconds` of the same call);
- a DE ELBO run: `select_learning_rate` with one learning rate, DE ELBO on all N, then the final
  10-draw training objective.

The grid search is 144 tuning runs and the retrain, DE ELBO 4 runs, so from the medians

    grid search / DE ELBO = (144 · tuning run + retrain) / (4 · DE ELBO run).

r = DE ELBO run / retrain compares the two training runs on the same N examples. The ratio
depends on N: a step's cost is not proportional to its batch, and the last batch of an epoch is
smaller in the tuning runs (80 % of N) than in the others, or larger (docs/benchmarks.md).

    python benchmarks/run_cost.py --repeats 9           # the transfer ResNet, N = 100, 200 steps (≈ 4 min on 2 cores)
    python benchmarks/run_cost.py --n 50 --repeats 9    # N = 50
    python benchmarks/run_cost.py --backbone vit --steps 600 --repeats 5   # the ViT, 600 steps (≈ 6 min)

Writes benchmarks/results/run_cost-BACKBONE-nN-STEPS-steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transfer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_RUNS, DEELBO_RUNS = 144, 4
UNITS = ("grid tuning run", "grid retrain", "DE ELBO run")


def grid_over_deelbo(medians: dict[str, float]) -> float:
    """(144 · tuning run + retrain) / (4 · DE ELBO run)."""
    grid = GRID_RUNS * medians["grid tuning run"] + medians["grid retrain"]
    return grid / (DEELBO_RUNS * medians["DE ELBO run"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="timm-resnet", choices=list(transfer.PRETRAINING_EPOCHS))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None,
                        help="Default: benchmarks/results/run_cost-BACKBONE-nN-STEPS-steps.json.")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "benchmarks", "results", "pretrained"),
                        help="Where the pretrained backbone is built once and kept.")
    args = parser.parse_args(argv)
    for name in ("n", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"run_cost-{args.backbone}-n{args.n}-{args.steps}-steps.json"
    )
    transfer._setup_thread()
    import transformers

    transformers.logging.set_verbosity_error()
    from hf_deelbo import (
        DEELBoTrainingArguments,
        L2SPTrainingArguments,
        digits,
        l2sp_grid_search,
        select_learning_rate,
    )

    path = transfer.pretrained_path(args.backbone, args.cache_dir)
    train, _ = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), args.n, seed=0)
    train = transfer.tensor_dataset(train)
    labels = [int(v) for v in train.with_format(None)["labels"]]
    init = transfer.model_init(args.backbone, path, 0)
    common = transfer.training_settings(args.steps, seed=0)
    work_dir = os.path.join(tempfile.gettempdir(), "run_cost")
    l2sp_args = L2SPTrainingArguments(output_dir=os.path.join(work_dir, "grid"), **common)
    deelbo_args = DEELBoTrainingArguments(output_dir=os.path.join(work_dir, "deelbo"), **common)

    def grid_runs() -> dict[str, float]:
        result = l2sp_grid_search(init, train, labels, l2sp_args, alphas=[1e-4], betas=[1e-4], learning_rates=[0.1])
        return {"grid tuning run": result.runs[0].seconds, "grid retrain": result.final_seconds}

    def deelbo_run() -> dict[str, float]:
        return {"DE ELBO run": select_learning_rate(init, train, deelbo_args, learning_rates=[0.1]).runs[0].seconds}

    times = {name: [] for name in UNITS}
    for repeat in range(args.repeats):
        for run in (grid_runs, deelbo_run):
            for name, seconds in run().items():
                times[name].append(seconds)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()),
              flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["DE ELBO run"] / medians["grid retrain"]
    result = {"backbone": args.backbone, "n": args.n, "steps": args.steps, "repeats": args.repeats, "seconds": times,
              "median_seconds": medians, "run_ratio": ratio, "grid_over_deelbo": grid_over_deelbo(medians)}
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.backbone}, N = {args.n}, {args.steps} steps; medians: "
          + ", ".join(f"{name} {value:.2f} s" for name, value in medians.items())
          + f"; r = DE ELBO run / retrain = {ratio:.3f}; grid search / DE ELBO = (144 · tuning run + retrain) / "
          f"(4 · DE ELBO run) = {result['grid_over_deelbo']:.1f}×")


if __name__ == "__main__":
    sys.exit(main())
