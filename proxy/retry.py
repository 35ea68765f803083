"""When and how long to wait before trying an upstream again, and which models to fall back to."""

from __future__ import annotations

import email.utils
import random
import time
from typing import Any

from proxy.config import UpstreamSettings
from proxy.context import Context

RETRYABLE = frozenset({429, 500, 502, 503, 504, 529})


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def delay(settings: UpstreamSettings, attempt: int, header: str | None = None) -> float:
    asked = retry_after(header)
    if asked is not None:
        return min(asked, settings.retry_after_max)
    return min(settings.backoff * 2**attempt, settings.backoff_max) * random.uniform(0.5, 1.0)


def fallback_models(ctx: Context, settings: UpstreamSettings, requested: Any) -> list[str]:
    """OpenRouter's `models` array of the request, then the configured fallbacks of the model, each
    once. A request for a free model falls back to free models only: paid ones passed no gate."""
    if not requested and not settings.fallbacks:
        return []
    wanted: list[str] = []
    if isinstance(requested, list):
        wanted += [m for m in requested if isinstance(m, str)]
    wanted += settings.fallbacks.get(ctx.model.id, [])
    paid_ok = not ctx.model.free
    out: list[str] = []
    for model_id in wanted:
        model = ctx.catalog.get(model_id)
        if model is None or model_id == ctx.model.id or model_id in out or not model.routes:
            continue
        if model.free or paid_ok:
            out.append(model_id)
    return out
