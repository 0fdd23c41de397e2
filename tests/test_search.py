"""Grid search and learning-rate selection, on tiny models."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, build_model, image_dataset, run_benchmark, with_benchmark_backbone
from torch.distributions import Normal, kl_divergence

from hf_deelbo import (
    DEELBoTrainer,
    DEELBoTrainingArguments,
    L2SPTrainingArguments,
    l2sp_grid_search,
    select_learning_rate,
)
from hf_deelbo.core.validation import stratified_split

COMMON = dict(
    per_device_train_batch_size=8,
    max_steps=2,
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    save_strategy="no",
    optim="sgd",
    seed=0,
)


def _labels(dataset):
    return [int(v) for v in dataset.with_format(None)["labels"]]


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, validation = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + validation) == list(range(100))
    assert [sum(labels[i] == c for i in validation) for c in range(3)] == [10, 6, 4]


def test_grid_search_runs_every_config_and_retrains_the_best_on_all_data(tmp_path):
    dataset = image_dataset(20)
    result = l2sp_grid_search(
        lambda: build_model("resnet")[0],
        dataset,
        _labels(dataset),
        L2SPTrainingArguments(output_dir=str(tmp_path), **COMMON),
        alphas=(1e-2, 0.0),
        betas=(1e-3,),
        learning_rates=(0.5, 0.01),
    )
    assert len(result.runs) == 4 and all(run.seconds > 0 for run in result.runs)
    assert result.best == min(result.runs, key=lambda run: run.score).settings
    assert len(result.trainer.train_dataset) == 20  # the retrain sees all N
    assert result.trainer.args.alpha == result.best["alpha"]
    assert result.total_seconds == pytest.approx(sum(r.seconds for r in result.runs) + result.final_seconds)


def _reference_objective(trainer, dataset, num_samples, batch_statistics=False):
    """The objective from scratch: the trainer's draws applied in place to a copy of the model, run on
    the whole dataset as one batch (in train mode for batch statistics); the KL from torch.distributions."""
    import copy

    model, posterior, callback = trainer.model, trainer.posterior, trainer.deelbo_callback
    reference = copy.deepcopy(model).train(batch_statistics)  # the test models have no dropout
    sigma = posterior.sigma().detach()
    nlls = []
    for s in range(num_samples):
        noise = torch.randn(posterior.num_params, generator=torch.Generator().manual_seed(trainer.args.seed + s))
        offset = 0
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                q.copy_(p + sigma * noise[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            logits = reference(pixel_values=dataset[:]["pixel_values"]).logits
        nlls.append(F.cross_entropy(logits, dataset[:]["labels"]).item())
    kl = 0.0
    for name, p in model.named_parameters():
        head = name.startswith("classifier.")
        mean = torch.zeros_like(p) if head else posterior.prior_mean[name]
        var = callback.head_prior_variance if head else callback.backbone_prior_variance
        kl += kl_divergence(Normal(p.double(), sigma.double()), Normal(mean.double(), math.sqrt(var))).sum().item()
    return sum(nlls) / num_samples + kl / (trainer.kappa * len(dataset))


def test_training_objective_against_a_reference(tmp_path):
    model, _ = build_model("vit")
    dataset = image_dataset(12)
    trainer = DEELBoTrainer(
        model=model,
        args=DEELBoTrainingArguments(output_dir=str(tmp_path), sigma_init=1e-3, **COMMON),
        train_dataset=dataset,
    )
    trainer.train()
    objective = trainer.training_objective(dataset, num_samples=3)
    assert objective == pytest.approx(_reference_objective(trainer, dataset, 3), rel=1e-4)


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_training_objective_with_batch_norm_against_a_reference(tmp_path, batch_norm):
    # 9 examples in evaluation batches of 8: with batch statistics the last batch of one joins the first.
    model, _ = build_model("resnet")
    dataset = image_dataset(9)
    args = DEELBoTrainingArguments(
        output_dir=str(tmp_path), sigma_init=0.05, objective_batch_norm=batch_norm, **{**COMMON, "max_steps": 3}
    )
    trainer = DEELBoTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    running = {name: b.clone() for name, b in model.named_buffers()}
    objective = trainer.training_objective(dataset, num_samples=2)
    assert all(torch.equal(b, running[name]) for name, b in model.named_buffers())  # running statistics kept
    assert model.training  # as before the call
    expected = _reference_objective(trainer, dataset, 2, batch_statistics=batch_norm == "batch")
    assert objective == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # afterwards, a training-mode forward updates the running statistics again
        trainer._forward(model, trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(dataset)))))
    assert not all(torch.equal(b, running[name]) for name, b in model.named_buffers())


def test_training_objective_with_batch_statistics_needs_two_examples(tmp_path):
    model, _ = build_model("resnet")
    trainer = DEELBoTrainer(
        model=model, args=DEELBoTrainingArguments(output_dir=str(tmp_path), **COMMON), train_dataset=image_dataset(8)
    )
    with pytest.raises(ValueError, match="objective_batch_norm='running'"):
        trainer.training_objective(image_dataset(1), num_samples=1)
    assert model.training
    with pytest.raises(ValueError, match="objective_batch_norm must be 'batch'.*got 'mean'"):
        DEELBoTrainingArguments(output_dir=str(tmp_path), objective_batch_norm="mean")


def test_learning_rate_selection_picks_the_lowest_training_objective(tmp_path):
    dataset = image_dataset(12)
    result = select_learning_rate(
        lambda: build_model("resnet")[0],
        dataset,
        # Running statistics: at lr 1e6 they overflow and the objective is not finite. (With batch
        # statistics the BatchNorm layers renormalize the blown-up activations and it stays finite.)
        DEELBoTrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0, objective_batch_norm="running", **COMMON),
        learning_rates=(1e6, 0.05, 0.001),
        num_samples=2,
    )
    scores = {run.settings["learning_rate"]: run.score for run in result.runs}
    assert scores[1e6] == math.inf  # not finite: never chosen
    assert result.best["learning_rate"] == min(scores, key=scores.get)
    assert result.trainer.args.learning_rate == result.best["learning_rate"]
    chosen = next(run for run in result.runs if run.settings == result.best)
    assert chosen.learned == result.trainer.learned_hyperparameters()  # what each run learned, kept
    assert len({run.learned["sigma"] for run in result.runs if math.isfinite(run.score)}) == 2
    assert result.trainer.predict(dataset).predictions.shape == (12, 5)


@pytest.mark.slow
def test_transfer_benchmark_quick_mode_writes_its_outputs(tmp_path, benchmark_backbone):
    with_benchmark_backbone(tmp_path, benchmark_backbone)
    run_benchmark("transfer.py", "--quick", "--output-dir", tmp_path)
    for name in ("transfer.json", "transfer.png", "benchmarks.md"):
        assert (tmp_path / name).is_file(), name
    assert "L2-SP grid search" in (tmp_path / "benchmarks.md").read_text()
    # --replot rebuilds the docs and the stored summary from the records alone.
    saved = json.loads((tmp_path / "transfer.json").read_text())
    summary = saved.pop("summary")
    (tmp_path / "transfer.json").write_text(json.dumps(saved))
    run_benchmark(
        "transfer.py", "--replot", "--output-dir", tmp_path, "--docs", tmp_path / "replotted.md", timeout=300
    )
    assert json.loads((tmp_path / "transfer.json").read_text())["summary"] == summary
    assert "L2-SP grid search" in (tmp_path / "replotted.md").read_text()


def test_transfer_summary_names_the_seed_count_of_rows_that_differ():
    from benchmarks import transfer

    def record(seed, n, accuracy):
        run = {"accuracy": accuracy, "nll": 0.5, "ece": 0.1, "seconds": 1.0}
        return {
            "backbone": "vit",
            "n": n,
            "seed": seed,
            "DE ELBO": {**run, "lambda": 1.0, "tau": 1.0, "alpha_eff": 1.0},
        }

    settings = {"steps": 600, "learning_rates": [0.1], "strengths": [0.0]}
    records = [record(s, 100, 0.8) for s in range(3)] + [record(s, 500, 0.9 + s / 100) for s in range(5)]
    text = transfer.markdown(transfer.summarize(records), settings, 60.0)
    assert "3 to 5 seeds" in text
    assert "| vit | 100 | DE ELBO | 0.800 ± 0.000 (3 seeds) |" in text
    assert "| vit | 500 | DE ELBO | 0.920 ± 0.016 (5 seeds) |" in text
    same = transfer.markdown(transfer.summarize(records[:3]), settings, 60.0)
    assert "3 seed(s)" in same and "(3 seeds)" not in same


def test_transfer_compares_each_method_with_the_grid_on_the_seeds_both_have():
    from benchmarks import transfer

    def record(seed, grid_accuracy, tpgm_accuracy=None):
        grid = {"accuracy": grid_accuracy, "nll": 0.5, "ece": 0.1, "seconds": 100.0 + seed, "alpha": 0.0, "beta": 0.0}
        result = {"backbone": "timm-resnet", "n": 50, "seed": seed, "L2-SP grid search": grid}
        if tpgm_accuracy is not None:
            result["TPGM"] = {
                "accuracy": tpgm_accuracy,
                "nll": 0.5,
                "ece": 0.1,
                "seconds": 4.0,
                "median_radius": 0.1,
                "runs": [],
            }
        return result

    # TPGM has seeds 0-2 only; the grid's seeds 3 and 4 are far better and must not count against it.
    records = [record(0, 0.90, 0.85), record(1, 0.92, 0.86), record(2, 0.94, 0.93), record(3, 1.0), record(4, 1.0)]
    rows = transfer.summarize(records)
    tpgm = next(row for row in rows if row["method"] == "TPGM")
    assert tpgm["paired_seeds"] == 3
    assert tpgm["accuracy_vs_grid"] == pytest.approx(((0.85 - 0.90) + (0.86 - 0.92) + (0.93 - 0.94)) / 3)
    assert tpgm["compute_vs_grid"] == pytest.approx((100.0 + 101.0 + 102.0) / 12.0)
    text = transfer.markdown(rows, {"steps": 200, "learning_rates": [0.1], "strengths": [0.0]}, 60.0)
    assert "| timm-resnet | 50 | TPGM | -0.040 (3 seeds) | 25.2× |" in text


@pytest.mark.slow
def test_run_cost_benchmark_writes_its_ratio(tmp_path, benchmark_backbone):
    output = tmp_path / "run_cost.json"
    run_benchmark(
        "run_cost.py",
        "--steps",
        3,
        "--repeats",
        1,
        "--output",
        output,
        "--cache-dir",
        os.path.dirname(benchmark_backbone),
        timeout=600,
    )
    saved = json.loads(output.read_text())
    medians = saved["median_seconds"]
    assert set(medians) == {"grid tuning run", "grid retrain", "DE ELBO run"} and min(medians.values()) > 0
    assert saved["run_ratio"] == pytest.approx(medians["DE ELBO run"] / medians["grid retrain"])
    expected = (144 * medians["grid tuning run"] + medians["grid retrain"]) / (4 * medians["DE ELBO run"])
    assert saved["grid_over_deelbo"] == pytest.approx(expected)
    # N = 100 split 80/20; 3 steps are one epoch of the 80 (32, 32, 16) and 96 of the 100.
    assert saved["tuning_examples"] == 80 and saved["ceiling_per_example"] == pytest.approx((144 * 80 + 96) / (4 * 96))


def test_run_cost_ceiling_counts_the_examples_each_run_processes():
    from benchmarks import run_cost

    # Batches of 32 with no dropped last batch: 40 examples are epochs of (32, 8), 50 of (32, 18),
    # 80 of (32, 32, 16): 66 epochs in 198 steps, then two batches of 32.
    assert run_cost.examples_seen(40, 32, 200) == 100 * 40
    assert run_cost.examples_seen(50, 32, 200) == 100 * 50
    assert run_cost.examples_seen(80, 32, 200) == 66 * 80 + 64
    assert run_cost.examples_seen(100, 32, 3) == 96 and run_cost.examples_seen(10, 32, 7) == 70
    assert run_cost.ceiling_per_example(40, 50, 32, 200) == pytest.approx((144 * 4000 + 5000) / (4 * 5000))
    assert run_cost.ceiling_per_example(40, 50, 32, 200) < 30 < run_cost.ceiling_per_example(80, 100, 32, 200)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--repeats", "0"], "--repeats must be at least 1; got 0"),
        (["--image-size", "-4"], "--image-size must be at least 1; got -4"),
        (["--backbone", "vit", "--image-size", "32"], "--image-size 32 needs --backbone timm-resnet"),
    ],
)
def test_run_cost_rejects_bad_arguments_before_any_work(tmp_path, arguments, message):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run_cost",
            *arguments,
            "--output",
            str(tmp_path / "out.json"),
            "--cache-dir",
            str(tmp_path / "pretrained"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "pretrained").exists()


@pytest.mark.slow
def test_kappa_benchmark_writes_its_outputs(tmp_path, benchmark_backbone):
    with_benchmark_backbone(tmp_path, benchmark_backbone)
    docs = tmp_path / "benchmarks.md"
    run_benchmark("kappa.py", "--steps", 2, "--seeds", 0, "--output-dir", tmp_path, "--docs", docs, timeout=600)
    saved = json.loads((tmp_path / "kappa.json").read_text())
    assert [row["kappa"] for row in saved["summary"]][0] == 1 and (tmp_path / "kappa.png").is_file()
    assert "| κ | test accuracy |" in docs.read_text()


def test_learning_rate_selection_keeps_only_the_best_model_so_far(tmp_path):
    """While the later runs train, the earlier runs' models are gone except the best one."""
    import gc
    import weakref

    models, alive_at_start = [], []

    def model_init():
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in models))
        model = build_model("resnet")[0]
        models.append(weakref.ref(model))
        return model

    result = select_learning_rate(
        model_init,
        image_dataset(12),
        DEELBoTrainingArguments(output_dir=str(tmp_path), **COMMON),
        learning_rates=(0.05, 0.01, 0.001, 0.0001),
        num_samples=2,
    )
    assert alive_at_start == [0, 1, 1, 1]
    gc.collect()
    assert [ref() for ref in models if ref() is not None] == [result.trainer.model]
