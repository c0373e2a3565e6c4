"""Tasks: a model factory, a data loader and train/eval steps per task, looked up by name."""

from consortia.tasks.base import Task, TaskData, TaskOptions, WeightsMismatch, default_device
from consortia.tasks.digits import TASK as DIGITS
from consortia.tasks.fashion_mnist import TASK as FASHION_MNIST
from consortia.tasks.reviews import TASK as REVIEWS
from consortia.tasks.shakespeare import TASK as SHAKESPEARE

TASKS: dict[str, Task] = {task.name: task for task in (DIGITS, FASHION_MNIST, REVIEWS, SHAKESPEARE)}
BUILT_IN = frozenset(TASKS)  # the tasks consortia itself brings


def register_task(task: Task) -> Task:
    """Make a task (your own model and data recipe) known by its name.

    A deployed federation needs it on both sides: list the module that registers it in
    `task_modules` of server.toml and site.toml (it is imported before the config is
    read, in every consortia process), or call this before `join_federation`.
    """
    known = TASKS.get(task.name)
    if known is not None and known is not task:
        raise ValueError(f"a different task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def importable_from(folder) -> None:
    """Let a config's own modules (task_modules, a data hook) sit in the folder that holds
    the config, as its relative paths do: `consortia` started as a console script does not
    have the working directory on sys.path. Appended: installed packages come first."""
    import sys
    from pathlib import Path

    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.append(folder)


def import_task_modules(modules: list[str], key: str) -> None:
    """Import the modules that register a deployment's own tasks (`key` names the config
    entry, for the error)."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"{key}: cannot import {module!r}: {err}") from None


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """The task called `name`, set up with the run's `options` when given."""
    try:
        task = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}") from None
    return task if options is None else task.with_options(options)


__all__ = ["BUILT_IN", "TASKS", "Task", "TaskData", "TaskOptions", "WeightsMismatch", "default_device",
           "get_task", "import_task_modules", "register_task"]
