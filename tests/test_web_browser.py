"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver), against a
real daemon serving its API on loopback: log in, watch a queue fill and drain live, replay a
dead task and see it succeed, pause a queue, the read-only login cannot act, a forged form is
refused, replay every matching dead task as a background task, drain a worker. Every page is saved as a screenshot under data/screenshots/ (git-ignored)."""
from __future__ import annotations

import re
import shutil
import time

import pytest
import requests

import tests.tasks.jobs  # noqa: F401 - the handlers' defaults apply to what we enqueue
from helpers import reports
from helpers.queue_manager import QueueManager
from lib.assistant import Assistant
from lib.browser import FLAGS
from tests.daemon import ROOT, Daemon, free_port, wait_for

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                                  "(.ci/run installs them)")]
SHOTS = ROOT / "data" / "screenshots"


@pytest.fixture
def served(data_dir, tmp_path):
    port = free_port()
    d = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port),
                                        "OOS_API_READONLY_TOKEN": "r" * 32, "OOS_WORKERS_MIN": "2",
                                        "OOS_TASK_MODULES": "tests.tasks.sample,tests.tasks.jobs"}).start()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{base}/health", timeout=2).status_code in (200, 503), 60, what="the API")
    yield base, (data_dir / "api_token").read_text().strip()
    d.cleanup()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):  # the browser task's own flags
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def text(driver, element_id: str | None = None) -> str:
    """The page's text (or one element's); "" while a navigation or an htmx swap replaces it.
    (Chromium reports a node swapped out between finding it and reading it as a stale
    element, a missing one, or an "inspector error": all three mean "not there now".)"""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.ID, element_id).text if element_id else driver.find_element(By.TAG_NAME, "body").text
    except (StaleElementReferenceException, NoSuchElementException):
        return ""
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return ""
        raise


def log_in(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/ui/login")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait_for(lambda: "Overview" in text(driver), 20, what="the overview after login")


def click(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']").click()


def click_first(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']")[0].click()


def test_the_dashboard_in_a_browser(served, browser, db, config, tmp_path):
    from selenium.webdriver.common.by import By

    base, token = served
    driver = browser
    driver.get(f"{base}/ui/login")
    shot(driver, "login")
    log_in(driver, base, token)
    queue = QueueManager("default", db, config)

    # A queue fills and drains while the page stays open (htmx swaps the live table every 2 s).
    queue.pause()
    queue.enqueue_many([{"task": "noop", "payload": {"n": i}} for i in range(40)])
    wait_for(lambda: "40" in (t := text(driver, "live")) and "paused" in t, 20, what="the live table to show 40 queued")
    shot(driver, "overview-filled")
    queue.resume()
    wait_for(lambda: queue.stats()["counts"]["queued"] == 0, 60, what="the queue to drain")
    wait_for(lambda: (t := text(driver, "live")) and "paused" not in t, 20, what="the live table to update")
    shot(driver, "overview-drained")

    # A dead task: open it from the dead letter, replay it, see it succeed.
    marker = tmp_path / "marker"
    dead = queue.enqueue("jobs.needs_file", {"path": str(marker)})
    wait_for(lambda: queue.get_task(dead).state == "dead", 30, what="the task to die")
    driver.get(f"{base}/ui/dead")
    shot(driver, "dead-letter")
    driver.find_element(By.LINK_TEXT, str(dead)).click()
    wait_for(lambda: "is missing" in text(driver), 10, what="the dead task's page")
    shot(driver, "task-dead")
    marker.write_text("here")
    click(driver, "Replay")
    wait_for(lambda: queue.get_task(dead).state == "succeeded", 30, what="the replayed task to succeed")
    driver.get(f"{base}/ui/tasks/{dead}")
    wait_for(lambda: "succeeded" in (t := text(driver)) and "found" in t, 10, what="the succeeded task's page")
    shot(driver, "task-replayed")

    # Pause a queue from the Queues page.
    driver.get(f"{base}/ui/queues")
    click(driver, "Pause")
    wait_for(lambda: queue.is_paused(), 10, what="the pause")
    wait_for(lambda: "paused" in text(driver), 10, what="the queue shown paused")
    shot(driver, "queues-paused")
    click(driver, "Resume")
    wait_for(lambda: not queue.is_paused(), 10, what="the resume")
    wait_for(lambda: (t := text(driver)) and "paused" not in t, 10, what="the page after the resume")

    # A forged form (its CSRF token changed) is refused and changes nothing.
    driver.execute_script("document.querySelectorAll('input[name=csrf_token]').forEach(i => i.value = 'forged')")
    click(driver, "Pause")
    wait_for(lambda: "CSRF" in text(driver), 10, what="the CSRF refusal")
    assert not queue.is_paused()

    # Every matching dead task replayed by a background task whose page shows its progress.
    dead = [queue.enqueue("jobs.needs_file", {"path": str(tmp_path / "later"), "n": i}) for i in range(3)]
    wait_for(lambda: all(queue.get_task(i).state == "dead" for i in dead), 30, what="three dead tasks")
    (tmp_path / "later").write_text("here")
    driver.get(f"{base}/ui/dead")
    driver.find_element(By.NAME, "text").send_keys(str(tmp_path / "later"))
    click(driver, "Search")
    wait_for(lambda: "payloads containing" in text(driver) and len(driver.find_elements(By.XPATH, "//td/a")) == 3,
             10, what="the payload search")
    click(driver, "Replay all matching")
    driver.switch_to.alert.accept()  # "Replay every dead task that matches?"
    wait_for(lambda: "3 of 3 replayed" in (t := text(driver)) and "succeeded" in t, 60,
             what="the job's page to show its progress and end (it refreshes itself)")
    shot(driver, "dead-letter-job")
    for task_id in dead:
        wait_for(lambda task_id=task_id: queue.get_task(task_id).state == "succeeded", 30, what="the replayed tasks")

    # Drain a worker from the Workers page: a new one takes its place.
    driver.get(f"{base}/ui/workers")
    before = {w["pid"] for w in reports.daemon_status(db, config)["workers"]}
    click_first(driver, "Drain")
    driver.switch_to.alert.accept()
    wait_for(lambda: "asked to drain" in text(driver), 10, what="the drain flash")
    wait_for(lambda: len(pids := {w["pid"] for w in reports.daemon_status(db, config)["workers"]}) == 2
             and len(pids - before) == 1, 30, what="a new worker in the drained one's place")
    def shown() -> set[int]:
        # a worker's row: its daemon (host:pid), then its pid
        return {int(pid) for pid in re.findall(r"^\S+:\d+ (\d+) ", text(driver, "workers"), re.M)}
    wait_for(lambda: len(shown()) == 2 and shown() != before, 20, what="the live table to show the new worker")
    shot(driver, "workers")

    # The assistant's pages: a conversation with the embedded model, its session and memories.
    chat = Assistant(config, db)
    session = chat.create_session(user_id="ann")
    chat.memories.add("preference", "ann likes short answers", session["id"], "ann")
    posted = chat.post_message(session["id"], "What is the capital of France?")
    wait_for(lambda: chat.reply_to(posted["message_id"]) is not None, 120, what="the embedded model's reply")
    driver.get(f"{base}/ui/assistant")
    driver.find_element(By.LINK_TEXT, session["id"][:12]).click()
    wait_for(lambda: "capital of France" in (t := text(driver)) and "complete" in t, 10, what="the session's page")
    shot(driver, "assistant-session")

    # Per task name: the 40 noops and the dead task's runs, with run time and wait, and the
    # per-minute charts drawn (the workers write their counts every 10 s).
    def metrics_shown():
        driver.get(f"{base}/ui/metrics")
        return "noop" in (table := text(driver, "metrics-hour")) and "jobs.needs_file" in table and table

    hour = wait_for(metrics_shown, 60, interval=2, what="the metrics page to show the tasks that ran")
    row = next(line for line in hour.splitlines() if line.startswith("noop"))
    assert row.split()[1:4] == ["default", "40", "0"] and "ms" in row, row  # queue, runs, failures, times
    wait_for(lambda: driver.execute_script("return window.Chart && Chart.getChart('chart-task-runs') && "
                                           "Chart.getChart('chart-task-runs').data.datasets.length"), 10,
             what="the per-minute chart of runs by task")
    shot(driver, "metrics")
    # Live updates paused from the menu: the overview's table stays as it was, then catches up.
    driver.get(f"{base}/ui/")
    wait_for(lambda: text(driver, "live"), 10, what="the overview")
    click(driver, "Live updates: on")
    wait_for(lambda: "Live updates: paused" in text(driver), 5, what="the toggle to say paused")
    queue.pause()
    frozen = text(driver, "live")
    queue.enqueue_many([{"task": "noop", "payload": {"batch": "paused view"}} for _ in range(7)])
    time.sleep(5)  # two polls' worth: none was sent
    assert text(driver, "live") == frozen
    click(driver, "Live updates: paused")
    wait_for(lambda: (t := text(driver, "live")) and t != frozen, 10, what="the table to catch up")
    queue.resume()
    # Rows ticked in a list, one action for them all.
    stuck = [int(queue.enqueue("noop", delay=3600)) for _ in range(2)]
    driver.get(f"{base}/ui/tasks")
    for task_id in stuck:
        driver.find_element(By.CSS_SELECTOR, f"input[name=ids][value='{task_id}']").click()
    click(driver, "Cancel selected")
    driver.switch_to.alert.accept()
    wait_for(lambda: all(queue.get_task(i).state == "cancelled" for i in stuck), 10, what="the ticked tasks cancelled")
    wait_for(lambda: "cancel of 2 selected tasks: 2 done" in text(driver), 10, what="the flash")
    shot(driver, "tasks-selected-cancelled")
    # The API's document in Swagger UI, from this server alone (no CDN; no inline script).
    driver.get(f"{base}/docs")
    wait_for(lambda: "/api/v1/queue/{name}/tasks" in (t := text(driver)) and "OAS 3.1" in t, 20,
             what="Swagger UI to render the document")
    shot(driver, "docs")
    for page in ("tasks", "schedules", "database", "assistant", "audit"):
        driver.get(f"{base}/ui/{page}")
        assert driver.title.endswith("OOS"), (page, driver.title, text(driver)[:500])
        shot(driver, page)
    wait_for(lambda: "pause" in (t := text(driver)) and "operator" in t, 10, what="the audit log")

    # The read-only login sees but cannot act, even with the button enabled by hand.
    click(driver, "Log out")
    wait_for(lambda: "Log in to OOS" in text(driver), 10, what="the login page after logging out")
    log_in(driver, base, "r" * 32)
    wait_for(lambda: "viewer (read-only)" in text(driver), 10, what="the read-only login")
    driver.get(f"{base}/ui/queues")
    button = driver.find_element(By.XPATH, "//button[normalize-space()='Pause']")
    assert button.get_attribute("disabled") is not None
    driver.execute_script("arguments[0].disabled = false", button)
    button.click()
    wait_for(lambda: "read-only" in (t := text(driver)) and "403" in t, 10, what="the refusal")
    assert not queue.is_paused()
    shot(driver, "read-only-refused")
