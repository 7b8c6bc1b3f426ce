"""The tasks of the training harness, by name; each generates or loads its data without a network."""

from __future__ import annotations

from globalattn.tasks.base import IGNORE, Task
from globalattn.tasks.listops import ListOps
from globalattn.tasks.mqar import MQAR
from globalattn.tasks.passkey import Passkey
from globalattn.tasks.text import PythonStdlib, Shakespeare

TASKS: dict[str, type[Task]] = {t.name: t for t in (Shakespeare, PythonStdlib, MQAR, ListOps, Passkey)}


def make_task(name: str, context: int, seed: int = 0) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name](context, seed)


__all__ = ["IGNORE", "TASKS", "Task", "make_task"]
