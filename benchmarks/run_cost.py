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
smaller in the tuning runs (80 % of N) than in the others, or larger (docs/benchmarks/protocol-v1.md). Where
a step costs the same whatever its batch, the grid search costs at most 145/4 = 36.25 DE ELBO
searches (when DE ELBO's runs cost no more than L2-SP's); where the cost is proportional to the
examples a run processes (activations dominate), at most `ceiling_per_example`, which the script
also reports: 29.05× at N = 50 with batches of 32, whose tuning runs process 4000 examples in 200
steps against 5000.

    python -m benchmarks.run_cost --repeats 9           # the transfer ResNet, N = 100, 200 steps (≈ 4 min on 2 cores)
    python -m benchmarks.run_cost --n 50 --repeats 9    # N = 50
    python -m benchmarks.run_cost --backbone vit --steps 600 --repeats 5   # the ViT, 600 steps (≈ 6 min)
    python -m benchmarks.run_cost --n 50 --image-size 32 --repeats 9      # 4× the activations per example

Writes benchmarks/results/run_cost-BACKBONE[-SIZEpx]-nN-STEPS-steps.json (SIZE when not the default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from benchmarks import transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_RUNS, DEELBO_RUNS = 144, 4
UNITS = ("grid tuning run", "grid retrain", "DE ELBO run")


def grid_over_deelbo(medians: dict[str, float]) -> float:
    """(144 · tuning run + retrain) / (4 · DE ELBO run)."""
    grid = GRID_RUNS * medians["grid tuning run"] + medians["grid retrain"]
    return grid / (DEELBO_RUNS * medians["DE ELBO run"])


def examples_seen(num_examples: int, batch_size: int, steps: int) -> int:
    """Examples a run of `steps` optimizer steps processes, in epochs of full batches and one
    smaller last batch (Trainer's default, no `dataloader_drop_last`)."""
    batches = [min(batch_size, num_examples - start) for start in range(0, num_examples, batch_size)]
    epochs, rest = divmod(steps, len(batches))
    return epochs * num_examples + sum(batches[:rest])


def ceiling_per_example(tuning_examples: int, all_examples: int, batch_size: int, steps: int) -> float:
    """The ratio if a run's cost were proportional to the examples it processes and a DE ELBO run
    cost what an L2-SP run on the same examples costs: the limit where activations dominate."""
    tuning, full = (examples_seen(n, batch_size, steps) for n in (tuning_examples, all_examples))
    return (GRID_RUNS * tuning + full) / (DEELBO_RUNS * full)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="timm-resnet", choices=list(transfer.PRETRAINING_EPOCHS))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--image-size",
        type=int,
        default=transfer.IMAGE_SIZE,
        help="Side of the input images (default: the transfer benchmark's). Larger images give "
        "each example more activations and leave the weights as they are (ResNet only: the "
        "ViT's position embeddings are sized for the default).",
    )
    parser.add_argument(
        "--output", default=None, help="Default: benchmarks/results/run_cost-BACKBONE[-SIZEpx]-nN-STEPS-steps.json."
    )
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(ROOT, "benchmarks", "results", "pretrained"),
        help="Where the pretrained backbone is built once and kept.",
    )
    args = parser.parse_args(argv)
    for name in ("n", "steps", "repeats", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.image_size != transfer.IMAGE_SIZE and args.backbone != "timm-resnet":
        parser.error(
            f"--image-size {args.image_size} needs --backbone timm-resnet: the {args.backbone}'s position "
            f"embeddings are sized for {transfer.IMAGE_SIZE}×{transfer.IMAGE_SIZE} inputs"
        )
    size = "" if args.image_size == transfer.IMAGE_SIZE else f"-{args.image_size}px"
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"run_cost-{args.backbone}{size}-n{args.n}-{args.steps}-steps.json"
    )
    transfer._setup_thread()
    from hf_deelbo import (
        DEELBoTrainingArguments,
        L2SPTrainingArguments,
        digits,
        l2sp_grid_search,
        select_learning_rate,
    )
    from hf_deelbo.core.validation import stratified_split

    path = transfer.pretrained_path(args.backbone, args.cache_dir)
    train, _ = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), args.n, seed=0)
    train = transfer.tensor_dataset(train, args.image_size)
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
        print(
            f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()),
            flush=True,
        )
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["DE ELBO run"] / medians["grid retrain"]
    tuning_examples = len(stratified_split(labels, 0.2, l2sp_args.seed)[0])
    ceiling = ceiling_per_example(tuning_examples, args.n, l2sp_args.per_device_train_batch_size, args.steps)
    result = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "n": args.n,
        "steps": args.steps,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": medians,
        "run_ratio": ratio,
        "grid_over_deelbo": grid_over_deelbo(medians),
        "tuning_examples": tuning_examples,
        "ceiling_per_example": ceiling,
    }
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{args.backbone}, {args.image_size}×{args.image_size} inputs, N = {args.n}, {args.steps} steps; medians: "
        + ", ".join(f"{name} {value:.2f} s" for name, value in medians.items())
        + f"; r = DE ELBO run / retrain = {ratio:.3f}; grid search / DE ELBO = (144 · tuning run + retrain) / "
        f"(4 · DE ELBO run) = {result['grid_over_deelbo']:.1f}×; at equal cost per example processed it would be "
        f"{ceiling:.1f}× (tuning runs on {tuning_examples} examples)"
    )


if __name__ == "__main__":
    sys.exit(main())
