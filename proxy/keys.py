"""API keys: how a caller presents one, how one is made, and the hash that is all the store keeps of it."""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Mapping

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


MOST_USD = Decimal(10) ** 9  # larger amounts are mistakes, and would overflow the store's integers


def to_micros(usd: str | float | Decimal) -> int:
    """Micro-dollars of a USD amount; ArithmeticError for what is not a finite amount within a
    billion (NaN, 1e400, "lots")."""
    amount = Decimal(str(usd))
    if not amount.is_finite() or abs(amount) > MOST_USD:
        raise ArithmeticError(f"not an amount: {usd!r}")
    return int((amount * MICROS).to_integral_value())


def usd_text(micros: int) -> str:
    """Micro-dollars as USD, exactly, without trailing zeros (`5`, `0.1234567`)."""
    text = format(Decimal(micros) / MICROS, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _printable(text: str) -> bool:
    return len(text) <= 200 and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def clean_name(name: object) -> str:
    """A key's name as the API and the command take it: up to 200 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise SettingsError("name: a non-empty string")
    if not _printable(name):
        raise SettingsError("name: at most 200 characters, none of them control or formatting characters")
    return name.strip()


@dataclass(slots=True)
class Account:
    id: int
    name: str
    balance_micros: int
    created_at: float
    revoked_at: float | None = None
    key_hint: str = ""
    settings: KeySettings | None = None  # None: nothing set

    def expired(self, now: float) -> bool:
        settings = self.settings
        return settings is not None and settings.expires_at is not None and now >= settings.expires_at

    @property
    def balance(self) -> float:
        """USD, for display only: arithmetic stays in integer micro-dollars."""
        return self.balance_micros / 1_000_000


# A key's settings: budgets, limits, model lists, expiry and metadata. All optional; a key without
# any has `settings = None` and costs nothing more per request.

_CALENDAR = {"day", "week", "month"}
_UNITS = {"m": 60, "h": 3600, "d": 86400}


class SettingsError(ValueError):
    """A setting that cannot be understood; the message says which and why."""


@dataclass(slots=True, frozen=True)
class Budget:
    """At most `micros` spent per window: a calendar `day`, `week` (from Monday) or `month` (UTC),
    or a sliding window of `<n>m`, `<n>h` or `<n>d`."""

    micros: int
    window: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        """`5/day`, `100/month`, `2.50/24h`."""
        amount, _, window = text.partition("/")
        try:
            micros = to_micros(amount) if re.fullmatch(r"[0-9]+(\.[0-9]+)?", amount) else 0
        except ArithmeticError:
            raise SettingsError(f"budget {text!r}: give USD/window, e.g. 5/day or 100/month or 1/24h") from None
        if micros <= 0 or not (window in _CALENDAR or _sliding(window)):
            raise SettingsError(f"budget {text!r}: give USD/window, e.g. 5/day or 100/month or 1/24h "
                                "(windows: day, week, month in UTC, or a sliding <n>m, <n>h, <n>d)")
        return cls(micros, window)

    def __str__(self) -> str:
        return f"{usd_text(self.micros)}/{self.window}"

    @property
    def sliding(self) -> bool:
        return self.window not in _CALENDAR

    def start(self, now: float) -> float:
        """Where the window that holds `now` begins."""
        seconds = _sliding(self.window)
        if seconds:
            return now - seconds
        today = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.window == "week":
            today -= dt.timedelta(days=today.weekday())
        elif self.window == "month":
            today = today.replace(day=1)
        return today.timestamp()

    def resets(self, now: float, oldest: float | None = None) -> float:
        """When spending starts again from nothing (calendar), or when the oldest spend in the
        window leaves it (sliding)."""
        seconds = _sliding(self.window)
        if seconds:
            return (oldest if oldest is not None else now) + seconds
        start = dt.datetime.fromtimestamp(self.start(now), dt.timezone.utc)
        if self.window == "day":
            end = start + dt.timedelta(days=1)
        elif self.window == "week":
            end = start + dt.timedelta(days=7)
        else:
            end = (start + dt.timedelta(days=32)).replace(day=1)
        return end.timestamp()


def _sliding(window: str) -> int:
    """The length in seconds of a sliding window (`30m`, `24h`, `7d`); 0 when it is not one."""
    number, unit = window[:-1], window[-1:]
    if unit in _UNITS and re.fullmatch(r"[0-9]{1,6}", number) and 0 < int(number) * _UNITS[unit] <= 400 * 86400:
        return int(number) * _UNITS[unit]
    return 0


@dataclass(slots=True)
class KeySettings:
    budgets: tuple[Budget, ...] = ()
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute, counted from usage as it is recorded
    concurrency: int | None = None  # requests in flight at once
    allow: tuple[str, ...] = ()  # model id patterns (fnmatch: anthropic/*); empty = every model
    deny: tuple[str, ...] = ()
    expires_at: float | None = None
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def empty(self) -> bool:
        return self == KeySettings()

    def to_json(self) -> dict[str, Any]:
        """What is set, as the admin API and the store show it."""
        out: dict[str, Any] = {}
        if self.budgets:
            out["budgets"] = [str(b) for b in self.budgets]
        for name in ("rpm", "tpm", "concurrency"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.allow:
            out["allow"] = list(self.allow)
        if self.deny:
            out["deny"] = list(self.deny)
        if self.expires_at is not None:
            out["expires_at"] = iso(self.expires_at)
        if self.owner:
            out["owner"] = self.owner
        if self.tags:
            out["tags"] = dict(self.tags)
        return out

    @classmethod
    def from_json(cls, data: Any) -> KeySettings:
        """From the admin API's or the store's JSON; SettingsError naming what is wrong."""
        if not isinstance(data, dict):
            raise SettingsError("settings must be a JSON object")
        known = {"budgets", "rpm", "tpm", "concurrency", "allow", "deny", "expires_at", "owner", "tags"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls().merged(data)

    def merged(self, data: dict[str, Any]) -> KeySettings:
        """These settings with `data`'s laid over them (a key set to null is cleared)."""
        values = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        for name, value in data.items():
            if name not in values:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _setting(name, value)
        return KeySettings(**values)

    def allows(self, model: str) -> bool:
        if self.deny and any(fnmatch.fnmatchcase(model, p) for p in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(model, p) for p in self.allow)


def _setting(name: str, value: Any) -> Any:
    default = getattr(KeySettings(), name)
    if value is None:
        return default
    if name == "budgets":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError("budgets: a list of USD/window strings, e.g. [\"5/day\", \"100/month\"]")
        return tuple(Budget.parse(v) for v in value)
    if name in ("rpm", "tpm", "concurrency"):
        if type(value) is not int or not 1 <= value <= 10**9:
            raise SettingsError(f"{name}: a whole number from 1 to 1000000000")
        return value
    if name in ("allow", "deny"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SettingsError(f"{name}: a list of model id patterns, e.g. [\"anthropic/*\"]")
        return tuple(value)
    if name == "expires_at":
        if not isinstance(value, str):
            raise SettingsError("expires_at: an ISO 8601 time, e.g. 2027-01-01T00:00:00Z")
        return parse_time(value)
    if name == "owner":
        if not isinstance(value, str):
            raise SettingsError("owner: a string")
        return value
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                                              and _printable(k) and _printable(v) for k, v in value.items()):
        raise SettingsError("tags: an object of string values whose names have no '=', e.g. {\"team\": \"search\"}")
    return dict(value)


def parse_time(text: str) -> float:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        stamp = when.timestamp()
        if not 0 <= stamp < 253402300800:  # 1970 to 9999, which every store and clock can hold
            raise ValueError
    except (ValueError, OverflowError):
        raise SettingsError(f"not a time: {text!r} (ISO 8601 from 1970 to 9999, e.g. 2027-01-01T00:00:00Z)") from None
    return stamp


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_settings(text: str | None) -> KeySettings | None:
    """The store's column: None when nothing is set (the common case, checked by one comparison)."""
    if not text or text == "{}":
        return None
    import orjson

    settings = KeySettings.from_json(orjson.loads(text))
    return None if settings.empty() else settings


def dump_settings(settings: KeySettings | None) -> str:
    import orjson

    return orjson.dumps(settings.to_json()).decode() if settings is not None else "{}"
