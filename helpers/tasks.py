"""Task handlers: plain functions registered by name with ``@task``.

```python
from helpers.tasks import task

@task("resize_image", queue="images", max_attempts=5, timeout=60)
def resize_image(payload):
    return {"ok": True}          # stored as the task's result

task_id = resize_image.enqueue({"path": "a.png"})   # onto its queue, with its defaults
task_id.result(timeout=30)                         # wait for it: {"ok": True}

@task("import_rows", bind=True)                    # or a parameter named ``context``, first or after payload
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

import inspect
from typing import Any

from helpers import validation
from helpers.queue_manager import get_queue_manager
from helpers.registry import REGISTRY, PermanentError, TaskContext, TaskSpec  # noqa: F401 (a task module's names)
from helpers.validation import queue_name, rate, task_name
from helpers.workflow import Step


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
        parameters = list(inspect.signature(func).parameters)
        # ``def f(context, payload)`` asks for the context first, as bind=True does;
        # ``def f(payload, context=None)`` by name.
        first = bind or parameters[:1] == ["context"]
        takes_context = not first and "context" in parameters
        spec = TaskSpec(name, func, queue, max_attempts, timeout, first, takes_context, rate_limit)
        REGISTRY[name] = spec
        func.spec = spec
        func.enqueue = lambda payload=None, **options: enqueue(spec, payload, **options)
        func.step = lambda payload=None, **options: step(spec, payload, **options)
        return func

    return register


def enqueue(spec: TaskSpec, payload: Any = None, **options):
    """Enqueue a call of ``spec``'s task on its queue, with its attempts and timeout unless
    ``options`` say otherwise. Returns a TaskRef: the id, with ``.result(timeout=)``."""
    return get_queue_manager(spec.queue).enqueue(spec.name, payload, **options)


def step(spec: TaskSpec, payload: Any = None, **options) -> Step:
    """``spec``'s task as a workflow step (see helpers.workflow)."""
    return Step(spec.name, payload, queue=options.pop("queue", spec.queue), options=options)
