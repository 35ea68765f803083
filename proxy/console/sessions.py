"""The console's sessions: a signed cookie that every worker and instance with the same admin
token can check (nothing is kept server-side), and a CSRF token derived from it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

COOKIE = "turnstile_console"
LIFETIME = 8 * 3600  # seconds: a session ends a working day after sign-in


class Sessions:
    def __init__(self, admin_token: bytes) -> None:
        # A key of its own, derived from the admin token: a new token ends every session.
        self.key = hmac.new(admin_token, b"turnstile console session", hashlib.sha256).digest() if admin_token else b""

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def new(self, now: float | None = None) -> str:
        body = f"{int((now or time.time()) + LIFETIME)}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def read(self, cookie: str) -> str | None:
        """The session's body if the cookie is ours and not expired, else None."""
        if not self.key or cookie.count(".") != 2:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        expires = body.split(".", 1)[0]
        return body if expires.isdigit() and int(expires) > time.time() else None

    def csrf(self, session: str) -> str:
        return self._sign("csrf." + session)[:32]

    def expires(self, session: str) -> int:
        return int(session.split(".", 1)[0])
