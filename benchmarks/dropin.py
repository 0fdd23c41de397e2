"""The drop-in matrix: `DEELBoTrainer` against a plain `transformers.Trainer` with identical arguments.

A user who swaps `Trainer` for `DEELBoTrainer` keeps their own `TrainingArguments`. This benchmark
runs both trainers with the same arguments, model, data and seed, for the optimizers users have:

- AdamW, lr 5e-5, linear schedule (transformers' defaults);
- AdamW, lr 1e-3, linear schedule (a typical fine-tuning lr);
- SGD-Nesterov 0.9, lr 0.1, cosine (the paper's recipe);
- SGD-Nesterov 0.9, lr 0.01, cosine;
- SGD without momentum, lr 0.1, cosine: the same effective learning rate η/(1−m) = 0.1 as the row
  above (Li et al. 2020, "Rethinking the hyperparameters for fine-tuning", ICLR).

Every run: `max_grad_norm` 1.0 (transformers' default), weight decay 0, batch 32, 200 steps, on
the backbones of `transfer.py` (a timm ResNet, here as `TimmWrapperForImageClassification` so that
the plain run is a real `Trainer`, and a transformers ViT; 16×16 inputs) pretrained on digits 0–4,
fine-tuned on N ∈ {50, 100, 500} images of 5–9, 3 seeds, tested on the held-out 30 % of 5–9.
DEELBoTrainer runs at its defaults (κ = D/N, σ₀ = 1e-4, `sigma_learning_rate` 1.0).

`--calibrate` is the measurement behind `sigma_learning_rate`'s default (N = 100, seed 10: another
training subset, test split and head initialisation, both backbones; its test split is another draw
of the images the matrix tests on, so the two overlap): DE ELBO under the four main optimizers for each candidate ρ learning rate, against
plain fine-tuning. The default is the candidate with the smallest worst-case accuracy gap to plain
fine-tuning over backbones and optimizers. `--calibrate sigma_momentum` is the second measurement,
made the same way and with the same rule over all five optimizers: ρ's own Nesterov momentum under
SGD (`sigma_momentum`) with ρ learning rates 1, 3 and 10, against the defaults of the first.

    python -m benchmarks.dropin --calibrate     # ≈ 15 min on 2 cores: benchmarks/results/dropin-calibration.json
    python -m benchmarks.dropin --calibrate sigma_momentum   # ≈ 20 min: dropin-calibration-sigma_momentum.json
    python -m benchmarks.dropin                 # the matrix (≈ 40 min on 2 cores): results/dropin.json, docs
    python -m benchmarks.dropin --summarize     # the figure, summary and docs from the records so far
    python -m benchmarks.dropin --quick --output-dir /tmp/dropin-quick   # a smoke run (CI)
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

import torch

from benchmarks import task, transfer
from benchmarks._common import V1_DOCS, add_cell_flags, save_figure, update_section

ROOT = transfer.ROOT
SECTION = ("<!-- dropin:start -->", "<!-- dropin:end -->")
PLAIN, DEELBO = "Trainer", "DEELBoTrainer"

# name -> the TrainingArguments that differ between optimizers.
SGD_NESTEROV = dict(optim="sgd", optim_args="momentum=0.9,nesterov=True", lr_scheduler_type="cosine")
OPTIMIZERS = {
    "AdamW 5e-5 linear": dict(optim="adamw_torch", learning_rate=5e-5, lr_scheduler_type="linear"),
    "AdamW 1e-3 linear": dict(optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="linear"),
    "SGD-Nesterov 0.1 cosine": dict(SGD_NESTEROV, learning_rate=0.1),
    "SGD-Nesterov 0.01 cosine": dict(SGD_NESTEROV, learning_rate=0.01),
    "SGD momentum 0, 0.1 cosine": dict(optim="sgd", learning_rate=0.1, lr_scheduler_type="cosine"),
}
# Each calibration: the optimizers it runs, and its candidates (name -> DEELBoTrainingArguments
# overrides) in the order that breaks ties: the later (faster-adapting) one wins.
# sigma_learning_rate=None trains ρ at the weights' learning rate.
CALIBRATIONS = {
    "sigma_learning_rate": (
        list(OPTIMIZERS)[:4],
        {f"sigma_lr={lr}": {"sigma_learning_rate": lr} for lr in (None, 0.01, 0.03, 0.1, 0.3, 1.0)},
    ),
    "sigma_momentum": (
        list(OPTIMIZERS),
        {
            "sigma_lr=1.0": {"sigma_learning_rate": 1.0, "sigma_momentum": None},
            **{
                f"sigma_lr={lr} sigma_momentum=0.9": {"sigma_learning_rate": lr, "sigma_momentum": 0.9}
                for lr in (1.0, 3.0, 10.0)
            },
        },
    ),
}
# What the matrix runs: DEELBoTrainingArguments' default (the `--calibrate` choice).
DEFAULT = "default"


def common_arguments(steps: int, seed: int) -> dict:
    return dict(
        max_steps=steps,
        seed=seed,
        max_grad_norm=1.0,
        weight_decay=0.0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        **task.BATCHES,
        **task.QUIET_ON_CPU,
    )


def wrapped_timm(model):
    """A raw timm model as `TimmWrapperForImageClassification` with the same weights, so a plain
    `Trainer` can train it (its forward takes `labels` and returns the loss)."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture=model.default_cfg["architecture"], num_labels=model.num_classes)
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(model.state_dict())
    return wrapper


def metrics_of(trainer, test) -> dict:
    from hf_deelbo import digits

    output = trainer.predict(test)
    return digits.classification_metrics(torch.tensor(output.predictions), torch.tensor(output.label_ids))


def run_pair(init, train, test, arguments: dict, output_dir: str, candidates=None, plain=True) -> dict:
    """Plain `Trainer` and `DEELBoTrainer` with the same arguments: at its defaults, or once per
    candidate (name -> DEELBoTrainingArguments overrides)."""
    from transformers import Trainer, TrainingArguments

    from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments

    results = {}
    if plain:
        start = time.perf_counter()
        trainer = Trainer(
            model=init(),
            args=TrainingArguments(output_dir=os.path.join(output_dir, PLAIN), **arguments),
            train_dataset=train,
        )
        try:
            trainer.train()
            results[PLAIN] = {**metrics_of(trainer, test), "seconds": time.perf_counter() - start}
        except FloatingPointError:
            results[PLAIN] = {"diverged": True}
    for candidate, chosen in (candidates or {None: {}}).items():
        start = time.perf_counter()
        name = DEELBO if candidate is None else f"{DEELBO} {candidate}"
        args = DEELBoTrainingArguments(output_dir=os.path.join(output_dir, name), **chosen, **arguments)
        trainer = DEELBoTrainer(model=init(), args=args, train_dataset=train)
        try:
            trainer.train()
        except FloatingPointError:
            results[name] = {"diverged": True}
            continue
        learned = trainer.learned_hyperparameters()
        results[name] = {
            **metrics_of(trainer, test),
            "seconds": time.perf_counter() - start,
            **{k: learned[k] for k in ("lambda", "tau", "sigma", "alpha_eff", "beta_eff")},
        }
    return results


def run_cell(task, candidates=None) -> dict:
    """One (backbone, N, seed, optimizer) of the matrix; a plain record given with the task is
    kept instead of training plain `Trainer` again."""
    transfer._setup_thread()
    from hf_deelbo import digits

    backbone, n, seed, optimizer, steps, path, work_dir, plain = task
    train, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), n, seed=seed)
    train, test = transfer.tensor_dataset(train), transfer.tensor_dataset(test)
    raw_init = transfer.model_init(backbone, path, seed)
    init = raw_init if backbone == "vit" else (lambda: wrapped_timm(raw_init()))
    arguments = {**common_arguments(steps, seed), **OPTIMIZERS[optimizer]}
    results = run_pair(init, train, test, arguments, work_dir, candidates, plain=plain is None)
    return {
        "backbone": backbone,
        "n": n,
        "seed": seed,
        "optimizer": optimizer,
        **({PLAIN: plain} if plain else {}),
        **results,
    }


def run_calibration(task) -> dict:
    calibration, backbone, optimizer, n, seed, steps, path, work_dir = task
    return run_cell((backbone, n, seed, optimizer, steps, path, work_dir, None), CALIBRATIONS[calibration][1])


def calibration_choice(records: list[dict], candidates: dict) -> dict:
    """Each candidate's accuracy gap to plain fine-tuning per optimizer, and the chosen default:
    the smallest worst-case gap (ties: the later candidate, which adapts σ sooner)."""
    gaps = {
        name: {
            f"{r['backbone']}, {r['optimizer']}": r[f"{DEELBO} {name}"].get("accuracy", 0.0) - r[PLAIN]["accuracy"]
            for r in records
        }
        for name in candidates
    }
    worst = {name: min(v.values()) for name, v in gaps.items()}
    chosen = max(reversed(list(candidates)), key=worst.get)  # max keeps the first of equals: the later candidate
    return {"gaps": gaps, "worst_gap": worst, "chosen": chosen}


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for backbone, optimizer, n in sorted(
        {(r["backbone"], r["optimizer"], r["n"]) for r in records},
        key=lambda k: (k[0], list(OPTIMIZERS).index(k[1]), k[2]),
    ):
        group = [r for r in records if (r["backbone"], r["optimizer"], r["n"]) == (backbone, optimizer, n)]
        row = {"backbone": backbone, "optimizer": optimizer, "n": n, "seeds": len(group)}
        for method in (PLAIN, DEELBO):
            values = [r[method] for r in group if not r[method].get("diverged")]
            row[method] = {"diverged": len(group) - len(values)}
            for key in ("accuracy", "nll", "ece", "sigma", "lambda", "tau", "alpha_eff"):
                if values and key in values[0]:
                    row[method][key] = statistics.mean(v[key] for v in values)
            row[method]["per_seed_accuracy"] = [round(r[method].get("accuracy", float("nan")), 4) for r in group]
        plain, deelbo = row[PLAIN], row[DEELBO]
        row["accuracy_ok"] = deelbo.get("accuracy", 0) >= plain.get("accuracy", 0) - 0.01
        row["nll_ok"] = deelbo.get("nll", math.inf) <= plain.get("nll", math.inf) + 0.02
        rows.append(row)
    return rows


def markdown(rows: list[dict], settings: dict, seconds: float, figure_link: str) -> str:
    accuracy_ok = sum(r["accuracy_ok"] for r in rows)
    nll_ok = sum(r["nll_ok"] for r in rows)
    lines = [
        SECTION[0],
        "## Drop-in: DEELBoTrainer against Trainer with the same arguments",
        "",
        f"`benchmarks/dropin.py`: {settings['steps']} steps, batch 32, `max_grad_norm` 1.0, weight decay 0, "
        f"seeds {settings['seeds']}; plain = `transformers.Trainer`, DE ELBO = `DEELBoTrainer` at its defaults "
        f"(`sigma_learning_rate` {settings.get('sigma_learning_rate', DEFAULT)}, `sigma_momentum` "
        f"{settings.get('sigma_momentum')}). Means over seeds; per-seed accuracies in `benchmarks/results/dropin.json`. "
        f"Whole run: {seconds / 60:.0f} min.",
        "",
        f"Acceptance: accuracy ≥ plain − 1 point in **{accuracy_ok} of {len(rows)}** cells; "
        f"NLL ≤ plain + 0.02 in **{nll_ok} of {len(rows)}** cells ({100 * nll_ok / max(1, len(rows)):.0f} %).",
        "",
        "| backbone | optimizer | N | acc plain | acc DE ELBO | NLL plain | NLL DE ELBO | ECE plain | ECE DE ELBO "
        "| σ | λ | τ | α_eff | per-seed acc DE ELBO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, d = r[PLAIN], r[DEELBO]

        def f(values, key, spec=".3f"):
            return format(values[key], spec) if key in values else "—"

        mark = "" if r["accuracy_ok"] else " ✗"
        lines.append(
            f"| {r['backbone']} | {r['optimizer']} | {r['n']} | {f(p, 'accuracy')} | {f(d, 'accuracy')}{mark} | "
            f"{f(p, 'nll')} | {f(d, 'nll')}{'' if r['nll_ok'] else ' ✗'} | {f(p, 'ece')} | {f(d, 'ece')} | "
            f"{f(d, 'sigma', '.2g')} | {f(d, 'lambda', '.2g')} | {f(d, 'tau', '.2g')} | {f(d, 'alpha_eff', '.2g')} | "
            f"{d['per_seed_accuracy']} |"
        )
    lines += ["", f"![drop-in matrix]({figure_link})", SECTION[1]]
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones, strict=False):
        for optimizer, color in zip(OPTIMIZERS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
            cells = [r for r in rows if r["backbone"] == backbone and r["optimizer"] == optimizer]
            if not cells:
                continue
            ns = [r["n"] for r in cells]
            ax.plot(ns, [r[PLAIN].get("accuracy", math.nan) for r in cells], "--", color=color, marker="o")
            ax.plot(
                ns, [r[DEELBO].get("accuracy", math.nan) for r in cells], "-", color=color, marker="s", label=optimizer
            )
        ax.set_xscale("log")
        ax.set_xlabel("N (training images)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{backbone}: DEELBoTrainer (solid) vs Trainer (dashed)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_flags(
        parser,
        os.path.join(ROOT, "benchmarks", "results"),
        "A smoke run: ResNet, N=50, 1 seed, 2 optimizers, 5 steps.",
    )
    parser.add_argument(
        "--calibrate",
        nargs="?",
        const="sigma_learning_rate",
        choices=list(CALIBRATIONS),
        help="Measure the candidates for a default: sigma_learning_rate (the first) or sigma_momentum.",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="Only rebuild the figure, summary and docs section from OUTPUT_DIR/dropin.json.",
    )
    parser.add_argument(
        "--rerun-deelbo",
        nargs="+",
        metavar="OPTIMIZER",
        choices=list(OPTIMIZERS),
        help="Train DEELBoTrainer again (at today's defaults) for these optimizers, keeping every other "
        "record of OUTPUT_DIR/dropin.json, and its plain Trainer runs: they do not depend on "
        "DEELBoTrainer's defaults.",
    )
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    transfer._setup_thread()
    start = time.perf_counter()
    if args.calibrate:
        n, seed = 100, 10
        optimizers, candidates = CALIBRATIONS[args.calibrate]
        paths = {b: transfer.pretrained_path(b, os.path.join(args.output_dir, "pretrained")) for b in args.backbones}
        tasks = [
            (
                args.calibrate,
                b,
                o,
                n,
                seed,
                args.steps,
                paths[b],
                os.path.join(args.output_dir, "runs", f"calibration-{args.calibrate}-{b}-{o}"),
            )
            for b in args.backbones
            for o in optimizers
        ]
        name = "dropin-calibration" + ("" if args.calibrate == "sigma_learning_rate" else f"-{args.calibrate}")
        records = []
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for record in pool.imap_unordered(run_calibration, tasks):
                records.append(record)
                result = {
                    "settings": {
                        "steps": args.steps,
                        "n": n,
                        "seed": seed,
                        "backbones": args.backbones,
                        "optimizers": optimizers,
                        "candidates": candidates,
                    },
                    "seconds": time.perf_counter() - start,
                    "records": records,
                }
                if len(records) == len(tasks):
                    result["choice"] = calibration_choice(records, candidates)
                with open(os.path.join(args.output_dir, name + ".json"), "w") as f:  # partial results survive
                    json.dump(result, f, indent=1)
        print(json.dumps(result["choice"], indent=1))
        return
    settings = {
        "steps": args.steps,
        "seeds": args.seeds,
        "ns": args.ns,
        "backbones": args.backbones,
        "optimizers": list(OPTIMIZERS),
    }
    if args.quick:
        settings = {
            "steps": 5,
            "seeds": [0],
            "ns": [50],
            "backbones": ["timm-resnet"],
            "optimizers": ["AdamW 5e-5 linear", "SGD-Nesterov 0.1 cosine"],
        }
    from hf_deelbo import DEELBoTrainingArguments

    defaults = DEELBoTrainingArguments.__dataclass_fields__
    settings.update(
        sigma_learning_rate=defaults["sigma_learning_rate"].default, sigma_momentum=defaults["sigma_momentum"].default
    )
    results_path = os.path.join(args.output_dir, "dropin.json")
    docs_path = args.docs or (os.path.join(args.output_dir, "benchmarks.md") if args.quick else V1_DOCS)
    if args.summarize:
        saved = json.load(open(results_path))
        write_summary(saved["records"], saved["settings"], saved.get("seconds", 0.0), args.output_dir, docs_path)
        return
    paths = {
        b: transfer.pretrained_path(b, os.path.join(args.output_dir, "pretrained")) for b in settings["backbones"]
    }
    cells = itertools.product(settings["backbones"], settings["ns"], settings["seeds"], settings["optimizers"])
    records, kept = [], {}
    if args.rerun_deelbo:
        saved = json.load(open(results_path))
        settings = {
            **saved["settings"],
            "sigma_learning_rate": settings["sigma_learning_rate"],
            "sigma_momentum": settings["sigma_momentum"],
        }
        cells = itertools.product(settings["backbones"], settings["ns"], settings["seeds"], args.rerun_deelbo)
        key = lambda r: (r["backbone"], r["n"], r["seed"], r["optimizer"])  # noqa: E731
        records = [r for r in saved["records"] if r["optimizer"] not in args.rerun_deelbo]
        start -= saved.get("seconds", 0.0)  # the whole matrix's compute: the earlier runs and this one
        kept = {key(r): r[PLAIN] for r in saved["records"] if r["optimizer"] in args.rerun_deelbo}
    tasks = [
        (
            b,
            n,
            s,
            o,
            settings["steps"],
            paths[b],
            os.path.join(args.output_dir, "runs", f"dropin-{b}-{n}-{s}-{o}"),
            kept.get((b, n, s, o)),
        )
        for b, n, s, o in cells
    ]
    tasks.sort(key=lambda t: (t[2], -t[1]))  # every cell at one seed before the next seed
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for record in pool.imap_unordered(run_cell, tasks):
            records.append(record)
            print(
                f"{record['backbone']} N={record['n']} seed={record['seed']} {record['optimizer']}: "
                f"plain {record[PLAIN].get('accuracy', float('nan')):.3f} "
                f"DE ELBO {record[DEELBO].get('accuracy', float('nan')):.3f} "
                f"σ {record[DEELBO].get('sigma', float('nan')):.2g}",
                flush=True,
            )
            with open(results_path, "w") as f:  # after every cell: partial results survive
                json.dump(
                    {"settings": settings, "seconds": time.perf_counter() - start, "records": records}, f, indent=1
                )
    write_summary(records, settings, time.perf_counter() - start, args.output_dir, docs_path)


def write_summary(records: list[dict], settings: dict, seconds: float, output_dir: str, docs_path: str) -> None:
    """The figure, the stored summary and the docs section, from the records (complete or not)."""
    rows = summarize(records)
    figure(rows, os.path.join(output_dir, "dropin.png"))
    with open(os.path.join(output_dir, "dropin.json"), "w") as f:
        json.dump({"settings": settings, "seconds": seconds, "summary": rows, "records": records}, f, indent=1)
    link = os.path.relpath(os.path.join(output_dir, "dropin.png"), os.path.dirname(os.path.abspath(docs_path)))
    section = markdown(rows, settings, seconds, link)
    update_section(docs_path, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
