"""The ``task=`` and ``measurement=`` arguments of :class:`tracin.TracIn` turned into tasks."""
from __future__ import annotations

from typing import Callable, Optional, Union

from ..errors import TracInError
from .base import CallableTask, DuckTask, Task
from .classification import DefaultTask, MarginMeasurement

MEASUREMENT_TASKS = {"loss": None, "margin": MarginMeasurement}  # the words of tracin.config.MEASUREMENTS


def as_task(task: Union[Task, Callable, None]) -> Task:
    """Normalise the ``task`` argument: None means classification with cross-entropy; an object with a
    ``loss`` method (duck typing) or a callable is wrapped."""
    if task is None:
        return DefaultTask()
    if isinstance(task, Task):
        return task
    if callable(getattr(task, "loss", None)):
        return DuckTask(task)
    if callable(task):
        return CallableTask(task)
    raise TracInError(f"task must be a Task, an object with a loss(model, batch) method or a callable (model, batch) -> "
                      f"per-example loss, got {type(task).__name__}.")


def as_measurement(measurement: Union[str, Task, Callable, None]) -> Optional[Task]:
    """``measurement=`` (checked by :class:`tracin.config.ScoringConfig`) as a task for the test side: None or "loss"
    (the task's own loss), "margin", a Task, an object with a ``loss`` method or a callable ``(model, batch) ->
    Tensor[B]`` (lower is better, like a loss)."""
    if measurement is None or isinstance(measurement, str):
        kind = MEASUREMENT_TASKS.get(measurement) if measurement is not None else None
        return kind() if kind is not None else None
    return as_task(measurement)
