"""The peer in ``make bench``: huey's consumer running the same no-op task on SqliteHuey with
fsync on (each commit synced, like OOS at synchronous=FULL). ``HUEY_BENCH_DB`` names the file."""
import os

from huey import SqliteHuey

huey = SqliteHuey("bench", filename=os.environ["HUEY_BENCH_DB"],
                  fsync=os.environ.get("HUEY_BENCH_FSYNC", "1") == "1")


@huey.task()
def noop(n):
    return 1
