"""One error type for everything a request can be refused for, rendered in one place."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# OpenAI SDKs read `error.type`; they expect these names for these statuses.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """A refusal with an HTTP status, a Kilo `error_type` and a human message.

    `code` defaults to `error_type`; `extra` lands inside `error` (e.g. 402's `balance`).
    """

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        code: str | int | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.code = error_type if code is None else code
        self.param = param
        self.extra = extra
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": _OPENAI_TYPES.get(self.status, "api_error"),
            "code": self.code,
            "param": self.param,
        }
        if self.extra:
            error.update(self.extra)
        return {"error": error, "error_type": self.error_type, "message": self.message}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def http_error(exc: web.HTTPException, max_body: int = 0) -> GatewayError:
    """What aiohttp itself refuses (no route, wrong method, a failed expectation, a body over the
    limit), in the gateway's error shape."""
    if exc.status == 404:
        return GatewayError(404, "not_found", "No such endpoint. Chat completions are at /v1/chat/completions "
                            "(also under /api/gateway, /api/openrouter and /api/v1).", code="not_found")
    if exc.status == 405:
        return GatewayError(405, "method_not_allowed", "Method not allowed.", code="method_not_allowed",
                            headers={"Allow": exc.headers.get("Allow", "")})
    if exc.status == 413 and max_body:
        return too_large(max_body)
    if exc.status == 417:
        return GatewayError(417, "expectation_failed", "Only `Expect: 100-continue` is understood.",
                            code="expectation_failed")
    return GatewayError(exc.status, "invalid_request", exc.reason or "Bad request.")


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", f"Request body is larger than the {limit}-byte limit.",
                        code="request_too_large")


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def model_not_found(model_id: str = "") -> GatewayError:
    """Kilo's words, with the model named when there is one to name."""
    named = f": {model_id[:120]!r}" if model_id else ""
    return GatewayError(404, "model_not_found", f"The requested model could not be found{named}.", param="model")


def upstream_error(status: int, message: str) -> GatewayError:
    return GatewayError(status, "upstream_error", message)
