"""The server's bearer token: one secret in $CLOUDLET_HOME/server.token that every client shows."""

import hmac
import logging
import os
import secrets
from pathlib import Path

from cloudlet.errors import ServerError
from cloudlet.home import CloudletHome

LOG = logging.getLogger(__name__)

TOKEN_FILE = "server.token"


def token_path(home: CloudletHome) -> Path:
    return home.path / TOKEN_FILE


def load_or_create_token(path: Path) -> str:
    """The token in `path`, generated (0600, created exclusively) if the file does not exist;
    an existing one that other users may read is refused, not used."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ServerError(
                f"{path} is readable or writable by other users (mode {mode:04o}): anyone who "
                f"reads it controls the server; chmod 600 {path}, or delete it for a new token"
            ) from None
        return read_token(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    LOG.info("generated a new server token in %s", path)
    return read_token(path)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ServerError(f"cannot read the server token from {path}: {exc.strerror}") from None
    if not token:
        raise ServerError(f"{path} is empty: delete it and the server makes a new token")
    return token


def token_matches(offered: str | None, token: str) -> bool:
    """Constant-time comparison, so response times do not leak how much of a guess was right."""
    if offered is None:
        return False
    return hmac.compare_digest(offered.encode(), token.encode())


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None if absent or another scheme."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
