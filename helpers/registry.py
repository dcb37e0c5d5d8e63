"""The handler's contract and the registry of handlers by name.

A handler is a plain function registered under a task name (``helpers.tasks.task`` is the
decorator). What it may raise to say something to the queue (``PermanentError``), what the
worker raises inside it (``TaskTimeout``, ``TaskCancelled``) and what it is given when it asks
(``TaskContext``) live here, below the queue, so the queue, the worker and a task module all
read them from one place without importing each other.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


class TaskTimeout(BaseException):
    """Raised inside a handler that ran past its timeout. A BaseException so that a handler's
    own ``except Exception`` cannot swallow it."""


class TaskCancelled(BaseException):
    """Raised inside a handler still running ``workers.cancel_grace`` seconds after a cancel
    was asked (a BaseException, like TaskTimeout; by SIGUSR2, so a timer's SIGALRM is never
    taken for it)."""


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


PUBLISH = """INSERT INTO handlers (name, queue, max_attempts, timeout, updated_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, max_attempts = excluded.max_attempts,
    timeout = excluded.timeout, updated_at = excluded.updated_at"""


def publish(db) -> None:
    """Write every registered handler's queue and declared attempts and timeout to the
    database (the daemon does, at start and on reload), so an enqueue from a process that never
    imported the handler gets them too."""
    now = time.time()
    with db.transaction() as conn:
        for spec in REGISTRY.values():
            conn.execute(PUBLISH, (spec.name, spec.queue, spec.max_attempts, spec.timeout, now))
