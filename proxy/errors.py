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
    413: "invalid_request_error",
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


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", f"Request body is larger than the {limit}-byte limit.",
                        code="request_too_large")


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def model_not_found() -> GatewayError:
    return GatewayError(404, "model_not_found", "The requested model could not be found.", param="model")


def upstream_error(status: int, message: str) -> GatewayError:
    return GatewayError(status, "upstream_error", message)
