"""Task handlers: plain functions registered by name with ``@task``.

```python
from helpers.tasks import task

@task("resize_image", queue="images", max_attempts=5, timeout=60)
def resize_image(payload):
    return {"ok": True}          # stored as the task's result

resize_image.enqueue({"path": "a.png"})   # onto its queue, with its defaults
```
The daemon, its API and the ``oos`` command import the modules named in the config's
``task_modules``, so ``@task``'s ``max_attempts`` and ``timeout`` are the defaults of every task
of that name, however it is enqueued; a value given at enqueue wins and is what the task stores.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helpers.validation import InvalidField, queue_name


@dataclass(frozen=True)
class TaskSpec:
    name: str
    func: Callable[[Any], Any]
    queue: str = "default"
    max_attempts: int | None = None
    timeout: float | None = None

    def enqueue(self, payload: Any = None, **options) -> int:
        """Enqueue a call of this task on its queue, with its attempts and timeout unless
        ``options`` say otherwise."""
        from helpers.queue_manager import get_queue_manager  # the queue imports this registry

        return get_queue_manager(self.queue).enqueue(self.name, payload, **options)


REGISTRY: dict[str, TaskSpec] = {}


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (bad input, missing configuration): the
    task goes to the dead letter at once with this message."""


class TaskModuleError(Exception):
    """A task module could not be imported; the message is one line for the operator."""


def task(name: str, queue: str = "default", max_attempts: int | None = None,
         timeout: float | None = None):
    """Register the decorated function as the handler for tasks called ``name``. The function
    gets ``.enqueue(payload, **options)`` and ``.spec``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidField("task", "expected a non-empty name")
    queue_name(queue)

    def register(func):
        existing = REGISTRY.get(name)
        if existing is not None and existing.func.__qualname__ != func.__qualname__:
            raise ValueError(f"task {name!r}: already registered by {existing.func.__module__}."
                             f"{existing.func.__qualname__}")
        spec = TaskSpec(name, func, queue, max_attempts, timeout)
        REGISTRY[name] = spec
        func.spec = spec
        func.enqueue = spec.enqueue
        return func

    return register


def load_task_modules(modules) -> list[str]:
    """Import every module named (each registers its tasks). Raises TaskModuleError with a
    one-line reason for the first that fails."""
    loaded = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # anything a broken module can raise
            raise TaskModuleError(f"cannot import task module {module!r}: "
                                  f"{type(e).__name__}: {e}".replace("\n", " ")) from e
        loaded.append(module)
    return loaded


def handler_for(name: str) -> TaskSpec | None:
    return REGISTRY.get(name)


def registered_queues() -> set[str]:
    return {spec.queue for spec in REGISTRY.values()}
