"""The kit every task is built with: base classes, errors, retries, registry."""

from worker.taskkit.base import BlockingTask, RetriableTask, SideEffectingTask, TaskBase
from worker.taskkit.errors import Backpressure, PermanentError, RetriableError
from worker.taskkit.registry import build_functions
from worker.taskkit.resources import Resources

__all__ = [
    "Backpressure",
    "BlockingTask",
    "PermanentError",
    "Resources",
    "RetriableError",
    "RetriableTask",
    "SideEffectingTask",
    "TaskBase",
    "build_functions",
]
