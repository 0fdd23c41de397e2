"""Accuracy: an `evaluate` metric of hf_deelbo, loaded by path (`hf_deelbo.evaluation.metrics`)."""

from hf_deelbo.evaluation import metric_module
from hf_deelbo.evaluation.metrics import accuracy


class Accuracy(metric_module.ClassificationMetric):
    metric_name, value = "accuracy", accuracy
    description = "The fraction of examples whose most probable class is the label."
    returns = "in [0, 1]."
    accepts_class_ids = True
