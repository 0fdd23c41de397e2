"""The base of the package's `evaluate` metrics (`modules/<name>/<name>.py`): predicted logits or
log-probabilities against integer labels, one number named after the metric."""

from __future__ import annotations

import datasets
import evaluate

_INPUTS = """
Args:
    predictions (`list` of `list` of `float`): logits or log-probabilities, one row of classes per example.
    references (`list` of `int`): the labels.{extra}
Returns:
    `{name}` (`float`): {returns}
"""


class ClassificationMetric(evaluate.Metric):
    """Subclasses set `metric_name`, `description`, `returns` and `value`, the function of
    (predictions, references, **keyword arguments) that computes the metric (and `extra_inputs`,
    documenting those keyword arguments)."""

    metric_name = ""
    description = ""
    returns = ""
    extra_inputs = ""
    value = None

    def _info(self):
        return evaluate.MetricInfo(
            description=self.description,
            citation="",
            inputs_description=_INPUTS.format(extra=self.extra_inputs, name=self.metric_name, returns=self.returns),
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, **kwargs):
        return {self.metric_name: type(self).value(predictions, references, **kwargs)}
