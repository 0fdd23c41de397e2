"""PNG figures of a run: learned hyperparameters, training loss, reliability diagram."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HYPERPARAMETERS_PLOT = "deelbo_hyperparameters.png"
LOSS_PLOT = "training_loss.png"
RELIABILITY_PLOT = "reliability_diagram.png"


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_hyperparameters(log_history: list[dict], path: str) -> bool:
    """λ, τ (prior variances) and σ² (posterior variance) over training steps, log scale.
    Returns False (and writes nothing) when the history has no logged values."""
    steps, lam = _series(log_history, "lambda")
    if not steps:
        return False
    _, tau = _series(log_history, "tau")
    _, sigma = _series(log_history, "sigma")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, lam, label="λ (backbone prior variance)")
    ax.plot(steps, tau, label="τ (head prior variance)")
    ax.plot(steps, [s**2 for s in sigma], label="σ² (posterior variance)", linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title("DE ELBO: learned variances")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_training_loss(log_history: list[dict], path: str) -> bool:
    """Training objective and its NLL part over steps."""
    steps, loss = _series(log_history, "loss")
    if not steps:
        return False
    nll_steps, nll = _series(log_history, "nll")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, label="DE ELBO loss (NLL + KL/κN)")
    if nll_steps:
        ax.plot(nll_steps, nll, label="NLL at the sampled weights")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-example loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_reliability(log_probs, labels, path: str, num_bins: int = 10) -> None:
    """Reliability diagram: accuracy against confidence in equal-width bins."""
    probs = torch.as_tensor(log_probs).float().softmax(-1)
    labels = torch.as_tensor(labels).long()
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, num_bins + 1)
    centers, accuracies, counts = [], [], []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        in_bin = (confidence > lo) & (confidence <= hi)
        centers.append((lo + hi) / 2)
        accuracies.append(float(correct[in_bin].mean()) if in_bin.any() else 0.0)
        counts.append(int(in_bin.sum()))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(centers, accuracies, width=1 / num_bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
