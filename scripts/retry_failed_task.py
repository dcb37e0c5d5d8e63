"""Replay dead-lettered tasks: ``retry_failed_task.py TASK_ID`` or ``--all [--queue Q] [--task NAME]``.

A thin entry point over ``oos dlq retry``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oos_cli import cli  # noqa: E402

if __name__ == "__main__":
    cli(["dlq", "retry", *sys.argv[1:]], prog_name="retry_failed_task.py")
