"""GitHub, read-only, for the assistant's ``github`` tool: a repository, its issues, one issue
with its comments, an issue search. The token is ``GITHUB_PAT`` in the environment (without it
the tool is not offered); only GET requests are ever made, so even a token with write scopes
cannot change anything through OOS. Retries on 429/5xx, a breaker, and per-remote stats under
``github`` as for the model providers.
"""
from __future__ import annotations

import os
import re
import time

import requests

from helpers.breaker import shared_breaker
from lib import outbound

ACTIONS = ("repo", "issues", "issue", "search_issues")
REPO = re.compile(r"^(?!\.+/)[A-Za-z0-9_.-]{1,100}/(?!\.+$)[A-Za-z0-9_.-]{1,100}$")  # no "." or ".." part
TEXT_CHARS = 2000  # of an issue's body, and 500 of each comment


class Refused(Exception):
    """The call cannot be made as asked (not configured, a bad argument, not found)."""


def configured(env=None) -> bool:
    return bool((os.environ if env is None else env).get("GITHUB_PAT"))


def read(action: str, arguments: dict, config, db, env=None, session: requests.Session | None = None):
    """What GitHub says, trimmed to what a model needs. Refused for a call that cannot be made."""
    token = (os.environ if env is None else env).get("GITHUB_PAT")
    if not token:
        raise Refused("GitHub is not configured (GITHUB_PAT is not set)")
    if action not in ACTIONS:
        raise Refused(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    repo = arguments.get("repo")
    if action != "search_issues" and not (isinstance(repo, str) and REPO.match(repo)):
        raise Refused(f"repo: expected owner/name, got {repo!r}")
    session = session or requests.Session()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "oos-assistant"}
    base = config.assistant_github_base_url.rstrip("/")
    breaker = shared_breaker(db, "remote:github", 5, 60, exclude=[Refused])

    def get(path: str, **params):
        def once():
            response = session.get(base + path, headers=headers, params=params, timeout=(5, 20))
            if response.status_code == 404:
                raise Refused(f"GitHub has no {path.lstrip('/')} (or the token may not see it)")
            if response.status_code in (403, 429) and response.headers.get("X-RateLimit-Remaining") == "0":
                raise Refused("GitHub's rate limit for this token is used up until "
                              f"{time.strftime('%H:%M:%S UTC', time.gmtime(int(response.headers.get('X-RateLimit-Reset', 0))))}")
            return outbound.check(response, "github").json()
        started = time.perf_counter()
        try:
            out = breaker.call(outbound.with_retries, once, attempts=2, max_wait=5)
        except Refused:
            raise
        except Exception as e:
            outbound.record(db, "github", False, error=f"{type(e).__name__}: {e}"[:300])
            raise
        outbound.record(db, "github", True, (time.perf_counter() - started) * 1000)
        return out

    if action == "repo":
        r = get(f"/repos/{repo}")
        return {k: r.get(k) for k in ("full_name", "description", "html_url", "language", "default_branch",
                                      "stargazers_count", "forks_count", "open_issues_count", "updated_at")}
    if action == "issues":
        state = arguments.get("state") or "open"
        if state not in ("open", "closed", "all"):
            raise Refused(f"state: expected open, closed or all, got {state!r}")
        return [_issue(i) for i in get(f"/repos/{repo}/issues", state=state, per_page=10)]
    if action == "issue":
        number = arguments.get("number")
        if isinstance(number, str) and number.isdigit():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise Refused(f"number: expected an issue number, got {number!r}")
        issue = _issue(get(f"/repos/{repo}/issues/{number}"), body=True)
        issue["comments"] = [{"user": (c.get("user") or {}).get("login"), "body": (c.get("body") or "")[:500]}
                             for c in get(f"/repos/{repo}/issues/{number}/comments", per_page=10)]
        return issue
    query = arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        raise Refused("query: required for search_issues, a non-empty string")
    if repo not in (None, "") and not (isinstance(repo, str) and REPO.match(repo)):
        raise Refused(f"repo: expected owner/name (or none, to search all of GitHub), got {repo!r}")
    q = f"{query} repo:{repo}" if repo else query
    return [_issue(i) for i in get("/search/issues", q=q, per_page=10).get("items", [])]


def _issue(i: dict, body: bool = False) -> dict:
    out = {"number": i.get("number"), "title": i.get("title"), "state": i.get("state"),
           "user": (i.get("user") or {}).get("login"), "comments": i.get("comments"),
           "labels": [label.get("name") for label in i.get("labels") or []],
           "pull_request": "pull_request" in i, "html_url": i.get("html_url")}
    if body:
        out["body"] = (i.get("body") or "")[:TEXT_CHARS]
    return out
