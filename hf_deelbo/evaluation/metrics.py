"""Classification metrics of predicted distributions: accuracy, NLL and expected calibration error.

Each metric is an `evaluate` module shipped with the package (`modules/<name>/<name>.py`), loaded
by path, which works offline (`evaluate.load("accuracy")` fetches the Hub's and fails without a
network). `compute_metrics` is Trainer's `compute_metrics`; `classification_metrics` the same
for tensors. The modules compute with the functions below, and the reliability diagram
(`plots.plot_reliability`) draws the bins of the same `calibration`, so the ECE it shows is the
one reported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODULES_DIR = Path(__file__).parent / "modules"
METRIC_NAMES = ("accuracy", "nll", "ece")


def _log_probs_and_labels(predictions, references) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (from logits or log-probabilities, float32) and integer labels."""
    log_probs = torch.as_tensor(np.asarray(predictions)).float().log_softmax(-1)
    return log_probs, torch.as_tensor(np.asarray(references)).long()


@torch.no_grad()
def accuracy(predictions, references) -> float:
    """The fraction of examples whose most probable class is the label: `predictions` are rows of
    logits (or log-probabilities), or the predicted class ids (as Hugging Face's `accuracy` takes them)."""
    predicted = torch.as_tensor(np.asarray(predictions))
    labels = torch.as_tensor(np.asarray(references)).long()
    if predicted.dim() == 2:
        predicted = predicted.float().argmax(-1)
    return float((predicted.long() == labels).float().mean())


@torch.no_grad()
def negative_log_likelihood(predictions, references) -> float:
    """The mean of −log p(y | x) over the examples."""
    log_probs, labels = _log_probs_and_labels(predictions, references)
    return float(F.nll_loss(log_probs, labels))


@dataclass
class Calibration:
    """Equal-width confidence bins: each bin's center, accuracy (0 when empty) and example count,
    and the expected calibration error Σ_bins (n_bin/n) |accuracy − mean confidence|."""

    centers: list[float]
    accuracies: list[float]
    counts: list[int]
    ece: float


@torch.no_grad()
def calibration(predictions, references, num_bins: int = 10) -> Calibration:
    """The bins of the confidence (the largest predicted probability) against being right."""
    log_probs, labels = _log_probs_and_labels(predictions, references)
    confidence, prediction = log_probs.exp().max(-1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, num_bins + 1)
    ece = torch.zeros(())
    centers, accuracies, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        centers.append(float(lo + hi) / 2)
        accuracies.append(float(correct[in_bin].mean()) if in_bin.any() else 0.0)
        counts.append(int(in_bin.sum()))
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return Calibration(centers, accuracies, counts, float(ece))


def expected_calibration_error(predictions, references, num_bins: int = 10) -> float:
    """Σ_bins (n_bin/n) |accuracy − mean confidence| over `num_bins` equal-width confidence bins."""
    return calibration(predictions, references, num_bins).ece


@functools.cache
def load_metric(name: str):
    """The package's `evaluate` module `name` ("accuracy", "nll" or "ece"), loaded once per process."""
    import evaluate

    return evaluate.load(str(MODULES_DIR / name), keep_in_memory=True)


def classification_metrics(log_probs, labels, num_bins: int = 10) -> dict:
    """Accuracy, NLL and expected calibration error (equal-width confidence bins) of predicted
    logits or log-probabilities `log_probs` [examples, classes] against integer `labels`."""
    predictions = np.asarray(torch.as_tensor(log_probs).float())
    references = np.asarray(torch.as_tensor(labels).long())
    return {
        name: load_metric(name).compute(
            predictions=predictions, references=references, **({"num_bins": num_bins} if name == "ece" else {})
        )[name]
        for name in METRIC_NAMES
    }


def compute_metrics(eval_prediction) -> dict:
    """Trainer's `compute_metrics`: accuracy, NLL and ECE of the evaluation's logits (reported as
    `eval_accuracy`, `eval_nll`, `eval_ece`)."""
    return classification_metrics(eval_prediction.predictions, eval_prediction.label_ids)
