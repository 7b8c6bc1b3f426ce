"""The tasks of the training harness, by name; each generates or loads its data without a network."""

from __future__ import annotations

from globalattn import checks
from globalattn.harness.tasks.base import IGNORE, Task
from globalattn.harness.tasks.listops import ListOps
from globalattn.harness.tasks.mqar import MQAR
from globalattn.harness.tasks.passkey import Passkey
from globalattn.harness.tasks.text import PythonStdlib, Shakespeare

TASKS: dict[str, type[Task]] = {t.name: t for t in (Shakespeare, PythonStdlib, MQAR, ListOps, Passkey)}


def make_task(name: str, context: int, seed: int = 0, *, pack: bool = False, **options) -> Task:
    """Task ``name`` at ``context`` tokens; ``options`` go to its constructor (``Task.options``
    lists the names it takes; it checks their values); ``pack=True``: rows of packed documents
    (the language-model tasks only)."""
    checks.choice("task", name, tuple(TASKS))
    check_options(name, options)
    check_pack(name, pack)
    cls = TASKS[name]
    return cls(context, seed, pack=pack, **options) if cls.packs else cls(context, seed, **options)


def check_pack(name: str, pack: bool) -> None:
    """Refuse ``pack`` for a task whose rows are not documents of text."""
    if pack and not TASKS[name].packs:
        packing = ", ".join(task for task, cls in TASKS.items() if cls.packs)
        raise ValueError(f"--pack packs the documents of the language-model tasks ({packing}), not {name}")


def check_options(name: str, options) -> None:
    """Refuse option names that task ``name`` does not take, naming the ones it does."""
    accepted = TASKS[name].options
    unknown = [option for option in options if option not in accepted]
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise ValueError(f"task {name} has no option {', '.join(map(repr, unknown))}: {takes}")


__all__ = ["IGNORE", "TASKS", "Task", "check_options", "check_pack", "make_task"]
