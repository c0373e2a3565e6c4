"""Tasks: a model factory, a data loader and train/eval steps per task, looked up by name."""

from consortia.tasks.base import Task, TaskData, TaskOptions, WeightsMismatch, default_device
from consortia.tasks.digits import TASK as DIGITS
from consortia.tasks.fashion_mnist import TASK as FASHION_MNIST
from consortia.tasks.reviews import TASK as REVIEWS
from consortia.tasks.shakespeare import TASK as SHAKESPEARE

TASKS: dict[str, Task] = {task.name: task for task in (DIGITS, FASHION_MNIST, REVIEWS, SHAKESPEARE)}


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """The task called `name`, set up with the run's `options` when given."""
    try:
        task = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}") from None
    return task if options is None else task.with_options(options)


__all__ = ["TASKS", "Task", "TaskData", "TaskOptions", "WeightsMismatch", "default_device",
           "get_task"]
