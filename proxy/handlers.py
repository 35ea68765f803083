"""The HTTP endpoints: chat completions (validated, then handed to the pipeline), models, health."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy.catalog import Catalog, Model
from proxy.clientip import ClientIP
from proxy.context import Context, Native
from proxy.dialects import messages, responses
from proxy.dialects.messages_answer import MessagesAnswer
from proxy.dialects.responses_answer import ResponsesAnswer
from proxy.inflate import inflate
from proxy.errors import GatewayError, invalid_request, model_not_found, too_large
from proxy.outcome import Outcome
from proxy.pipeline import Next

_JSON = "application/json"


MAX_DEPTH = 255  # levels of nesting: what orjson writes back (and what no real request comes near)
_TOO_DEEP = f"Invalid request: the body is nested more than {MAX_DEPTH} levels deep."


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether `obj` nests lists and objects more than `limit` levels deep."""
    level, todo = 0, [obj]
    while todo:
        level += 1
        if level > limit:
            return True
        todo = [v for o in todo for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list))]
    return False


def _refuse_deep(raw: bytes, body: Any) -> None:
    """Refused here, not when the provider's request is written: before it uses up a rate-limit
    slot. (Counting brackets is a C loop; only a body with enough of them is walked.)"""
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise invalid_request(_TOO_DEEP)


def _loads(raw: bytes) -> Any:
    """A dialect request's JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise invalid_request(_TOO_DEEP) from None
        raise invalid_request(f"Request body is not valid JSON: {exc}") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise invalid_request(_TOO_DEEP) from None
        # orjson's words for bytes that are not UTF-8 speak of a `str` and surrogates: say what it is.
        why = "it is not valid UTF-8" if str(exc).startswith("str is not valid UTF-8") else exc
        raise GatewayError(400, "invalid_request", f"Request body is not valid JSON: {why}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("Request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("Invalid request: `messages` must be a non-empty array.", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise invalid_request("Invalid request: every message must be an object.", param="messages")
    _refuse_deep(raw, body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("Invalid request: `stream` must be a boolean.", param="stream")
    return body


class ChatHandler:
    def __init__(self, catalog: Catalog, client_ip: ClientIP, pipeline: Next, max_body: int = 4 * 1024 * 1024,
                 body_timeout: float = 30.0) -> None:
        self.catalog = catalog
        self.client_ip = client_ip
        self.pipeline = pipeline
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def _body(self, request: web.Request) -> bytes:
        """The body, refused unread when it says it is too large, and bounded in time when it has not
        all arrived with the headers (a client trickling it would hold the request forever)."""
        if (request.content_length or 0) > self.max_body:
            raise too_large(self.max_body)
        if request.content.is_eof():
            raw = await request.read()
        else:
            try:
                async with asyncio.timeout(self.body_timeout):
                    raw = await request.read()
            except TimeoutError:
                raise GatewayError(408, "request_timeout", "The request body did not arrive in time.",
                                   code="request_timeout") from None
        encoding = request.headers.get("Content-Encoding")
        return raw if encoding is None else await inflate(raw, encoding, self.max_body)

    async def __call__(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        raw = await self._body(request)
        body = parse_body(raw)
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise model_not_found()
        model = self.catalog.get(model_id) or self.catalog.get(model_id.strip().lower())
        if model is None:
            raise model_not_found(model_id)
        return await self._run(request, outcome, body, len(raw), model_id, model)

    async def _run(self, request: web.Request, outcome: Outcome, body: dict[str, Any], size: int, model_id: str,
                   model: Model, outbound: Any = None, native: Native | None = None) -> web.StreamResponse:
        """The chat request `body` through the pipeline; `outbound` turns the answer into the
        caller's dialect, `native` is the request in it (None: chat completions)."""
        rid = outcome.request_id
        ctx = Context(
            request=request,
            request_id=rid,
            catalog=self.catalog,
            body=body,
            stream=body.get("stream") is True,
            client_ip=self.client_ip(request),
            requested_model=model_id,
            model=model,
            outcome=outcome,
            response_headers={"X-Request-Id": rid},  # on whatever answer the pipeline makes
            outbound=outbound,
            native=native,
        )
        outcome.requested_model, outcome.model, outcome.stream = model_id, model.id, ctx.stream
        outcome.client_ip, outcome.request_bytes = ctx.client_ip, size
        outcome.response_headers = ctx.response_headers
        return await self.pipeline(ctx)


def _has_images(chat: dict[str, Any]) -> bool:
    return any(isinstance(p, dict) and p.get("type") == "image_url"
               for m in chat["messages"] if isinstance(m.get("content"), list) for p in m["content"])


def _hosted_tools(body: dict[str, Any]) -> bool:
    tools = body.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and t.get("type", "function") not in ("function", "custom")
                                           and "input_schema" not in t for t in tools)


class DialectHandler(ChatHandler):
    """A request in another dialect (`dialect`: "messages" or "responses"), served as a chat request
    made from it, or passed through as it came where the provider speaks it; the model named as the
    dialect's own clients name it."""

    dialect = ""

    def _request(self, raw: bytes) -> dict[str, Any]:
        body = _loads(raw)
        try:
            body = self.check(body)
        except (TypeError, AttributeError, ValueError, KeyError):  # a value of a type no field of the dialect has
            raise invalid_request(f"Invalid request: a field has a type the {self.dialect.title()} API does not "
                                  "allow there.") from None
        _refuse_deep(raw, body)
        name = body.get("model")
        if not isinstance(name, str) or not name.strip():
            raise invalid_request("Invalid request: `model` is required, a model id as a string.", param="model")
        return body

    def check(self, body: Any) -> dict[str, Any]:
        raise NotImplementedError

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, outcome: Outcome, name: str, body: dict[str, Any], chat: dict[str, Any], raw: bytes) -> Any:
        raise NotImplementedError

    def untranslatable(self, body: dict[str, Any]) -> GatewayError | None:
        return None

    async def __call__(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        raw = await self._body(request)
        body = self._request(raw)
        name = body.get("model")
        model = self.catalog.native(name) if isinstance(name, str) and name else None
        if model is None:
            models = request.path.rsplit("/" + self.dialect, 1)[0] + "/models"
            raise GatewayError(404, "model_not_found", f"model: {str(name)[:120]!r} is not a model this gateway "
                               f"serves; its models are listed at {models}.", param="model")
        untranslatable = self.untranslatable(body)
        try:
            try:
                chat = self.to_chat(body)
            except GatewayError as exc:
                # What has no chat form may still go as it is to a provider that speaks the dialect:
                # refused only if the request is to be translated (`proxy.dial`).
                untranslatable = exc
                chat = {"model": name, "messages": [{"role": "user", "content": ""}], "stream": body.get("stream") is True}
            outbound = self.answer(outcome, name, body, chat, raw)
        except (TypeError, AttributeError, ValueError, KeyError):  # a field of a type the dialect does not have there
            raise invalid_request(f"Invalid request: a field has a type the {self.dialect.title()} API does not "
                                  "allow there.") from None
        chat["model"] = model.id
        native = Native(self.dialect, body, raw, chat.get("reasoning"), chat.get("verbosity"), untranslatable,
                        raw.find(b"image") >= 0 and _has_images(chat), _hosted_tools(body))
        return await self._run(request, outcome, chat, len(raw), name, model, outbound, native)


class MessagesHandler(DialectHandler):
    """`POST {base}/messages` (and `/v1/messages`): Anthropic Messages."""

    dialect = "messages"
    check = staticmethod(messages.check)  # type: ignore[assignment]
    to_chat = staticmethod(messages.to_chat)  # type: ignore[assignment]
    untranslatable = staticmethod(messages.untranslatable)  # type: ignore[assignment]

    def answer(self, outcome: Outcome, name: str, body: dict[str, Any], chat: dict[str, Any], raw: bytes) -> Any:
        # message_start's input estimate: a token per four bytes of the request, already at hand.
        return MessagesAnswer(outcome.request_id, name, chat.get("stream") is True, max(1, len(raw) // 4))

    async def count_tokens(self, request: web.Request) -> web.Response:
        """An estimate (no provider is asked): see `messages.count_tokens`."""
        body = messages.check(_loads(await self._body(request)), counting=True)
        return web.json_response({"input_tokens": messages.count_tokens(body)})


class ResponsesHandler(DialectHandler):
    """`POST {base}/responses`: OpenAI Responses."""

    dialect = "responses"
    check = staticmethod(responses.check)  # type: ignore[assignment]
    to_chat = staticmethod(responses.to_chat)  # type: ignore[assignment]

    def answer(self, outcome: Outcome, name: str, body: dict[str, Any], chat: dict[str, Any], raw: bytes) -> Any:
        return ResponsesAnswer(outcome.request_id, body, chat.get("stream") is True, responses.namespaced(body))


class ModelsHandler:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def __call__(self, request: web.Request) -> web.Response:
        return web.Response(body=self.catalog.body, content_type=_JSON)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)
