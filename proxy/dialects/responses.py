"""OpenAI Responses served inbound: a Responses request becomes the gateway's chat request, so that
every stage and every provider serve it unchanged (`responses_answer.py` turns the answer back).

The gateway keeps no state: `store: true`, `previous_response_id`, `conversation` and `background`
are refused with a 400 naming the field, as the hosted Kilo gateway refuses them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from proxy.errors import GatewayError, invalid_request

# Reasoning items the gateway made carry the upstream's own reasoning (signatures and all) in
# `encrypted_content`, so that a second turn gives it back byte for byte.
CARRIED = "turnstile:"
NAMESPACED = "__"  # a namespace's function `f` of `ns` is the chat tool `ns__f`


def unsupported(field: str) -> GatewayError:
    return GatewayError(400, "unsupported_field", f"The `{field}` field is not supported: this gateway keeps no "
                        "responses; send the whole conversation in `input` with `store: false`.",
                        code="unsupported_field", param=field)


def check(body: Any) -> dict[str, Any]:
    """The Responses body, or a 400 saying what is wrong with it."""
    if not isinstance(body, dict):
        raise invalid_request("Request body must be a JSON object.")
    if body.get("store") is True:
        raise unsupported("store")
    for field in ("previous_response_id", "conversation"):
        if body.get(field):
            raise unsupported(field)
    if body.get("background") is True:
        raise unsupported("background")
    given = body.get("input")
    if not isinstance(given, (str, list)) or not given:
        raise invalid_request("Invalid request: `input` must be a non-empty string or array of items.", param="input")
    if isinstance(given, list) and not all(isinstance(i, dict) for i in given):
        raise invalid_request("Invalid request: every `input` item must be an object.", param="input")
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise invalid_request("Invalid request: `stream` must be a boolean.", param="stream")
    for field, kinds in (("instructions", str), ("tools", list), ("tool_choice", (str, dict)), ("reasoning", dict),
                         ("text", dict), ("metadata", dict), ("include", list)):
        if body.get(field) is not None and not isinstance(body[field], kinds):
            raise invalid_request(f"Invalid request: `{field}` has the wrong type.", param=field)
    for tool in body.get("tools") or ():
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid_request("Invalid request: every tool must be an object with a `type`.", param="tools")
        if tool["type"] == "function" and not (isinstance(tool.get("name"), str) and tool["name"]):
            raise invalid_request("Invalid request: a function tool needs a `name`.", param="tools")
    if body.get("store") is not None and not isinstance(body.get("store"), bool):
        raise invalid_request("Invalid request: `store` must be a boolean.", param="store")
    limit = body.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise invalid_request("Invalid request: `max_output_tokens` must be a whole number of 1 or more.",
                              param="max_output_tokens")
    return body


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in content if isinstance(p, dict))
    return ""


def _part(part: Any) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise invalid_request("Invalid request: `input_image` needs an `image_url` (file ids are not supported).",
                                  param="input")
        image: dict[str, Any] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if isinstance(data, str) and data:
            if not data.startswith("data:"):
                data = f"data:application/pdf;base64,{data}"
            return {"type": "file", "file": {"filename": str(part.get("filename") or "document.pdf"), "file_data": data}}
        raise invalid_request("Invalid request: `input_file` needs `file_data` (file ids and URLs are not supported).",
                              param="input")
    raise invalid_request(f"Invalid request: unknown content part type {str(kind)[:40]!r}.", param="input")


def _content(content: Any) -> Any:
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise invalid_request("Invalid request: message `content` must be a string or an array of parts.", param="input")
    parts = [p for p in map(_part, content) if p is not None]
    if all(p["type"] == "text" for p in parts):  # plain text stays a string: every upstream takes that
        return "".join(p["text"] for p in parts)
    return parts


def carried(blob: Any) -> list[dict[str, Any]]:
    """The reasoning details a gateway-made reasoning item (its `encrypted_content`) or redacted
    thinking block (its `data`) carries; none for another's."""
    if not isinstance(blob, str) or not blob.startswith(CARRIED):
        return []
    try:
        details = orjson.loads(base64.b64decode(blob[len(CARRIED):], validate=True))
    except (binascii.Error, ValueError):
        return []
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _assistant(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the next output item belongs to: the last one, while no user, tool or
    system turn has come after it."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    message: dict[str, Any] = {"role": "assistant", "content": None}
    messages.append(message)
    return message


def _function_name(item: dict[str, Any]) -> str:
    name = str(item.get("name", ""))
    namespace = item.get("namespace")
    return f"{namespace}{NAMESPACED}{name}" if isinstance(namespace, str) and namespace else name


def _input(items: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "assistant":
                message = _assistant(messages)
                text = _text(item.get("content"))
                message["content"] = (message["content"] or "") + text if text else message["content"]
            elif role in ("user", "system", "developer"):
                # `developer` is OpenAI's name for what every upstream takes as `system`
                messages.append({"role": "user" if role == "user" else "system", "content": _content(item.get("content"))})
            else:
                raise invalid_request(f"Invalid request: unknown message role {str(role)[:40]!r}.", param="input")
        elif kind == "function_call":
            message = _assistant(messages)
            arguments = item.get("arguments")
            message.setdefault("tool_calls", []).append({
                "id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
                "function": {"name": _function_name(item),
                             "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()}})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                             "content": output if isinstance(output, str) else _text(output)})
        elif kind == "reasoning":
            details = carried(item.get("encrypted_content"))
            if details:  # the next assistant turn's own reasoning, given back as it came
                _assistant(messages).setdefault("reasoning_details", []).extend(details)
        elif kind == "item_reference":
            raise unsupported("item_reference")
        else:
            raise invalid_request(f"Invalid request: input items of type {str(kind)[:40]!r} are not supported.",
                                  param="input")


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Functions (a namespace's flattened as `ns__name`); hosted tools (web search, shell…) are left
    out: no upstream behind a chat request runs them."""
    out: list[dict[str, Any]] = []

    def function(tool: dict[str, Any], namespace: str = "") -> None:
        fn: dict[str, Any] = {"name": f"{namespace}{NAMESPACED}{tool.get('name', '')}" if namespace else tool.get("name", ""),
                              "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})

    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "function":
            function(tool)
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for inner in tool["tools"]:
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    function(inner, str(tool.get("name", "")))
    return out


def namespaced(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each flattened namespace function's chat name -> (namespace, its own name)."""
    out: dict[str, tuple[str, str]] = {}
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for inner in tool["tools"]:
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    out[f"{tool.get('name', '')}{NAMESPACED}{inner.get('name', '')}"] = (str(tool.get("name", "")),
                                                                                       str(inner.get("name", "")))
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            return {"type": "function", "function": {"name": str(choice.get("name", ""))}}
        if choice.get("type") == "allowed_tools":
            return "required" if choice.get("mode") == "required" else "auto"
    return None


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request for a Responses request (already checked)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        _input(given, messages)
    for m in messages:  # an assistant turn made only of reasoning carries no content
        if m["role"] == "assistant" and m["content"] is None and not m.get("tool_calls"):
            m["content"] = ""
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
            chat[key] = body[key]
    for key in ("parallel_tool_calls",):
        if isinstance(body.get(key), bool):
            chat[key] = body[key]
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        if isinstance(body.get(key), str) and body[key]:
            chat[key] = body[key]
    tools = _tools(body["tools"]) if isinstance(body.get("tools"), list) else []
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            chat["tool_choice"] = choice
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        effort = reasoning["effort"]
        chat["reasoning"] = {"enabled": False} if effort == "none" else {"effort": effort}
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema: dict[str, Any] = {"name": str(fmt.get("name") or "output"), "schema": fmt.get("schema") or {}}
            if isinstance(fmt.get("strict"), bool):
                schema["strict"] = fmt["strict"]
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
        if isinstance(text.get("verbosity"), str):
            chat["verbosity"] = text["verbosity"]
    return chat
