"""Writers of one SQLite file take turns in the kernel (helpers/write_turn.py): real processes,
real flock, real inotify."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import write_turn
from helpers.write_turn import WriteTurns

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from helpers import write_turn
from helpers.write_turn import WriteTurns
with WriteTurns({path!r}).turn(5) as held:
    print("held" if held else "not held", flush=True)
    time.sleep(60)
"""


def no_inotify(**_):
    """As inotify_init when the user's inotify instances are used up."""
    raise OSError(24, "Too many open files")


def hold_in_a_process(path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), path=str(path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_waiter_goes_on_without_the_turn_after_its_wait_and_gets_it_when_the_holder_dies(tmp_path):
    path = tmp_path / "oos.db"
    holder = hold_in_a_process(path)
    try:
        turns = WriteTurns(path)
        with turns.turn(0.2) as held:
            assert not held, "another process holds it: after 0.2 s the write goes on without it"
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with turns.turn(10) as held:
            assert held, "a dead process's turn is given up"
    finally:
        holder.kill()
        holder.wait(10)


def test_threads_take_turns_and_a_waiter_starts_when_the_holder_lets_go(tmp_path):
    turns = WriteTurns(tmp_path / "oos.db")
    order: list[str] = []
    holding, waiting = threading.Event(), threading.Event()

    def first():
        with turns.turn(10) as held:
            order.append(f"first {held}")
            holding.set()
            waiting.wait(10)
            time.sleep(0.2)  # the second thread is blocked meanwhile
            order.append("first lets go")

    def second():
        holding.wait(10)
        waiting.set()
        with turns.turn(10) as held:
            order.append(f"second {held}")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert order == ["first True", "first lets go", "second True"]


def test_a_directory_it_cannot_write_takes_no_turn(tmp_path):
    missing = tmp_path / "no-such-dir" / "oos.db"
    with WriteTurns(missing).turn(1) as held:
        assert not held


def test_a_write_inside_a_write_of_the_same_thread_keeps_the_turn(tmp_path):
    turns, other = WriteTurns(tmp_path / "oos.db"), []

    def try_it():
        with turns.turn(0.2) as held:
            other.append(held)

    with turns.turn(1) as outer:
        with turns.turn(1) as inner:
            assert outer and inner
        waiter = threading.Thread(target=try_it)
        waiter.start()
        waiter.join(10)
        assert other == [False], "the inner write's end did not give the turn away"


def inotify_instances() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += "inotify" in os.readlink(fd)
        except OSError:
            pass
    return count


def test_a_writer_that_never_waits_holds_no_inotify_instance(tmp_path):
    """Instances are counted per user (fs.inotify.max_user_instances, 128 by default): only a
    thread that had to wait for its turn makes one."""
    turns, seen = WriteTurns(tmp_path / "oos.db"), []

    def uncontended():
        before = inotify_instances()
        with turns.turn(1) as held:
            seen.append((held, inotify_instances() - before))

    thread = threading.Thread(target=uncontended)
    thread.start()
    thread.join(10)
    assert seen == [(True, 0)]


def test_a_thread_without_inotify_still_waits_for_its_turn(tmp_path, monkeypatch):
    """Where the user's inotify instances are used up (inotify_init fails as it would), a
    waiter tries every millisecond instead of going without the turn."""
    monkeypatch.setattr(write_turn, "INotify", no_inotify)
    turns, got = WriteTurns(tmp_path / "oos.db"), []
    holding = threading.Event()

    def holder():
        with turns.turn(1):
            holding.set()
            time.sleep(0.3)

    def waiter():
        holding.wait(10)
        with turns.turn(10) as held:
            got.append(held)

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert got == [True]


TRANSACTION_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from helpers.database_config import DatabaseManager
db = DatabaseManager({path!r}, synchronous="FULL", busy_timeout_ms=0, autocheckpoint=1000)
with db.transaction() as conn:
    conn.execute("INSERT INTO notes VALUES (1)")
    print("holding", flush=True)
    time.sleep(0.5)
"""


def test_a_plain_write_that_meets_the_lock_waits_in_the_turns_queue(tmp_path):
    """A statement run by execute() is not known as a write until SQLite says the lock is taken;
    then it waits for its turn (in the kernel: its thread makes its watch) and succeeds."""
    from helpers.database_config import DatabaseManager
    path = tmp_path / "oos.db"
    db = DatabaseManager(path, synchronous="FULL", busy_timeout_ms=0, autocheckpoint=1000)
    db.execute("CREATE TABLE notes (n INTEGER)")
    holder = subprocess.Popen([sys.executable, "-c", TRANSACTION_HOLDER.format(root=str(ROOT), path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = inotify_instances()
        db.execute("INSERT INTO notes VALUES (2)")
        assert inotify_instances() == before + 1, "it waited for its turn, not by polling the lock"
        assert [r[0] for r in db.execute("SELECT n FROM notes ORDER BY n")] == [1, 2]
    finally:
        holder.kill()
        holder.wait(10)
        db.close()
