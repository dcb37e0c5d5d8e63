"""Show the daemon's workers and its last scaling decision: ``worker_scaler.py [--json]``.

A thin entry point over ``oos workers``; to move the target by hand send the daemon SIGTTIN
(one more) or SIGTTOU (one fewer).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oos_cli import cli  # noqa: E402

if __name__ == "__main__":
    as_json = ["--json"] if "--json" in sys.argv[1:] else []
    cli([*as_json, "workers"], prog_name="worker_scaler.py")
