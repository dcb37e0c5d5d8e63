"""A throw-away PostgreSQL server for tests and benchmarks, from the project's own files.

    .venv/bin/python scripts/pg_server.py [--dir DIR] [--host ADDR]   # prints the URL; Ctrl-C stops it

The binaries come from the pinned ``pgserver`` wheel (requirements-dev.txt), else from the
machine's PostgreSQL (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``). PostgreSQL
refuses to run as root, so as root the server runs as ``nobody``. It listens on a Unix socket
in its directory and, with ``host``, on that TCP address too. The server dies with the process
that started it (a parent-death signal), so a killed test run leaves no server behind; the
next server it makes removes the directory such a run left (``sweep_stale``).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg


def bindir() -> Path | None:
    """Where initdb and postgres are, or None."""
    candidates = []
    spec = importlib.util.find_spec("pgserver")  # found, not imported: its import has side effects
    if spec and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for path in candidates:
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    return None


def reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can reach ``path`` (every directory above it
    searchable by others, as ``nobody`` needs)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.is_dir())


def server_bindir() -> Path | None:
    """``bindir()``, or, when the server must run as ``nobody`` (we are root) and cannot reach
    it (a clone in root's 0700 home), a copy of its installation in a directory it can: made
    once, under the temporary directory, and reused."""
    bins = bindir()
    if bins is None or os.geteuid() != 0 or reachable_by_others(bins):
        return bins
    install = bins.parent
    stamp = f"{install}:{install.stat().st_mtime_ns}".encode()
    copy = Path(tempfile.gettempdir()) / f"oos-pgbin-{hashlib.sha256(stamp).hexdigest()[:12]}"
    # The same layout as in site-packages: the binaries find their libraries (the wheel's
    # pgserver.libs) by a path relative to themselves ($ORIGIN/../../../pgserver.libs).
    inside = Path(install.parent.name) / install.name  # pgserver/pginstall
    if not (copy / inside / "bin" / "postgres").exists():
        partial = Path(tempfile.mkdtemp(prefix="oos-pgbin-partial-"))
        shutil.copytree(install, partial / "site" / inside, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, partial / "site" / libs.name, symlinks=True)
        for directory in [partial / "site", *(partial / "site").rglob("*")]:
            if directory.is_dir():
                os.chmod(directory, 0o755)
        try:
            os.rename(partial / "site", copy)  # atomic: a concurrent maker's copy wins, the same
        except OSError:
            pass
        shutil.rmtree(partial, ignore_errors=True)
    return copy / inside / "bin"


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--pdeathsig=KILL"]


DIR_PREFIX = "oos-pg-"


def sweep_stale(parent: str | os.PathLike | None = None, older_than: float = 600.0) -> list[Path]:
    """Remove the directories of servers made here whose run was killed: no live server in
    them (a killed server leaves its ``postmaster.pid``, naming a dead process) and untouched
    for ``older_than`` seconds (a younger one may be starting). Returns what it removed."""
    removed = []
    for directory in Path(parent or tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        pid_file = directory / "data" / "postmaster.pid"
        try:
            if time.time() - directory.stat().st_mtime < older_than:
                continue
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        except (OSError, ValueError, IndexError):
            continue
        if pid is not None and psutil.pid_exists(pid):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


class PostgresServer:
    """``with PostgresServer(dir) as url:`` a running server; stopped (and its files removed
    when it made the directory) on exit."""

    def __init__(self, directory: str | os.PathLike | None = None, host: str | None = None, port: int = 5432,
                 fsync: bool = True, settings: dict | None = None, prefix: tuple[str, ...] = ()):
        """``host``: also listen on this TCP address; ``prefix``: a command to run the server
        under (``ip netns exec NAME`` puts it in a network namespace)."""
        self.own_dir = directory is None
        if self.own_dir:
            sweep_stale()
        self.dir = Path(directory or tempfile.mkdtemp(prefix=DIR_PREFIX))
        self.host, self.port, self.fsync = host, port, fsync
        self.settings = settings or {}
        self.prefix = list(prefix)
        self._schemas = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def schema_url(self) -> str:
        """The URL of a new, empty schema of its own (each test or benchmark figure starts
        from empty tables without the cost of a new database)."""
        self._schemas += 1
        name = f"s{os.getpid()}_{self._schemas}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return f"{self.url}&options=-csearch_path%3D{name}"

    def tcp_url(self, host: str | None = None) -> str:
        return f"postgresql://postgres@{host or self.host}:{self.port}/postgres"

    def start(self) -> str:
        bins = server_bindir()
        if bins is None:
            raise RuntimeError("no PostgreSQL binaries: install requirements-dev.txt (pgserver) "
                               "or Debian's postgresql")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        if os.geteuid() == 0:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "nobody", "nogroup")
        if not (data / "PG_VERSION").exists():
            made = subprocess.run([*_as_server_user(), str(bins / "initdb"), "-D", str(data), "-U", "postgres",
                                   "-A", "trust", "--no-sync", "-E", "UTF8"], capture_output=True, text=True)
            if made.returncode:
                raise RuntimeError(f"initdb failed: {made.stderr.strip()[-2000:]}")
        options = {"listen_addresses": self.host or "", "unix_socket_directories": str(self.dir),
                   "port": str(self.port), "fsync": "on" if self.fsync else "off",
                   "synchronous_commit": "on" if self.fsync else "off", "full_page_writes": "on" if self.fsync else "off",
                   "max_connections": "200", "shared_buffers": "128MB", **self.settings}
        args = [*self.prefix, *_as_server_user(), str(bins / "postgres"), "-D", str(data)]
        for key, value in options.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.dir / "server.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return self.url
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start:\n{tail}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # immediate shutdown: a test server's data is disposable
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, default=5432)
    args = parser.parse_args()
    server = PostgresServer(args.dir, args.host, args.port)
    print(server.start(), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
