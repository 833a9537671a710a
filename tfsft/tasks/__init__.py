"""The tasks tfsft fine-tunes for, one module each; `--task NAME` is `TASKS[NAME]`.

A new task is one new module here with a `Task` subclass (reader, label map, head, loss,
metrics, parity rule, Predictor decoding) and one line below; no stage switches on task names.
"""

from __future__ import annotations

from tfsft.errors import ConfigError
from tfsft.tasks import causal_lm, classification, multilabel, ner, qa, regression, seq2seq
from tfsft.tasks.base import IGNORED_LABEL, Task

TASKS: dict[str, Task] = {module.TASK.name: module.TASK for module in (classification, regression, multilabel, ner, qa, causal_lm, seq2seq)}
"""--task name -> its Task, in the order --help lists them."""


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is a ConfigError that lists the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"--task must be one of {list(TASKS)}. Received: task={name!r}") from None


__all__ = ["IGNORED_LABEL", "TASKS", "Task", "get_task"]
