"""Tasks: a model factory, a data loader and train/eval steps per task, looked up by name."""

from consortia.tasks.base import Task, TaskData, default_device
from consortia.tasks.digits import TASK as DIGITS
from consortia.tasks.fashion_mnist import TASK as FASHION_MNIST

TASKS: dict[str, Task] = {task.name: task for task in (DIGITS, FASHION_MNIST)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "TaskData", "default_device", "get_task"]
