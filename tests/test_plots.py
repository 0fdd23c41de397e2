"""The figures of a run say what they show: axes, title, the ECE and the bin counts."""

import torch
from matplotlib.text import Annotation

from hf_deelbo.evaluation.metrics import classification_metrics
from hf_deelbo.evaluation.plots import plot_hyperparameters, plot_reliability, plot_training_loss


def test_reliability_diagram_shows_the_reported_ece_and_the_bin_counts(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, generator=generator)
    labels = torch.where(torch.rand(200, generator=generator) < 0.6, logits.argmax(-1), torch.randint(0, 5, (200,)))
    path = tmp_path / "reliability.png"
    fig = plot_reliability(logits, labels, str(path))
    assert path.is_file()
    (ax,) = fig.axes
    ece = classification_metrics(logits, labels)["ece"]
    assert f"ECE = {ece:.4f}" in ax.get_title() and "n = 200" in ax.get_title()
    counts = [int(child.get_text()) for child in ax.get_children() if isinstance(child, Annotation)]
    assert sum(counts) == 200 and len(counts) > 1
    assert ax.get_xlabel().startswith("confidence") and ax.get_ylabel() == "accuracy"


def test_every_plot_labels_both_axes(tmp_path):
    history = [
        {"step": s, "loss": 1 / s, "nll": 0.5 / s, "lambda": 1e-6 * s, "tau": 1e-3, "sigma": 1e-4 * s}
        for s in range(1, 6)
    ]
    for plot in (plot_hyperparameters, plot_training_loss):
        fig = plot(history, str(tmp_path / f"{plot.__name__}.png"))
        (ax,) = fig.axes
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), plot.__name__
    assert plot_hyperparameters([{"step": 1, "loss": 1.0}], str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_accuracy_takes_class_ids_as_hugging_faces_does_and_logits_as_before():
    """The package's `accuracy` module accepts what Hugging Face's `accuracy` accepts (predicted class
    ids) and rows of logits, with the same value for the same predictions; `compute_metrics` is
    unchanged (logits)."""
    from transformers import EvalPrediction

    from hf_deelbo import compute_metrics
    from hf_deelbo.evaluation.metrics import load_metric

    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [0.5, 0.2, 0.1]])
    labels = [0, 1, 1, 0]
    metric = load_metric("accuracy")
    from_ids = metric.compute(predictions=logits.argmax(-1).tolist(), references=labels)["accuracy"]
    from_logits = metric.compute(predictions=logits.tolist(), references=labels)["accuracy"]
    assert from_ids == from_logits == 0.75
    assert compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels))["accuracy"] == 0.75
