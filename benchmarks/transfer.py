"""DE ELBO against the methods it replaces, on a real transfer task that runs on 2 CPU cores.

Backbones pretrained on scikit-learn's digits 0–4 (a small timm ResNet and a small transformers
ViT, 16×16 inputs) are fine-tuned on N ∈ {50, 100, 500} images of digits 5–9, 3 seeds each, and
tested on a held-out 30 % of 5–9. Methods:

- DE ELBO (κ = D/N): 4 runs, lr ∈ {0.1, 0.01, 0.001, 0.0001}, the lowest final training
  objective wins (no validation data); once with the paper's σ₀ = 1e-4, once with
  σ₀ = √D_b/(2D), the value at which the prior's largest pull on the backbone starts at 1 as
  σ₀ = 1e-4 does on the paper's ResNet-50 (`hf_deelbo.methods.deelbo.objective.max_prior_pull`);
- ELBO (κ = 1): the same, to show the collapse toward uniform predictions when D ≫ N;
- L2-SP + grid search: α, β ∈ {1e-2, …, 1e-6, 0}, the same 4 lrs (144 runs) on 80 % of N,
  the lowest validation NLL wins, retrained on all N;
- TPGM (L2 balls, radii updated every 10 steps) and T1–T2 (one α and one β, starting at 1e-3,
  a hyper-step every 10 steps): they learn on a stratified 20 % of N held out of training, so
  each runs the 4 lrs on the other 80 % and the lowest final validation NLL wins (no retrain:
  the regularization was learned against that split).

Every run uses SGD with Nesterov momentum 0.9, a cosine schedule, batch 32, gradient clipping at
1.0 and the same number of steps (200 by default). Compute is the wall time of the whole
procedure (all its runs), measured in the same process, one thread per process.

    python -m benchmarks.transfer              # the full benchmark (≈ 2.5 h on 2 cores), updates docs/benchmarks/protocol-v1.md
    python -m benchmarks.transfer --steps 40 --output-dir benchmarks/results/transfer-40-steps \
        --docs benchmarks/results/transfer-40-steps/summary.md   # the short schedule (≈ 30 min)
    python -m benchmarks.transfer --seeds 0    # one seed first; then --seeds 1 2 --resume adds the others
    python -m benchmarks.transfer --methods TPGM T1–T2 --resume   # add methods to the records already there
    python -m benchmarks.transfer --methods "DE ELBO" --resume --redo   # run one method again (after a code change)
    python -m benchmarks.transfer --quick --output-dir /tmp/transfer-quick   # a smoke run (CI)

Results: benchmarks/results/transfer.json (every run), the table and figure in docs/benchmarks/protocol-v1.md.
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

from benchmarks._common import V1_DOCS, add_cell_flags, add_switches, save_figure, update_section
from benchmarks.task import (  # noqa: F401 - the task, as the earlier scripts import it from here
    IMAGE_SIZE,
    PRETRAINING_EPOCHS,
    evaluate,
    model_init,
    new_model,
    pixel_dataset,
    pretrained_path,
    pretraining,
    setup_worker,
    tensor_dataset,
    training_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = ("<!-- transfer:start -->", "<!-- transfer:end -->")


_setup_thread = setup_worker  # the name the v1 scripts call it by


def run_combo(task) -> dict:
    """One (backbone, N, seed): the three methods, each timed as a whole."""
    _setup_thread()
    from hf_deelbo import (
        DEELBoTrainingArguments,
        L2SPTrainingArguments,
        digits,
        l2sp_grid_search,
        select_learning_rate,
    )

    backbone, n, seed, settings, path, work_dir = task
    methods = settings.get("methods", METHODS)
    train, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), n, seed=seed)
    train, test = tensor_dataset(train), tensor_dataset(test)
    labels = [int(v) for v in train.with_format(None)["labels"]]
    common = training_settings(settings["steps"], seed)
    init = model_init(backbone, path, seed)
    record = {"backbone": backbone, "n": n, "seed": seed}
    for name, kappa in (("DE ELBO", None), ("ELBO (κ=1)", 1.0), (SCALED_SIGMA, None)):
        if name not in methods:
            continue
        extra = {"sigma_init": scaled_sigma_init(init())} if name == SCALED_SIGMA else {}
        args = DEELBoTrainingArguments(output_dir=os.path.join(work_dir, name), kappa=kappa, **extra, **common)
        start = time.perf_counter()
        result = select_learning_rate(init, train, args, learning_rates=settings["learning_rates"])
        seconds = time.perf_counter() - start
        learned = result.trainer.learned_hyperparameters()
        record[name] = {
            **evaluate(result.trainer, test),
            "seconds": seconds,
            "learning_rate": result.best["learning_rate"],
            "lambda": learned["lambda"],
            "tau": learned["tau"],
            "sigma": learned["sigma"],
            "kappa": learned["kappa"],
            "alpha_eff": learned["alpha_eff"],
            "beta_eff": learned["beta_eff"],
            "runs": [
                {
                    "learning_rate": r.settings["learning_rate"],
                    "objective": r.score,
                    "seconds": r.seconds,
                    "sigma": r.learned["sigma"],
                    "lambda": r.learned["lambda"],
                    "tau": r.learned["tau"],
                }
                for r in result.runs
            ],
        }
    for name in ("TPGM", "T1–T2"):
        if name in methods:
            record[name] = run_validation_method(
                name, init, train, test, common, settings["learning_rates"], os.path.join(work_dir, name)
            )
    if GRID not in methods:
        return record
    args = L2SPTrainingArguments(output_dir=os.path.join(work_dir, "grid"), **common)
    start = time.perf_counter()
    result = l2sp_grid_search(
        init,
        train,
        labels,
        args,
        alphas=settings["strengths"],
        betas=settings["strengths"],
        learning_rates=settings["learning_rates"],
    )
    seconds = time.perf_counter() - start
    record[GRID] = {
        **evaluate(result.trainer, test),
        "seconds": seconds,
        **result.best,
        "num_runs": len(result.runs) + 1,
        "runs": [{**r.settings, "validation_nll": r.score, "seconds": r.seconds} for r in result.runs],
    }
    return record


def scaled_sigma_init(model) -> float:
    """σ₀ = √D_b / (2D): the prior's largest pull on the backbone starts at 1 (`max_prior_pull`),
    as σ₀ = 1e-4 does on the paper's ResNet-50."""
    from hf_deelbo.core.groups import split_parameters
    from hf_deelbo.methods.deelbo.objective import sigma_for_prior_pull

    groups = split_parameters(model, None)
    parameters = dict(model.named_parameters())
    num_backbone = sum(parameters[n].numel() for n in groups.backbone)
    num_params = num_backbone + sum(parameters[n].numel() for n in groups.head)
    return sigma_for_prior_pull(1.0, num_backbone, kappa=num_params, num_train_examples=1)


def run_validation_method(name, init, train, test, common, learning_rates, work_dir) -> dict:
    """TPGM or T1–T2: one run per learning rate on 80 % of N (the other 20 % is their validation
    data), the lowest final validation NLL wins (`select_learning_rate_by_validation`)."""
    from hf_deelbo import T1T2Trainer, T1T2TrainingArguments, TPGMTrainer, TPGMTrainingArguments
    from hf_deelbo.search import select_learning_rate_by_validation

    args_class, trainer_class = (
        (TPGMTrainingArguments, TPGMTrainer) if name == "TPGM" else (T1T2TrainingArguments, T1T2Trainer)
    )
    start = time.perf_counter()
    args = args_class(output_dir=work_dir, validation_fraction=0.2, **common)
    result = select_learning_rate_by_validation(trainer_class, init, train, args, learning_rates)
    seconds = time.perf_counter() - start
    runs = [
        {
            "learning_rate": run.settings["learning_rate"],
            "validation_nll": run.score,
            "seconds": run.seconds,
            "train_seconds": run.metrics.get("train_runtime", float("nan")),
            "hyper_seconds": run.metrics.get("hyper_seconds", float("nan")),
        }
        for run in result.runs
    ]
    trainer = result.trainer
    entry = trainer.config_entry()
    result = {
        **evaluate(trainer, test),
        "seconds": seconds,
        "learning_rate": result.best["learning_rate"],
        "runs": runs,
    }
    if name == "TPGM":
        radii = list((entry["radii"] or {}).values())
        result["median_radius"] = statistics.median(radii) if radii else float("nan")
    else:
        result["alpha"], result["beta"] = entry["alpha"], entry["beta"]
    return result


SCALED_SIGMA = "DE ELBO, σ₀ = √D_b/(2D)"
GRID = "L2-SP grid search"
METHODS = ("DE ELBO", "ELBO (κ=1)", GRID, "TPGM", "T1–T2", SCALED_SIGMA)


def _hyper_share(values: list[dict]) -> float:
    """The share of training time spent on the method's own work (validation passes, projections)."""
    runs = [r for v in values for r in v["runs"] if math.isfinite(r.get("train_seconds", float("nan")))]
    return sum(r["hyper_seconds"] for r in runs) / sum(r["train_seconds"] for r in runs) if runs else float("nan")


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["backbone"], r["n"]) for r in records})
    for backbone, n in keys:
        group = [r for r in records if r["backbone"] == backbone and r["n"] == n]
        for method in METHODS:
            values = [r[method] for r in group if method in r]
            if not values:
                continue

            def mean(key, values=values):
                return statistics.mean(v[key] for v in values)

            def std(key, values=values):
                return statistics.stdev([v[key] for v in values]) if len(values) > 1 else 0.0

            row = {
                "backbone": backbone,
                "n": n,
                "method": method,
                "seeds": len(values),
                "accuracy": mean("accuracy"),
                "accuracy_std": std("accuracy"),
                "nll": mean("nll"),
                "ece": mean("ece"),
                "seconds": mean("seconds"),
            }
            if method in ("DE ELBO", "ELBO (κ=1)", SCALED_SIGMA):
                row.update(lam=mean("lambda"), tau=mean("tau"), alpha_eff=mean("alpha_eff"))
            elif method == "TPGM":
                row.update(
                    median_radius=statistics.median(v["median_radius"] for v in values),
                    hyper_share=_hyper_share(values),
                )
            else:
                row.update(
                    alpha=statistics.median(v["alpha"] for v in values),
                    beta=statistics.median(v["beta"] for v in values),
                )
                if method == "T1–T2":
                    row["hyper_share"] = _hyper_share(values)
            # Against the grid search on the seeds both have, so that rows with fewer seeds are not
            # compared with a mean over other seeds.
            paired = [r for r in group if method in r and GRID in r]
            if method != GRID and paired:
                row.update(
                    paired_seeds=len(paired),
                    accuracy_vs_grid=statistics.mean(r[method]["accuracy"] - r[GRID]["accuracy"] for r in paired),
                    compute_vs_grid=sum(r[GRID]["seconds"] for r in paired)
                    / sum(r[method]["seconds"] for r in paired),
                )
            rows.append(row)
    return rows


def markdown(rows: list[dict], settings: dict, machine_seconds: float, figure_link: str = "transfer.png") -> str:
    """The docs section; `figure_link` is the figure's path relative to the markdown file."""
    lines = [
        SECTION[0],
        "## Transfer: DE ELBO versus L2-SP grid search (`benchmarks/transfer.py`)",
        "",
        f"Digits 0–4 → 5–9, {IMAGE_SIZE}×{IMAGE_SIZE} inputs, {settings['steps']} SGD steps per run, batch 32, "
        f"{_seeds_text(rows)}; test set: 30 % of digits 5–9. Compute is the wall time of the whole "
        f"procedure (DE ELBO and ELBO: {len(settings['learning_rates'])} learning rates; grid search: "
        f"{len(settings['strengths']) ** 2 * len(settings['learning_rates'])} runs + the retrain), one thread per "
        f"process. Total benchmark time: {machine_seconds / 60:.0f} min. Mean over seeds (± std for accuracy; "
        "0 with one seed).",
        "",
        *pretraining_lines(settings),
        "| backbone | N | method | test accuracy | test NLL | ECE | compute (s) | learned λ, τ / chosen α, β | α_eff = 1/(Dλ) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mixed_seeds = len({r["seeds"] for r in rows}) > 1
    for row in rows:
        if row["method"] == GRID:
            hyper, alpha = f"α = {row['alpha']:g}, β = {row['beta']:g}", ""
        elif row["method"] == "T1–T2":
            hyper, alpha = f"learned α = {row['alpha']:.3g}, β = {row['beta']:.3g}", ""
        elif row["method"] == "TPGM":
            hyper, alpha = f"median radius {row['median_radius']:.3g}", ""
        else:
            hyper, alpha = f"λ = {row['lam']:.3g}, τ = {row['tau']:.3g}", f"{row['alpha_eff']:.3g}"
        seeds = f" ({row['seeds']} seeds)" if mixed_seeds else ""
        lines.append(
            f"| {row['backbone']} | {row['n']} | {row['method']} | {row['accuracy']:.3f} ± {row['accuracy_std']:.3f}{seeds} "
            f"| {row['nll']:.3f} | {row['ece']:.3f} | {row['seconds']:.0f} | {hyper} | {alpha} |"
        )
    lines.append("")
    ratios = []
    for backbone, n in sorted({(r["backbone"], r["n"]) for r in rows}):
        by = {r["method"]: r for r in rows if r["backbone"] == backbone and r["n"] == n}
        for method in ("DE ELBO", SCALED_SIGMA, "TPGM", "T1–T2"):
            row = by.get(method)
            if row is not None and "paired_seeds" in row:
                seeds = f" ({row['paired_seeds']} seeds)" if mixed_seeds else ""
                ratios.append(
                    f"| {backbone} | {n} | {method} | {row['accuracy_vs_grid']:+.3f}{seeds} "
                    f"| {row['compute_vs_grid']:.1f}× |"
                )
    lines += [
        "Against the grid search, on the seeds both were run with (mean accuracy difference; the grid's "
        "total compute over the method's):",
        "",
        "| backbone | N | method | accuracy − grid search's | grid search compute / method's compute |",
        "|---|---|---|---|---|",
        *ratios,
        "",
    ]
    shares = [
        f"| {r['backbone']} | {r['n']} | {r['method']} | {100 * r['hyper_share']:.0f} % |"
        for r in rows
        if "hyper_share" in r
    ]
    if shares:
        lines += [
            "Overhead of TPGM and T1–T2: the share of their training time spent on their own work (validation "
            "batches, radius or strength updates, projections), as the trainers report it (`hyper_seconds`).",
            "",
            "| backbone | N | method | share of training time |",
            "|---|---|---|---|",
            *shares,
            "",
        ]
    lines += [f"![accuracy versus compute]({figure_link})", "", SECTION[1]]
    return "\n".join(lines)


def _seeds_text(rows: list[dict]) -> str:
    counts = sorted({r["seeds"] for r in rows})
    if len(counts) == 1:
        return f"{counts[0]} seed(s)"
    return f"{counts[0]} to {counts[-1]} seeds (the count is beside each row's accuracy)"


def pretraining_lines(settings: dict) -> list[str]:
    if not settings.get("pretraining"):  # results from before the pretraining was recorded
        return []
    return [
        "Backbones, pretrained on digits 0–4: "
        + "; ".join(
            f"{b}: {p['epochs']} epochs, source test accuracy {p['source_test_accuracy']:.3f}"
            for b, p in sorted(settings["pretraining"].items())
        )
        + ".",
        "",
    ]


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    markers = {"DE ELBO": "o", "ELBO (κ=1)": "x", GRID: "s", "TPGM": "^", "T1–T2": "v", SCALED_SIGMA: "D"}
    for ax, backbone in zip(axes[0], backbones, strict=False):
        for method in METHODS:
            points = sorted(
                (r["n"], r["seconds"], r["accuracy"])
                for r in rows
                if r["backbone"] == backbone and r["method"] == method
            )
            if points:
                ax.plot([p[1] for p in points], [p[2] for p in points], marker=markers[method], label=method)
                for n, seconds, accuracy in points:
                    ax.annotate(f"N={n}", (seconds, accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("compute (wall seconds, log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(backbone)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _figure_link(docs_path: str, output_dir: str) -> str:
    return os.path.relpath(os.path.join(output_dir, "transfer.png"), os.path.dirname(os.path.abspath(docs_path)))


SWITCHES = {
    "--replot": "Only rebuild the figure, the docs section and the stored summary from OUTPUT_DIR/transfer.json.",
    "--resume": "Keep the records already in OUTPUT_DIR/transfer.json and run only the missing tasks.",
    "--redo": "With --resume: run the methods named by --methods again, replacing their records.",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_flags(
        parser,
        os.path.join(ROOT, "benchmarks", "results"),
        "A small smoke run: 1 backbone, N=50, 1 seed, a 2×2×2 grid.",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_switches(parser, SWITCHES)
    args = parser.parse_args(argv)
    if args.redo and not args.resume:
        parser.error("--redo replaces records of an earlier run: use it with --resume")
    if args.quick:
        settings = {
            "steps": 5,
            "learning_rates": [0.1, 0.01],
            "strengths": [1e-3, 0.0],
            "ns": [50],
            "seeds": [0],
            "backbones": ["timm-resnet"],
        }
    else:
        settings = {
            "steps": args.steps,
            "learning_rates": [0.1, 0.01, 0.001, 0.0001],
            "strengths": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0],
            "ns": args.ns,
            "seeds": args.seeds,
            "backbones": args.backbones,
            "methods": args.methods,
        }
    os.makedirs(args.output_dir, exist_ok=True)
    if args.replot:
        results_path = os.path.join(args.output_dir, "transfer.json")
        saved = json.load(open(results_path))
        rows = summarize(saved["records"])
        figure(rows, os.path.join(args.output_dir, "transfer.png"))
        saved["summary"] = rows  # the stored summary follows the code that summarizes
        with open(results_path, "w") as f:
            json.dump(saved, f, indent=1)
        docs_path = args.docs or V1_DOCS
        update_section(
            docs_path,
            SECTION,
            markdown(rows, saved["settings"], saved.get("seconds", 0.0), _figure_link(docs_path, args.output_dir)),
        )
        return
    docs_path = args.docs or (os.path.join(args.output_dir, "benchmarks.md") if args.quick else V1_DOCS)
    cache_dir = os.path.join(args.output_dir, "pretrained")
    _setup_thread()
    paths = {b: pretrained_path(b, cache_dir) for b in settings["backbones"]}
    settings["pretraining"] = {b: pretraining(p) for b, p in paths.items()}
    work_dir = os.path.join(args.output_dir, "runs")
    tasks = [
        (b, n, s, settings, paths[b], os.path.join(work_dir, f"{b}-{n}-{s}"))
        for b, n, s in itertools.product(settings["backbones"], settings["ns"], settings["seeds"])
    ]
    # Largest first, so the two workers finish together.
    tasks.sort(key=lambda t: -t[1])
    results_path = os.path.join(args.output_dir, "transfer.json")
    records, start = [], time.perf_counter()
    if args.resume and os.path.exists(results_path):
        previous = json.load(open(results_path))
        if previous["settings"]["steps"] != settings["steps"]:
            raise SystemExit(f"--resume: {results_path} was made with {previous['settings']['steps']} steps per run")
        records = previous["records"]
        settings["pretraining"] = {**previous["settings"].get("pretraining", {}), **settings["pretraining"]}
        start -= previous.get("seconds", 0.0)
        done = {(r["backbone"], r["n"], r["seed"]): r for r in records}
        remaining = []
        for task in tasks:  # run the methods a task's record lacks (with --redo: every method asked for)
            record = done.get(task[:3], {})
            missing = [m for m in settings.get("methods", METHODS) if args.redo or m not in record]
            if missing:
                remaining.append((*task[:3], {**settings, "methods": missing}, *task[4:]))
        tasks = remaining
        settings["seeds"] = sorted(set(settings["seeds"]) | {r["seed"] for r in records})
        settings["ns"] = sorted(set(settings["ns"]) | {r["n"] for r in records})
        settings["backbones"] = sorted(set(settings["backbones"]) | {r["backbone"] for r in records})
        settings["methods"] = [m for m in METHODS if any(m in r for r in records) or m in settings.get("methods", ())]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for record in pool.imap_unordered(run_combo, tasks):
            earlier = next(
                (
                    r
                    for r in records
                    if (r["backbone"], r["n"], r["seed"]) == (record["backbone"], record["n"], record["seed"])
                ),
                None,
            )
            if earlier is not None:
                earlier.update(record)
                record = earlier
            else:
                records.append(record)
            summary = {m: round(record[m]["accuracy"], 3) for m in METHODS if m in record}
            print(f"{record['backbone']} N={record['n']} seed={record['seed']}: {summary}", flush=True)
            with open(results_path, "w") as f:  # written after every task: partial results survive
                json.dump(
                    {"settings": settings, "seconds": time.perf_counter() - start, "records": records}, f, indent=1
                )
    elapsed = time.perf_counter() - start
    rows = summarize(records)
    figure(rows, os.path.join(args.output_dir, "transfer.png"))
    with open(results_path, "w") as f:
        json.dump({"settings": settings, "seconds": elapsed, "summary": rows, "records": records}, f, indent=1)
    section = markdown(rows, settings, elapsed, _figure_link(docs_path, args.output_dir))
    update_section(docs_path, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
