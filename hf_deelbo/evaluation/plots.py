"""PNG figures of a run: learned hyperparameters, training loss, reliability diagram.

Drawn on `matplotlib.figure.Figure` with the Agg canvas, without pyplot: importing the package
leaves the user's backend (a notebook's inline, TkAgg) and pyplot's figure list as they were."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import calibration

HYPERPARAMETERS_PLOT = "deelbo_hyperparameters.png"
LOSS_PLOT = "training_loss.png"
RELIABILITY_PLOT = "reliability_diagram.png"


def _figure(width: float, height: float):
    """A figure with one axes, on its own Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_hyperparameters(log_history: list[dict], path: str):
    """λ, τ (prior variances) and σ² (posterior variance) over training steps, log scale.
    Returns the figure, or None (and writes nothing) when the history has no logged values."""
    steps, lam = _series(log_history, "lambda")
    if not steps:
        return None
    _, tau = _series(log_history, "tau")
    _, sigma = _series(log_history, "sigma")
    fig, ax = _figure(6, 3.5)
    ax.plot(steps, lam, label="λ (backbone prior variance)")
    ax.plot(steps, tau, label="τ (head prior variance)")
    ax.plot(steps, [s**2 for s in sigma], label="σ² (posterior variance)", linestyle="--")
    ax.set_yscale("log")
    return _save_over_steps(fig, ax, path, "variance (log scale)", "DE ELBO: learned variances")


def plot_training_loss(log_history: list[dict], path: str):
    """Training objective and its NLL part over steps. Returns the figure, or None (and writes
    nothing) when the history has no logged loss."""
    steps, loss = _series(log_history, "loss")
    if not steps:
        return None
    nll_steps, nll = _series(log_history, "nll")
    fig, ax = _figure(6, 3.5)
    ax.plot(steps, loss, label="DE ELBO loss (NLL + KL/κN)")
    if nll_steps:
        ax.plot(nll_steps, nll, label="NLL at the sampled weights")
    return _save_over_steps(fig, ax, path, "per-example loss", "Training objective")


def _save_over_steps(fig, ax, path: str, ylabel: str, title: str):
    """Label a plot over optimizer steps, write it to `path` and return the figure."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def plot_reliability(log_probs, labels, path: str, num_bins: int = 10):
    """Reliability diagram: accuracy against confidence in equal-width bins, the number of examples
    written above each bar, and the expected calibration error in the title: the bins and the ECE
    of `metrics.calibration`, which the reported ECE is computed from. Returns the figure."""
    bins = calibration(log_probs, labels, num_bins)
    centers, accuracies, counts, ece = bins.centers, bins.accuracies, bins.counts, bins.ece
    fig, ax = _figure(4.5, 4.5)
    ax.bar(centers, accuracies, width=1 / num_bins, edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    for center, accuracy, count in zip(centers, accuracies, counts, strict=False):
        if count:
            ax.annotate(
                str(count),
                (center, accuracy),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xlabel("confidence (bins of width %g; examples per bin above each bar)" % (1 / num_bins), fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"Reliability diagram: ECE = {ece:.4f} (n = {len(labels)})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig
