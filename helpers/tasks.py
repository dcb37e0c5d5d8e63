"""Task handlers: plain functions registered by name with ``@task``.

```python
from helpers.tasks import task

@task("resize_image", queue="images", max_attempts=5, timeout=60)
def resize_image(payload):
    return {"ok": True}          # stored as the task's result

task_id = resize_image.enqueue({"path": "a.png"})   # onto its queue, with its defaults
task_id.result(timeout=30)                         # wait for it: {"ok": True}

@task("import_rows", bind=True)                    # or a parameter named ``context``
def import_rows(context, payload):
    for i, row in enumerate(payload["rows"]):
        if context.cancelled():                    # someone asked to cancel it: stop cleanly
            return None
        context.progress(i / len(payload["rows"]), f"row {i}")
```
The daemon, its API and the ``oos`` command import the modules named in the config's
``task_modules``, so ``@task``'s ``max_attempts`` and ``timeout`` are the defaults of every task
of that name, however it is enqueued; a value given at enqueue wins and is what the task stores.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers import validation
from helpers.validation import queue_name, rate, task_name


@dataclass(frozen=True)
class TaskSpec:
    name: str
    func: Callable[..., Any]
    queue: str = "default"
    max_attempts: int | None = None
    timeout: float | None = None
    bind: bool = False  # the handler is called ``func(context, payload)``
    takes_context: bool = False  # ... or ``func(payload, context=context)``
    rate_limit: str | None = None  # e.g. "10/s": applied to the database when the daemon starts

    def enqueue(self, payload: Any = None, **options) -> int:
        """Enqueue a call of this task on its queue, with its attempts and timeout unless
        ``options`` say otherwise. Returns a TaskRef: the id, with ``.result(timeout=)``."""
        from helpers.queue_manager import get_queue_manager  # the queue imports this registry

        return get_queue_manager(self.queue).enqueue(self.name, payload, **options)

    def step(self, payload: Any = None, **options):
        """This task as a workflow step (see helpers.workflow)."""
        from helpers.workflow import Step

        return Step(self.name, payload, queue=options.pop("queue", self.queue), options=options)

    def call(self, payload: Any, context: TaskContext | None) -> Any:
        """Run the handler the way it asked to be called (``context``: None unless it asked
        for one)."""
        if self.bind:
            return self.func(context, payload)
        if self.takes_context:
            return self.func(payload, context=context)
        return self.func(payload)


@dataclass
class TaskContext:
    """What a handler that asked for it (``@task(bind=True)`` or a ``context`` parameter) is
    given. ``results``: the results of the workflow steps it runs after, in order."""
    id: int
    name: str
    queue: str
    attempt: int
    max_attempts: int
    results: list = field(default_factory=list)
    _progress: Callable[[float, str | None], Any] = lambda fraction, message: None
    _heartbeat: Callable[[], bool] = lambda: True
    _cancelled: Callable[[], bool] = lambda: False

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Store how far the task is (0 to 1) and what it does now; the API and ``oos task``
        show it. ValueError for a fraction outside 0..1."""
        self._progress(fraction, message)

    def heartbeat(self) -> bool:
        """Still alive: the lease and the time limit start again from now (``timeout`` more
        seconds). False when the lease was already lost (another worker may run the task)."""
        return self._heartbeat()

    def cancelled(self) -> bool:
        """True once someone asked to cancel this task: return soon. A handler that does not
        is interrupted after ``workers.cancel_grace`` seconds. Either way the task ends
        ``cancelled`` and is not retried."""
        return self._cancelled()


REGISTRY: dict[str, TaskSpec] = {}


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (bad input, missing configuration): the
    task goes to the dead letter at once with this message."""


class TaskModuleError(Exception):
    """A task module could not be imported; the message is one line for the operator."""


def task(name: str, queue: str = "default", max_attempts: int | None = None,
         timeout: float | None = None, bind: bool = False, rate_limit: str | None = None):
    """Register the decorated function as the handler for tasks called ``name``. The function
    gets ``.enqueue(payload, **options)``, ``.step(payload, **options)`` and ``.spec``.
    ``bind``: call it with a TaskContext first. ``rate_limit``: "N/s", "N/min" or "N/h", for
    every worker together."""
    task_name(name)
    queue_name(queue)
    # Bad options fail at import, not at the first enqueue or run.
    if max_attempts is not None:
        validation.max_attempts(max_attempts)
    if timeout is not None:
        validation.timeout(timeout)
    if rate_limit is not None:
        rate(rate_limit, "rate_limit")

    def register(func):
        existing = REGISTRY.get(name)
        if existing is not None and existing.func.__qualname__ != func.__qualname__:
            raise ValueError(f"task {name!r}: already registered by {existing.func.__module__}."
                             f"{existing.func.__qualname__}")
        takes_context = not bind and "context" in inspect.signature(func).parameters
        spec = TaskSpec(name, func, queue, max_attempts, timeout, bind, takes_context, rate_limit)
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
