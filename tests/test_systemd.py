"""The unit for real: `make install` inside a throw-away systemd (shared/tools/systemd-ns),
READY, an enqueue through the API, the watchdog restarting a frozen manager with no task lost,
the sandbox, and a clean stop."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.daemon import ROOT

BOOT = ROOT.parent / "shared" / "tools" / "systemd-ns" / "boot_systemd_ns.sh"
WHEELS = ROOT / "data" / ".wheels"
PY = "/opt/oos/venv/bin/python"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="booting systemd in namespaces needs root"),
              pytest.mark.skipif(not BOOT.exists(), reason=f"{BOOT} is not here")]

DROP_IN = """[Service]
WatchdogSec=3s
Environment=OOS_TASK_MODULES=tests.tasks.sample,tests.tasks.probe
"""
# The namespace sees the host's / copy-on-write, except /tmp, /run and /dev, which are its own:
# a checkout there is bound in.
BINDS = str(ROOT) if str(ROOT).startswith(("/tmp/", "/run/", "/dev/")) else ""

API = r"""
import json, sys, time, requests
token = open("/var/lib/oos/api_token").read().strip()
h = {"Authorization": "Bearer " + token}
base = "http://127.0.0.1:8080"
cmd = sys.argv[1]
if cmd == "enqueue":
    r = requests.post(base + "/api/v1/queue/" + sys.argv[2] + "/tasks", json=json.loads(sys.argv[3]), headers=h, timeout=10)
    print(json.dumps(r.json())); sys.exit(r.status_code not in (200, 201))
if cmd == "wait":
    ids, deadline = json.loads(sys.argv[2]), time.time() + float(sys.argv[3])
    while time.time() < deadline:
        try:
            got = [requests.get(base + "/api/v1/tasks/%d" % i, headers=h, timeout=5).json() for i in ids]
            if all(t.get("state") in ("succeeded", "dead") for t in got):
                print(json.dumps(got)); sys.exit(0)
        except requests.RequestException:
            pass
        time.sleep(0.3)
    print("timeout"); sys.exit(1)
"""


class Machine:
    def __init__(self, state_dir):
        self.state_dir = str(state_dir)

    def run(self, *args, timeout=120, check=True):
        done = subprocess.run(["bash", str(BOOT), *args], capture_output=True, text=True, timeout=timeout + 30,
                              env=dict(os.environ, PROBE_EXEC_TIMEOUT=str(timeout)))
        if check and done.returncode != 0:
            raise AssertionError(f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def sh(self, command, **kwargs):
        return self.run("exec", self.state_dir, "sh", "-c", command, **kwargs)

    def api(self, *args, timeout=60):
        return json.loads(self.sh(f"{PY} -c {shlex.quote(API)} " + " ".join(shlex.quote(a) for a in args),
                                  timeout=timeout))

    def prop(self, name):
        return self.sh(f"systemctl show -p {name} --value oos.service").strip()


@pytest.fixture
def machine(tmp_path):
    WHEELS.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS), "-r",
                          str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=600)
    if got.returncode != 0:
        pytest.skip(f"cannot fetch the wheels to install from: {got.stderr.strip()[-300:]}")
    m = Machine(tmp_path / "sd")
    up = subprocess.run(["bash", str(BOOT), "up", m.state_dir], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PROBE_BINDS=BINDS))
    if up.returncode != 0:
        pytest.skip(f"systemd does not boot in namespaces here: {(up.stderr or up.stdout).strip()[-300:]}")
    try:
        yield m
    finally:
        subprocess.run(["bash", str(BOOT), "down", m.state_dir], capture_output=True, timeout=120)


def test_installed_unit_under_real_systemd(machine):
    m = machine
    m.sh(f"cd {ROOT} && make install WITH_LOCAL_MODEL=0 PIP_OPTS='--no-index --find-links {WHEELS}'", timeout=600)
    # The test's task modules go beside the installed code (the service cannot see a checkout
    # under /tmp: PrivateTmp=); this namespace's file system is thrown away afterwards.
    m.sh(f"mkdir -p /opt/oos/app/tests && cp -r {ROOT}/tests/tasks /opt/oos/app/tests/ && "
         "touch /opt/oos/app/tests/__init__.py")
    m.sh("mkdir -p /etc/systemd/system/oos.service.d && cat > /etc/systemd/system/oos.service.d/test.conf "
         f"<< 'EOF'\n{DROP_IN}EOF\nsystemctl daemon-reload")
    m.sh(f"make -C {ROOT} install WITH_LOCAL_MODEL=0 PIP_OPTS='--no-index --find-links {WHEELS}' >/dev/null",
         timeout=600)  # a second install is harmless
    # Type=notify: returns once READY=1 arrived; a failed start shows why.
    m.sh("systemctl start oos.service || { journalctl -u oos --no-pager | tail -30; exit 1; }", timeout=120)
    assert m.prop("ActiveState") == "active" and m.prop("SubState") == "running"
    assert "workers" in m.prop("StatusText")
    main_pid = m.prop("MainPID")
    assert m.sh(f"ps -o user= -p {main_pid}").strip() == "oos"

    # The sandbox, seen from a task running inside the service.
    paths = ["/var/lib/oos", "/var/log/oos", "/tmp", "/opt/oos/app", "/etc/oos", "/usr/local/bin", "/root", "/home"]
    probe = m.api("enqueue", "probe", json.dumps({"task": "probe.write", "payload": {"paths": paths}}))["ids"]
    result = m.api("wait", json.dumps(probe), "60")[0]["result"]
    assert result["uid"] != 0 and result["euid"] != 0
    writes = result["writes"]
    assert writes["/var/lib/oos"] == writes["/var/log/oos"] == writes["/tmp"] == "ok"
    for path in ("/opt/oos/app", "/etc/oos", "/usr/local/bin", "/root", "/home"):
        assert writes[path] != "ok", f"the service could write to {path}"

    # Freeze the manager: the watchdog restarts it, and every task still finishes.
    ids = m.api("enqueue", "default", json.dumps({"tasks": [{"task": "sleepy", "payload": {"n": i, "seconds": 0.5},
                                                           "max_attempts": 10} for i in range(20)]}))["ids"]
    m.sh(f"kill -STOP {main_pid}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if m.prop("NRestarts") not in ("", "0") and m.prop("ActiveState") == "active" and m.prop("MainPID") != main_pid:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the watchdog did not restart the frozen manager: " + m.sh("journalctl -u oos --no-pager | tail -20"))
    done = m.api("wait", json.dumps(ids), "120", timeout=150)
    assert [t["state"] for t in done] == ["succeeded"] * 20

    m.sh("systemctl stop oos.service", timeout=120)
    assert m.prop("Result") == "success", m.sh("journalctl -u oos --no-pager | tail -20")
    assert m.prop("ActiveState") == "inactive"
