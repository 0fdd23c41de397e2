"""Negative log-likelihood: an `evaluate` metric of hf_deelbo, loaded by path (`hf_deelbo.evaluation.metrics`)."""

from hf_deelbo.evaluation import metric_module
from hf_deelbo.evaluation.metrics import negative_log_likelihood


class NegativeLogLikelihood(metric_module.ClassificationMetric):
    metric_name, value = "nll", negative_log_likelihood
    description = "The mean negative log-likelihood of the labels under the predicted distributions."
    returns = "the mean of -log p(y | x)."
