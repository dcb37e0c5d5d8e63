"""A headless browser as a task: load a page the way a person would (scripts run), and return
its title, readable text and links, optionally a PNG screenshot stored as an artifact.

It drives Debian's ``chromium`` through ``chromium-driver`` (Selenium). Secure by default: no
host may be reached until ``[browser] hosts`` lists it; every other host name fails to resolve
inside Chromium (``--host-resolver-rules``), so a page cannot pull in, or redirect to, what is
not allowed, and a final URL on another host is refused. Limits: ``browser.timeout`` seconds
for the page to load, ``browser.max_text_chars`` of text, 200 links.

``browser.fetch`` (queue ``browser``) is the task; the assistant's ``fetch_page`` tool calls
``fetch`` from its own tool task.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from urllib.parse import urlsplit

from helpers.config import Config, load_config
from helpers.registry import PermanentError
from helpers.tasks import task

MAX_LINKS = 200
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-dev-shm-usage", "--window-size=1280,900")


class BrowserRefused(PermanentError):
    """The URL is not allowed, or the browser is not installed: retrying will not help."""


class PageNotLoaded(Exception):
    """Chromium could not load the page (one line: the URL and why); retried as any failure."""


class PageNeverLoads(PageNotLoaded, PermanentError):
    """A failure retrying cannot mend (the name does not resolve, a port browsers refuse)."""


# Chromium's net errors in words; those retrying cannot mend.
NET_ERRORS = {
    "ERR_CONNECTION_REFUSED": "connection refused", "ERR_CONNECTION_RESET": "connection reset",
    "ERR_CONNECTION_TIMED_OUT": "connection timed out", "ERR_ADDRESS_UNREACHABLE": "address unreachable",
    "ERR_NAME_NOT_RESOLVED": "the host name does not resolve", "ERR_UNSAFE_PORT": "a port browsers refuse",
    "ERR_EMPTY_RESPONSE": "the server closed the connection without an answer",
    "ERR_CERT_AUTHORITY_INVALID": "its certificate is not trusted",
}
NEVER_LOADS = {"ERR_NAME_NOT_RESOLVED", "ERR_UNSAFE_PORT", "ERR_CERT_AUTHORITY_INVALID", "ERR_INVALID_URL",
               "ERR_DISALLOWED_URL_SCHEME", "ERR_BLOCKED_BY_CLIENT"}


def not_loaded(url: str, message: str) -> PageNotLoaded:
    """The one-line error for a load that failed with Chromium's ``message`` (a WebDriver error's
    text, or an error page's code): its net error in words, never the driver's stack."""
    found = re.search(r"(?:net::)?(ERR_[A-Z0-9_]+)", message or "")
    code = found[1] if found else None
    why = NET_ERRORS.get(code, code.removeprefix("ERR_").lower().replace("_", " ") if code else
                         (message or "no answer").strip().splitlines()[0][:200])
    kind = PageNeverLoads if code in NEVER_LOADS else PageNotLoaded
    return kind(f"cannot load {url}: {why}" + (f" ({code})" if code else ""))


def allowed_host(url: str, config: Config) -> str:
    """The URL's host if the config allows it; BrowserRefused otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BrowserRefused(f"url: expected an http or https URL, got {url!r}")
    if parts.hostname not in config.browser_hosts:
        raise BrowserRefused(f"url: host {parts.hostname!r} is not in browser.hosts "
                             f"({', '.join(config.browser_hosts) or 'none allowed'})")
    return parts.hostname


def fetch(url: str, config: Config, screenshot: bool = False) -> dict:
    """Load ``url`` and wait for it; returns ``url`` (the final one), ``title``, ``text``
    (cut at the limit, ``truncated`` says so), ``links`` and, with ``screenshot``, the PNG's
    ``artifact`` path. BrowserRefused for a URL not allowed; TimeoutError past the timeout;
    PageNotLoaded (PageNeverLoads when retrying cannot help) when Chromium could not load it,
    whether the driver says so or Chromium shows its own error page."""
    allowed_host(url, config)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise BrowserRefused("the browser is not installed: apt install chromium chromium-driver")
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="oos-browser-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    excluded = ", ".join(f"EXCLUDE {host}" for host in config.browser_hosts)
    options.add_argument(f"--host-resolver-rules=MAP * ~NOTFOUND, {excluded}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(config.browser_timeout)
        driver.set_script_timeout(config.browser_timeout)
        try:
            driver.get(url)
        except TimeoutException:
            raise TimeoutError(f"{url} did not load within browser.timeout = {config.browser_timeout:g} s") from None
        except WebDriverException as e:
            raise not_loaded(url, e.msg or str(e)) from None
        settle(driver, time.monotonic() + config.browser_timeout)
        final = driver.current_url
        allowed_host(final, config)  # a redirect elsewhere is refused, not read
        # Chromium's own error page ("This site can't be reached") is a failure, not the page.
        error_page = driver.execute_script("return document.getElementById('main-frame-error') ? "
                                           "(document.querySelector('.error-code') || {}).textContent || '?' : null")
        if error_page is not None:
            raise not_loaded(url, error_page)
        text = driver.find_element(By.TAG_NAME, "body").text
        links = driver.execute_script(
            "return Array.from(document.querySelectorAll('a[href]'), a => a.href).slice(0, arguments[0])", MAX_LINKS)
        out = {"url": final, "title": driver.title, "text": text[:config.browser_max_text_chars],
               "truncated": len(text) > config.browser_max_text_chars, "links": links}
        if screenshot:
            artifacts = config.data_dir / "artifacts"
            artifacts.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = artifacts / f"screenshot-{uuid.uuid4().hex[:12]}.png"
            driver.save_screenshot(str(path))
            out["artifact"] = str(path)
        return out
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def settle(driver, deadline: float, quiet: float = 0.3, most: float = 5.0) -> None:
    """Wait until the document has loaded and its text has stopped changing for ``quiet``
    seconds (scripts that write the page after load have run), at most ``most`` seconds."""
    deadline = min(deadline, time.monotonic() + most)
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        state, size = driver.execute_script("return [document.readyState, document.body ? "
                                            "document.body.innerText.length : 0]")
        if (state, size) != last:
            last, since = (state, size), time.monotonic()
        elif state == "complete" and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


@task("browser.fetch", queue="browser", max_attempts=2, timeout=120)
def fetch_task(payload: dict) -> dict:
    """``{"url": ..., "screenshot": false}`` -> what ``fetch`` returns."""
    if not isinstance(payload, dict) or not isinstance(payload.get("url"), str):
        raise BrowserRefused('payload: expected {"url": "...", "screenshot": false}')
    return fetch(payload["url"], load_config(), bool(payload.get("screenshot")))


@task("browser.screenshot", queue="browser", max_attempts=2, timeout=120)
def screenshot_task(payload: dict) -> dict:
    """``{"url": ...}`` -> the final ``url``, ``title`` and ``artifact``: the PNG's path."""
    if not isinstance(payload, dict) or not isinstance(payload.get("url"), str):
        raise BrowserRefused('payload: expected {"url": "..."}')
    page = fetch(payload["url"], load_config(), screenshot=True)
    return {k: page[k] for k in ("url", "title", "artifact")}
