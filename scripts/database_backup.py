"""Online, verified backup of the OOS database with retention (what cron runs every 6 hours).

    database_backup.py          # same as `oos backup`
    database_backup.py list     # same as `oos backup list`
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oos_cli import cli  # noqa: E402

if __name__ == "__main__":
    cli(["backup", *sys.argv[1:]], prog_name="database_backup.py")
