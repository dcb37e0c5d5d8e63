"""Who may call the API and who answers it, without Flask (the daemon's manager reads these
and should not load the web stack): the tokens, generated once into the data directory, and
the header that names the API process that answered.
"""
from __future__ import annotations

import hmac
import os
import secrets

from helpers.config import Config

TOKEN_FILE = "api_token"
READONLY_TOKEN_FILE = "api_readonly_token"  # the dashboard's read-only role: sees, cannot act
# The header every answer of the API carries: the nonce its daemon started it with, so the
# daemon knows its own child answers and not another server holding the port.
INSTANCE_HEADER = "X-OOS-Instance"


def load_or_create_token(config: Config, read_only: bool = False) -> str:
    """The configured token, else the one in ``<data_dir>/api_token``, created (mode 0600) on
    first use. ``read_only``: the read-only token (``api.readonly_token``, ``api_readonly_token``)."""
    configured = config.api_readonly_token if read_only else config.api_token
    if configured:
        return configured
    path = config.data_dir / (READONLY_TOKEN_FILE if read_only else TOKEN_FILE)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    config.data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its token
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
