"""Expected calibration error: an `evaluate` metric of hf_deelbo, loaded by path (`hf_deelbo.evaluation.metrics`)."""

from hf_deelbo.evaluation import metric_module
from hf_deelbo.evaluation.metrics import expected_calibration_error


class ExpectedCalibrationError(metric_module.ClassificationMetric):
    metric_name, value = "ece", expected_calibration_error
    description = (
        "The expected calibration error over equal-width confidence bins: the example-weighted mean of "
        "|accuracy - mean confidence| over the bins."
    )
    returns = "in [0, 1]."
    extra_inputs = "\n    num_bins (`int`, defaults to 10): the number of equal-width confidence bins."
