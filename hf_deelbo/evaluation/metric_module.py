"""The base of the package's `evaluate` metrics (`modules/<name>/<name>.py`): predicted logits or
log-probabilities against integer labels, one number named after the metric."""

from __future__ import annotations

import datasets
import evaluate

_INPUTS = """
Args:
    predictions (`list` of `list` of `float`): logits or log-probabilities, one row of classes per example{ids}.
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
    # Whether predicted class ids are accepted too (one int per example, as Hugging Face's own
    # `accuracy` takes them), besides rows of logits.
    accepts_class_ids = False

    def _info(self):
        features = [
            datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            )
        ]
        if self.accepts_class_ids:
            features.append(
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
            )
        return evaluate.MetricInfo(
            description=self.description,
            citation="",
            inputs_description=_INPUTS.format(
                extra=self.extra_inputs,
                name=self.metric_name,
                returns=self.returns,
                ids="; or (`list` of `int`) the predicted class ids, as Hugging Face's `accuracy` takes them"
                if self.accepts_class_ids
                else "",
            ),
            features=features if len(features) > 1 else features[0],
        )

    def _compute(self, predictions, references, **kwargs):
        return {self.metric_name: type(self).value(predictions, references, **kwargs)}
