"""Run the real daemon in a subprocess for tests: fake NOTIFY_SOCKET, logs, clean teardown."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from helpers.process import die_with_parent

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.messages += [(now, line) for line in data.splitlines()]

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if m == line]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class Daemon:
    """``oos_service_manager.py`` in a subprocess of its own session."""

    def __init__(self, data_dir: Path, tmp: Path, env: dict | None = None, watchdog_usec: int | None = None,
                 prefix: tuple[str, ...] = ()):
        """``prefix``: a command to run it under (``ip netns exec NAME``, a host of its own)."""
        self.data_dir, self.tmp, self.prefix = data_dir, tmp, list(prefix)
        self.notify = NotifySocket(tmp)
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.env = dict(os.environ, OOS_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT),
                        OOS_TASK_MODULES="tests.tasks.sample", NOTIFY_SOCKET=self.notify.path,
                        OOS_API_ENABLED="false", OOS_WORKERS_POLL_INTERVAL="0.002",
                        OOS_TEST_LOG=str(tmp / "executions.log"))
        self.env.pop("WATCHDOG_PID", None)
        self.env.pop("WATCHDOG_USEC", None)
        if watchdog_usec:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def start(self, wait_ready: bool = True) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.notify.messages.clear()
        # SIGKILL when the test process dies, however it dies: no daemon outlives its test run.
        self.proc = subprocess.Popen([*self.prefix, sys.executable, str(ROOT / "oos_service_manager.py")], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        if wait_ready:
            wait_for(lambda: "READY=1" in self.notify.lines() or self.proc.poll() is not None, 60,
                     what="READY=1")
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}:\n{self.logs_text()}"
        return self

    def workers(self) -> list[psutil.Process]:
        """The live worker processes (and the API's, when it runs): what the manager started."""
        out = [p for p in started_by(self.proc.pid) if _alive(p)]
        self.seen_pids.update(p.pid for p in out)
        return out

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line})
        return out

    def logs_text(self) -> str:
        return self.log_path.read_text()[-5000:]

    def cleanup(self) -> None:
        """Stop the daemon and anything it left behind: no process outlives a test."""
        try:
            if self.proc and self.proc.poll() is None:
                self.stop(30)
        finally:
            if self.proc:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in self.seen_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.notify.close()
            if hasattr(self, "_log"):
                self._log.close()


def build_shim(source: Path, out_dir: Path) -> Path:
    """Compile an LD_PRELOAD shim of the tests' own (a C file under tests/) into ``out_dir``."""
    out = out_dir / (source.stem + ".so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"], check=True, timeout=120)
    return out


def started_by(manager_pid: int) -> list[psutil.Process]:
    """The processes the daemon's manager started: its workers and its API process, which its
    fork server forked (the fork server and multiprocessing's resource tracker left out)."""
    try:
        children = psutil.Process(manager_pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            command = " ".join(child.cmdline())
            if "forkserver" in command:
                out += child.children()
            elif "resource_tracker" not in command:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
