"""Structured logging on stderr: JSON lines under systemd or a pipe (journald keeps them), a
human-readable line per event when stderr is a terminal. ``OOS_LOG_FORMAT=json|console``
overrides the guess."""
from __future__ import annotations

import io
import logging
import os
import sys
import warnings

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def is_console() -> bool:
    """True when log lines are for a person at a terminal rather than for journald."""
    chosen = os.environ.get("OOS_LOG_FORMAT", "").lower()
    if chosen in ("json", "console"):
        return chosen == "console"
    return sys.stderr.isatty() and not os.environ.get("JOURNAL_STREAM")


def configure(level: str = "info", **context) -> None:
    """Set up structlog for this process; ``context`` (e.g. ``process="worker"``) is added to
    every line. Call once per process, at start. Python warnings from libraries become log
    lines too, so nothing but log lines reaches stderr."""
    if level not in _LEVELS:
        raise ValueError(f"log level: expected one of {sorted(_LEVELS)}, got {level!r}")
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if is_console()
                else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() per line: on unbuffered stdio (PYTHONUNBUFFERED=1) print() writes the
        # line and its newline apart, and the daemon's processes share one stderr (a pipe,
        # journald's socket): their lines were spliced, "{...}{...}" then a blank line.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # stdout is a pipe or journald's socket, not a terminal, so Python would hold a task
    # handler's print() in an 8 KiB buffer: shown late, or never (workers end by os._exit).
    # Line-buffered, a printed line goes out as it is printed (one write, unless
    # PYTHONUNBUFFERED=1 writes its newline apart).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
    warnings.showwarning = _warning_as_log_line
    # Libraries' own log records (urllib3, waitress...) become log lines too; without a handler
    # Python printed them to stderr as bare text.
    root = logging.getLogger()
    root.handlers = [_RecordAsLogLine()]
    root.setLevel(_LEVELS[level])
    # waitress warns "Task queue depth is N" whenever a request waits for a free thread: under
    # load, dozens of lines a second burying everything else. /metrics' latency shows it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


class _RecordAsLogLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_logger(logger=record.name).log(record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _warning_as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    get_logger().warning("python warning", category=category.__name__, message=str(message),
                         where=f"{filename}:{lineno}")


def get_logger(**context):
    return structlog.get_logger().bind(**context)
