"""API keys: how a caller presents one, how one is made, and the hash that is all the store keeps of it."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Mapping

from proxy.errors import GatewayError

KEY_PREFIX = "tsk_"
MICROS = Decimal(1_000_000)
ANONYMOUS = "anonymous"


def bearer_token(header: str | None) -> str | None:
    """The caller's key from an Authorization header, or None when the caller is anonymous (no
    header, an empty one, or `Bearer anonymous`). Raises for a header that is not a bearer key."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        if not header.strip():
            return None
        raise invalid_key()
    if not token or token == ANONYMOUS:
        return None
    return token


def caller_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key: `x-api-key` (Anthropic's clients; preferred when both are sent), else the
    bearer token. None for an anonymous caller."""
    key = headers.get("x-api-key")
    if key is not None:
        key = key.strip()
        return None if not key or key == ANONYMOUS else key
    return bearer_token(headers.get("Authorization"))


def invalid_key() -> GatewayError:
    return GatewayError(401, "invalid_api_key", "Invalid API key.", code="invalid_api_key")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A new key, its hash and its hint (enough to tell keys apart, too little to use). The key is
    shown once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key), key[:4] + "…" + key[-4:]


def to_micros(usd: str | float | Decimal) -> int:
    return int((Decimal(str(usd)) * MICROS).to_integral_value())


@dataclass(slots=True)
class Account:
    id: int
    name: str
    balance_micros: int
    created_at: float
    revoked_at: float | None = None
    key_hint: str = ""

    @property
    def balance(self) -> float:
        """USD, for display only: arithmetic stays in integer micro-dollars."""
        return self.balance_micros / 1_000_000
