"""The browser task against pages served by the test itself on 127.0.0.1: a page whose text is
written by a script (the browser waits for it), links, a screenshot artifact; hosts not allowed
(none by default), a redirect to one, a page too slow; and the task run by the real daemon."""
from __future__ import annotations

import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.queue_manager import QueueManager, TaskFailed
from helpers.registry import PermanentError
from lib.browser import BrowserRefused, PageNeverLoads, PageNotLoaded, fetch
from tests.daemon import Daemon, free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]

PAGE = b"""<!doctype html><html><head><title>OOS test page</title></head><body>
<h1>Hello from the test</h1><p id="later"></p>
<a href="/next">next page</a> <a href="https://example.org/elsewhere">elsewhere</a>
<script>setTimeout(() => { document.getElementById('later').textContent = 'written by a script'; }, 200);</script>
</body></html>"""


class Pages(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(5)
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", "http://localhost:1/elsewhere")
            self.end_headers()
            return
        body = PAGE if self.path in ("/", "/slow") else b"<html><title>next</title><body>next</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_page_is_read_as_a_person_sees_it_with_a_screenshot(site, config):
    allowed = config.replace(browser_hosts=("127.0.0.1",), browser_max_text_chars=40)
    # Scripts ran: their text is there (and "truncated" says the 40-character cut was made).
    page = fetch(site + "/", allowed.replace(browser_max_text_chars=20_000), screenshot=True)
    assert page["title"] == "OOS test page" and page["url"] == site + "/"
    assert "Hello from the test" in page["text"] and "written by a script" in page["text"] and not page["truncated"]
    assert page["links"] == [site + "/next", "https://example.org/elsewhere"]
    with open(page["artifact"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    cut = fetch(site + "/", allowed)
    assert len(cut["text"]) == 40 and cut["truncated"]


def test_hosts_are_refused_unless_allowed_and_a_slow_page_times_out(site, config):
    with pytest.raises(BrowserRefused, match="none allowed"):
        fetch(site + "/", config)  # nothing is allowed by default
    allowed = config.replace(browser_hosts=("127.0.0.1",), browser_timeout=2.0)
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/", "https://example.org/"):
        with pytest.raises(BrowserRefused):
            fetch(url, allowed)
    with pytest.raises(BrowserRefused, match="localhost"):
        fetch(site + "/away", allowed)  # a redirect to a host not allowed is not followed through
    with pytest.raises(TimeoutError, match="did not load within"):
        fetch(site + "/slow", allowed)


@pytest.mark.both_engines
def test_the_browser_task_runs_in_the_daemon(site, data_dir, tmp_path, db, config, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k == "OOS_DATABASE_URL"}
    d = Daemon(data_dir, tmp_path, env=dict(env, OOS_BROWSER_HOSTS="127.0.0.1")).start()
    try:
        queue = QueueManager("browser", db, config)
        result = queue.enqueue("browser.fetch", {"url": site + "/"}).result(timeout=60)
        assert result["title"] == "OOS test page"
        shot = queue.enqueue("browser.screenshot", {"url": site + "/"}).result(timeout=60)
        assert shot["title"] == "OOS test page" and set(shot) == {"url", "title", "artifact"}
        assert open(shot["artifact"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        refused = queue.enqueue("browser.fetch", {"url": "https://example.org/"})
        with pytest.raises(TaskFailed, match="not in browser.hosts"):
            refused.result(timeout=60)
        assert queue.get_task(refused).attempts == 1  # refused for good: not retried
    finally:
        d.cleanup()


def test_the_assistants_fetch_page_tool_reads_through_the_browser(site, config, db):
    import json

    from lib.tools import ToolError, run

    allowed = config.replace(assistant_tools=("fetch_page",), browser_hosts=("127.0.0.1",))
    page = json.loads(run("fetch_page", {"url": site + "/"}, {"id": None, "user_id": None}, allowed, db))
    assert page["title"] == "OOS test page" and "written by a script" in page["text"]
    with pytest.raises(ToolError, match="not in browser.hosts"):
        run("fetch_page", {"url": "https://example.org/"}, {"id": None, "user_id": None}, allowed, db)


def test_a_page_that_cannot_load_is_one_line_and_only_what_may_mend_is_retried(config):
    """Chromium's own error page (a port browsers refuse) is a failure, not a page; a refused
    connection is one line and may be retried; a name that does not resolve is never retried.
    The driver's stack of <unknown> frames is in none of them."""
    allowed = config.replace(browser_hosts=("127.0.0.1", "nothing.invalid"))
    closed = free_port()  # nothing listens there
    cases = [("http://127.0.0.1:1/", PageNeverLoads, "a port browsers refuse (ERR_UNSAFE_PORT)"),
             (f"http://127.0.0.1:{closed}/", PageNotLoaded, "connection refused (ERR_CONNECTION_REFUSED)"),
             ("http://nothing.invalid/", PageNeverLoads, "the host name does not resolve (ERR_NAME_NOT_RESOLVED)")]
    for url, kind, why in cases:
        with pytest.raises(PageNotLoaded) as failed:
            fetch(url, allowed)
        assert type(failed.value) is kind and str(failed.value) == f"cannot load {url}: {why}"
        assert isinstance(failed.value, PermanentError) == (kind is PageNeverLoads)
