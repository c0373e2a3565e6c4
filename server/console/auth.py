"""The console's bearer token: generated at first start, printed once, stored as a hash.

The token file (mode 0600) holds only the token's SHA-256, so reading it does not give
access; the token itself is shown once, when it is made (first start or `consortia
console token`). A running console re-reads the file when it changes, so a rotation
takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from consortia.privacy.storage import atomic_write_bytes

TOKEN_BYTES = 32  # 256 bits, URL-safe base64


def default_token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "consortia" / "console-token"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenError(RuntimeError):
    pass


class ConsoleToken:
    """Check presented tokens against the hash in `path`; make or rotate the token."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_token_file()
        self._cached: tuple[int, str] | None = None  # (mtime_ns, sha256)

    def exists(self) -> bool:
        return self.path.is_file()

    def rotate(self) -> str:
        """Make a new token, store its hash (0600) and return the token: show it once."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        record = {"sha256": _digest(token), "created_at": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(self.path, (json.dumps(record) + "\n").encode(), mode=0o600)
        except OSError as err:  # a folder, a path under a file, no permission
            raise TokenError(f"cannot write the console token file {self.path}: "
                             f"{err.strerror or err}; give --token-file (or "
                             "$CONSORTIA_CONSOLE_TOKEN_FILE) a file path you can write") from None
        self._cached = None
        return token

    def ensure(self) -> str | None:
        """The new token if none existed yet (to print once), else None."""
        if self.exists():
            self._expected()  # a corrupt file fails at start, not at the first request
            return None
        return self.rotate()

    def _expected(self) -> str:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            raise TokenError(f"console token file {self.path} is missing; "
                             "run `consortia console token` to make one") from None
        if self._cached is None or self._cached[0] != mtime:
            try:
                digest = json.loads(self.path.read_text())["sha256"]
                if not (isinstance(digest, str) and len(digest) == 64
                        and all(c in "0123456789abcdef" for c in digest)):
                    raise ValueError(digest)  # a SHA-256 hex digest is what verify compares
            except (ValueError, KeyError, TypeError):
                raise TokenError(f"console token file {self.path} is not a consortia token "
                                 "file; run `consortia console token` to replace it") from None
            except OSError as err:  # unreadable: a request is refused, not a 500
                raise TokenError(f"cannot read the console token file {self.path}: "
                                 f"{err.strerror or err}") from None
            self._cached = (mtime, digest)
        return self._cached[1]

    def verify(self, presented: str | None) -> bool:
        if not presented:
            return False
        try:
            expected = self._expected()
        except TokenError:
            return False
        return hmac.compare_digest(_digest(presented), expected)
