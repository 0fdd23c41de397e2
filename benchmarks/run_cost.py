"""What one DE ELBO run costs against one L2-SP run of the transfer benchmark, side by side.

The transfer benchmark's compute ratio divides the grid search's wall time by DE ELBO's, each
summed over many runs; on a shared machine that ratio moves by tens of percent between benchmark
runs. This measures the quantity it rests on directly: the same training run (the transfer
benchmark's timm ResNet, N examples of digits 5–9, its optimizer and schedule) with
`L2SPTrainer` and with `DEELBoTrainer` (plus the final 10-draw training objective that
`select_learning_rate` computes), alternating in one process, one thread. The grid search costs
145 L2-SP runs (144 on 80 % of N, the retrain on all N) and DE ELBO 4 runs, so with r = DE ELBO
run / L2-SP run the grid costs about 145 / (4 r) times DE ELBO.

    python benchmarks/run_cost.py        # ≈ 2 min on 2 cores; writes benchmarks/results/run_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transfer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "run_cost.json"))
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "benchmarks", "results", "pretrained"),
                        help="Where the pretrained backbone is built once and kept.")
    args = parser.parse_args(argv)
    transfer._setup_thread()
    import transformers

    transformers.logging.set_verbosity_error()
    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, L2SPTrainer, L2SPTrainingArguments, digits

    path = transfer.pretrained_path("timm-resnet", args.cache_dir)
    train, _ = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), args.n, seed=0)
    train = transfer.tensor_dataset(train)
    init = transfer.model_init("timm-resnet", path, 0)
    common = {**transfer.training_settings(args.steps, seed=0), "learning_rate": 0.1,
              "output_dir": os.path.join(tempfile.gettempdir(), "run_cost")}

    def l2sp_run():
        L2SPTrainer(model=init(), args=L2SPTrainingArguments(**common), train_dataset=train).train()

    def deelbo_run():
        trainer = DEELBoTrainer(model=init(), args=DEELBoTrainingArguments(**common), train_dataset=train)
        trainer.train()
        trainer.training_objective()

    times = {"L2-SP run": [], "DE ELBO run": []}
    for _ in range(args.repeats):
        for name, run in (("L2-SP run", l2sp_run), ("DE ELBO run", deelbo_run)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["DE ELBO run"] / medians["L2-SP run"]
    result = {"n": args.n, "steps": args.steps, "repeats": args.repeats, "seconds": times, "median_seconds": medians,
              "run_ratio": ratio, "grid_over_deelbo": 145 / (4 * ratio)}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"median L2-SP run {medians['L2-SP run']:.2f} s, DE ELBO run {medians['DE ELBO run']:.2f} s: "
          f"r = {ratio:.2f}, grid search / DE ELBO ≈ 145 / (4 r) = {145 / (4 * ratio):.1f}×")


if __name__ == "__main__":
    sys.exit(main())
