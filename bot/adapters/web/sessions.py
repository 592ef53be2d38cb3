"""Web sessions as signed cookies, so they survive a restart: the signing key lives in the state dir (mode 0600).

A session names the web user: a per-browser id (`b-…`, local mode without a password), a login name (`alice`), or
`@name` for someone who logged in with the admin password (a form no login name can take, so a page user can never
become an admin by picking a name). Standard-library HMAC-SHA256: the format is four fields, small enough that a
signing library would add a dependency without removing code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COOKIE = "drawbot_session"
MAX_AGE = 30 * 24 * 3600
LOGIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@dataclass(frozen=True)
class Visitor:
    user_id: str
    """The web user's id: `b-<hex>`, a login name, or `@name` (admin)."""
    issued_at: float

    @property
    def is_admin(self) -> bool:
        return self.user_id.startswith("@")

    @property
    def name(self) -> str:
        return self.user_id.lstrip("@") if not self.user_id.startswith("b-") else "this browser"


def load_key(state_dir: Path) -> bytes:
    """The signing key, made once (random, 0600) and kept, so cookies stay valid across restarts."""
    path = state_dir / "web-session.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    os.replace(tmp, path)
    return key


class Sessions:
    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time):
        self._key = key
        self._clock = clock

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, user_id: str) -> tuple[str, Visitor]:
        visitor = Visitor(user_id, self._clock())
        payload = f"v1|{user_id}|{int(visitor.issued_at)}"
        return f"{payload}|{self._sign(payload)}", visitor

    def new_browser(self) -> tuple[str, Visitor]:
        return self.issue("b-" + secrets.token_hex(8))

    def read(self, cookie: str | None) -> Visitor | None:
        """The visitor a cookie names, or None when it is missing, forged, malformed or older than MAX_AGE."""
        if not cookie or len(cookie) > 200:
            return None
        payload, _, signature = cookie.rpartition("|")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        version, user_id, issued = (payload.split("|") + ["", "", ""])[:3]
        if version != "v1" or not issued.isdigit() or self._clock() - int(issued) > MAX_AGE:
            return None
        if not (user_id.startswith("b-") or LOGIN_NAME.fullmatch(user_id.lstrip("@"))):
            return None
        return Visitor(user_id, float(issued))
