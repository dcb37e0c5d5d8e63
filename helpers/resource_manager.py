"""How many workers to run: queue depth against machine pressure (psutil).

The manager asks ``decide()`` each tick and reconciles to the target it returns; this module
only decides, it never starts or stops a process.
"""
from __future__ import annotations

import gc
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers.backup import prune_backups
from helpers.config import Config, load_config
from helpers.queue_manager import prune


def disk_used(path: str | Path):
    """(percent used, ``shutil.disk_usage``) of the file system holding ``path``."""
    usage = shutil.disk_usage(path)
    return (usage.used / usage.total * 100 if usage.total else 0.0), usage


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str
    at: float

    def to_dict(self) -> dict:
        return {"target": self.target, "reason": self.reason, "at": self.at}


@dataclass(frozen=True)
class Pressure:
    memory_percent: float
    load1: float
    memory_high: bool
    load_high: bool  # load above the limit for longer than the grace period


class ResourceManager:
    """Scaling policy with hysteresis. ``config`` defaults to the loaded configuration
    (``OOS_DATA_DIR``, the config file, ``OOS_*``). ``probe`` returns (memory percent, 1-minute
    load) and ``clock`` the time; both are injectable for tests."""

    def __init__(self, config: Config | None = None, clock: Callable[[], float] = time.monotonic,
                 probe: Callable[[], tuple[float, float]] | None = None):
        self.config = config or load_config()
        self.clock = clock
        self.probe = probe or (lambda: (psutil.virtual_memory().percent, psutil.getloadavg()[0]))
        self.load_high_since: float | None = None
        self.below_since: float | None = None
        self.last: Decision | None = None

    def check_memory_pressure(self) -> Pressure:
        """Sample memory and load; ``load_high`` only once the load has stayed above the limit
        for ``resources_load_high_seconds``."""
        memory, load1 = self.probe()
        now = self.clock()
        if load1 > self.config.resources_load_high:
            self.load_high_since = now if self.load_high_since is None else self.load_high_since
        else:
            self.load_high_since = None
        sustained = (self.load_high_since is not None
                     and now - self.load_high_since >= self.config.resources_load_high_seconds)
        return Pressure(memory, load1, memory > self.config.resources_memory_high_percent, sustained)

    def calculate_worker_scaling(self, current: int, queue_depth: int, running: int = 0) -> int:
        """The recommended worker count for ``queue_depth`` ready tasks and ``running`` busy
        workers, given ``current``."""
        return self.decide(current, queue_depth, running).target

    def decide(self, current: int, ready: int, running: int = 0) -> Decision:
        """Target = the workers busy now plus one per ``backlog_per_worker`` ready tasks (so a
        long task with work waiting behind it is a reason to add a worker), clamped to
        min..max; up at once, down only after the cooldown; memory pressure blocks growth,
        sustained load lowers the ceiling."""
        c = self.config
        now = self.clock()
        pressure = self.check_memory_pressure()
        need = running + math.ceil(ready / c.workers_backlog_per_worker)
        wanted = max(c.workers_min, min(c.workers_max, need))
        ceiling, why = c.workers_max, (f"{running} running + {ready} ready tasks "
                                       f"({c.workers_backlog_per_worker} ready per worker)")
        if pressure.load_high:
            ceiling = max(c.workers_min, min(current, c.workers_max) - 1)
            why += f"; load {pressure.load1:.1f} > {c.resources_load_high} for {c.resources_load_high_seconds:g} s"
        if pressure.memory_high:
            ceiling = min(ceiling, max(c.workers_min, current))
            why += f"; memory {pressure.memory_percent:.0f}% > {c.resources_memory_high_percent:g}%: no growth"
            gc.collect()
        wanted = min(wanted, ceiling)
        if wanted > current:
            target, self.below_since = wanted, None
            reason = f"scale up to {wanted}: {why}"
        elif wanted < current:
            forced = current > ceiling
            self.below_since = now if self.below_since is None else self.below_since
            if forced or now - self.below_since >= c.workers_scale_down_cooldown:
                target, self.below_since = wanted, None
                reason = f"scale down to {wanted}: {why}"
            else:
                target = current
                reason = (f"hold {current} (cooldown {c.workers_scale_down_cooldown:g} s before "
                          f"scaling down to {wanted}): {why}")
        else:
            target, self.below_since = current, None
            reason = f"hold {current}: {why}"
        self.last = Decision(target, reason, time.time())
        return self.last

    def cleanup_disk_space(self, data_dir: Path | None = None, db=None) -> dict:
        """Above ``resources_disk_high_percent`` used on the data file system: delete what is
        safe (backups beyond retention and interrupted ones, finished tasks and results past
        their retention). Returns usage and what was freed."""
        data_dir = Path(data_dir or self.config.data_dir)
        percent, usage = disk_used(data_dir)
        free = usage.free
        freed, rows = 0, 0
        if percent > self.config.resources_disk_high_percent:
            freed = len(prune_backups(self.config))
            if db is not None:
                rows = prune(db, self.config, time.time())
            freed_bytes = shutil.disk_usage(data_dir).free - free
            return {"percent_used": round(percent, 1), "free_bytes": free, "backups_removed": freed,
                    "rows_pruned": rows, "freed_bytes": max(0, freed_bytes)}
        return {"percent_used": round(percent, 1), "free_bytes": free, "backups_removed": 0,
                "rows_pruned": 0, "freed_bytes": 0}
