"""Which metric scores a task, and which direction of it is better: decided here, once.

A classification task is scored by test ``accuracy`` in percent (higher is better), a regression
task by ``rmse`` (lower is better). Datasets and the trainer name their metric with
:func:`metric_name`; training (best epoch), the runner and the report compare scores through
:func:`higher_is_better`. No torch here, so the report can import it.
"""

from __future__ import annotations

METRIC_OF_TASK = {"classification": "accuracy", "regression": "rmse"}
LOWER_IS_BETTER = frozenset({"rmse", "mse", "mae", "loss", "nll"})  # error metrics; every other is maximised


def metric_name(task: str) -> str:
    """The metric a task is scored by (``accuracy`` for classification, else ``rmse``)."""
    return METRIC_OF_TASK.get(task, "rmse")


def higher_is_better(metric) -> bool:
    """True for accuracy-like metrics (maximised), False for error metrics such as ``rmse``."""
    return not (isinstance(metric, str) and metric.lower() in LOWER_IS_BETTER)
