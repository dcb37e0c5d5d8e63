"""Per task name metrics (helpers/task_metrics.py): workers' counts written per minute, added
across workers, percentiles from buckets, the windows, the chart series, the pruning."""
from __future__ import annotations

import pytest

from helpers import history, task_metrics
from helpers.task_metrics import BOUNDS, Tally, quantile, series, summary

pytestmark = pytest.mark.both_engines


def test_quantiles_come_from_the_buckets_as_prometheus_reads_them():
    buckets = [0] * (len(BOUNDS) + 1)
    assert quantile(buckets, 0.5) is None
    buckets[BOUNDS.index(0.1)] = 10  # ten runs in (0.05, 0.1]
    assert quantile(buckets, 0.5) == pytest.approx(0.075)  # halfway into the bucket
    assert quantile(buckets, 1.0) == pytest.approx(0.1)
    buckets[-1] = 90  # ninety above the last bound: "at least 300 s"
    assert quantile(buckets, 0.95) == BOUNDS[-1]


def test_two_workers_counts_are_added_and_windows_percentiles_and_pruning_hold(db, clock):
    a, b = Tally("host:1", clock=clock), Tally("host:2", clock=clock)
    for i in range(100):
        a.add("mail", "send", seconds=0.02 if i < 95 else 2.0, waited=0.004, failed=i % 10 == 0)
    b.add("mail", "send", seconds=0.02, waited=40.0, failed=False)
    b.add("images", "resize", seconds=0.6, waited=0.0, failed=True)
    a.write(db, force=True)
    b.write(db, force=True)
    a.add("mail", "send", seconds=0.02, waited=0.0, failed=False)  # same minute: the row is rewritten, not added
    a.write(db, force=True)
    got = {m["task"]: m for m in summary(db, clock() - 3600)}
    send = got["send"]
    assert (send["queue"], send["runs"], send["failures"]) == ("mail", 102, 10)
    assert 0.01 < send["run_p50"] <= 0.025 and 1.0 < send["run_p99"] <= 2.5
    assert send["run_mean"] == pytest.approx((97 * 0.02 + 5 * 2.0) / 102, abs=1e-6)  # rounded to the µs
    assert send["wait_p50"] <= 0.005 and send["wait_p95"] <= 0.005
    assert got["resize"]["runs"] == 1 and got["resize"]["failures"] == 1 and 0.5 < got["resize"]["run_p50"] <= 1.0
    assert [m["task"] for m in summary(db, clock() - 3600)] == ["send", "resize"]  # busiest first
    # A later minute is a row of its own (the worker forgot the minutes that were over).
    clock.advance(120)
    a.add("mail", "send", seconds=0.02, waited=0.0, failed=False)
    a.write(db)
    assert sum(m["runs"] for m in summary(db, clock() - 3600) if m["task"] == "send") == 103
    assert summary(db, clock() - 30)[0]["runs"] == 1  # the last minute alone
    chart = series(db, clock() - 3600, now=clock())  # every minute of the hour, idle ones too
    assert len(chart["minutes"]) == 61 and chart["minutes"][-1] == clock() // 60 * 60
    assert chart["tasks"]["send"]["runs"][-3:] == [102, 0, 1] and sum(chart["tasks"]["send"]["runs"]) == 103
    assert chart["tasks"]["resize"]["runs"][-3:] == [1, 0, 0] and chart["tasks"]["resize"]["run_p95"][-1] is None
    # Pruned with the queue history, after history.KEEP.
    task_metrics.prune(db, clock() - 60)
    assert [m["runs"] for m in summary(db, clock() - 3600)] == [1]
    assert history.KEEP >= 86_400  # a day's window is always there


def test_a_worker_writes_at_most_every_write_every_seconds(db, clock):
    tally = Tally("host:1", clock=clock)
    tally.add("q", "t", seconds=0.1, waited=0.0, failed=False)
    tally.write(db)  # its first write waits WRITE_EVERY from its start
    assert summary(db, clock() - 60) == []
    clock.advance(task_metrics.WRITE_EVERY)
    tally.write(db)
    assert summary(db, clock() - 60)[0]["runs"] == 1


def test_batched_observations_render_as_the_same_histogram_as_direct_ones():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from helpers.task_metrics import Batched
    values = [0.0, 0.0005, 0.001, 0.003, 0.7, 2.0, 5000.0]  # on a bound, between, past the last
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("t_seconds", "t", ["queue"], buckets=(0.001, 0.01, 1, 10), registry=direct_registry)
    batched = Batched(Histogram("t_seconds", "t", ["queue"], buckets=(0.001, 0.01, 1, 10), registry=batched_registry))
    for v in values:
        direct.labels("q").observe(v)
        batched.observe(("q",), v)
    def samples(registry) -> list[bytes]:
        return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]

    assert b"t_seconds_count" not in generate_latest(batched_registry), "nothing shows before the push"
    batched.push()
    assert samples(batched_registry) == samples(direct_registry)
    batched.push()  # nothing pending: nothing added twice
    assert samples(batched_registry) == samples(direct_registry)
