"""The admin API's OpenAPI description, served at /admin/v1/openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "An error in the gateway's one shape",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_KEY = {"description": "The key", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"data": {"$ref": "#/components/schemas/Key"}}}}}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}


def _op(summary: str, ok: dict[str, Any], body: str | None = None, params: list[Any] | None = None,
        status: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {status: ok, "400": _ERROR, "401": _ERROR, "404": _ERROR}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if params:
        op["parameters"] = params
    return op


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Turnstile admin API", "version": "1",
             "description": "Keys and usage. Every call needs `Authorization: Bearer $TURNSTILE_ADMIN_TOKEN`."},
    "servers": [{"url": "/admin/v1"}],
    "security": [{"admin": []}],
    "paths": {
        "/keys": {
            "post": _op("Create a key (returned once, as `key`)", {"description": "Created", "content": {"application/json": {
                "schema": {"type": "object", "properties": {"data": {"$ref": "#/components/schemas/Key"},
                                                            "key": {"type": "string"}}}}}}, "NewKey", status="201"),
            "get": _op("List keys by id, a page at a time", {"description": "A page", "content": {"application/json": {
                "schema": {"type": "object", "properties": {
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}},
                    "next_after": {"type": ["integer", "null"]}}}}}}, params=[
                {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}},
                {"name": "after", "in": "query", "schema": {"type": "integer"}, "description": "the last id of the previous page"}]),
        },
        "/keys/{id}": {
            "get": _op("Show a key", _KEY, params=[_ID]),
            "patch": _op("Change a key's name or settings (given settings are merged; null clears one)", _KEY,
                         "KeyChange", [_ID]),
            "delete": _op("Revoke a key", _KEY, params=[_ID]),
        },
        "/keys/{id}/balance": {"post": _op("Add to the balance, or set it", _KEY, "BalanceChange", [_ID])},
        "/keys/{id}/revoke": {"post": _op("Revoke a key", _KEY, params=[_ID])},
        "/usage": {"get": _op("Requests, tokens and cost, grouped", {"description": "A page", "content": {"application/json": {
            "schema": {"type": "object", "properties": {"data": {"type": "array", "items": {"$ref": "#/components/schemas/UsageRow"}},
                                                        "next_offset": {"type": ["integer", "null"]}}}}}}, params=[
            {"name": "by", "in": "query", "schema": {"enum": ["model", "key", "day", "tag"]}},
            {"name": "key", "in": "query", "schema": {"type": "integer"}},
            {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
            {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}},
            {"name": "offset", "in": "query", "schema": {"type": "integer"}}])},
        "/openapi.json": {"get": _op("This description", {"description": "OpenAPI 3.1"})},
    },
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Settings": {"type": "object", "additionalProperties": False, "properties": {
                "budgets": {"type": ["array", "null"], "items": {"type": "string", "examples": ["5/day", "100/month", "1/24h"]}},
                "rpm": {"type": ["integer", "null"], "minimum": 1},
                "tpm": {"type": ["integer", "null"], "minimum": 1},
                "concurrency": {"type": ["integer", "null"], "minimum": 1},
                "allow": {"type": ["array", "null"], "items": {"type": "string", "examples": ["anthropic/*"]}},
                "deny": {"type": ["array", "null"], "items": {"type": "string"}},
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                "owner": {"type": ["string", "null"]},
                "tags": {"type": ["object", "null"], "additionalProperties": {"type": "string"}}}},
            "Key": {"type": "object", "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"}, "key_hint": {"type": "string"},
                "balance": {"type": "number"}, "created_at": {"type": "string", "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                "settings": {"$ref": "#/components/schemas/Settings"}}},
            "NewKey": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "balance": {"type": ["string", "number"]},
                "settings": {"$ref": "#/components/schemas/Settings"}}},
            "KeyChange": {"type": "object", "properties": {
                "name": {"type": "string"}, "settings": {"$ref": "#/components/schemas/Settings"}}},
            "BalanceChange": {"type": "object", "properties": {
                "add": {"type": ["string", "number"]}, "set": {"type": ["string", "number"]}}},
            "UsageRow": {"type": "object", "properties": {
                "model": {"type": "string", "description": "with by=model"},
                "key": {"type": ["integer", "string"], "description": "with by=key: the key's id, or \"anonymous\""},
                "day": {"type": "string", "description": "with by=day: YYYY-MM-DD (UTC)"},
                "tag": {"type": "string", "description": "with by=tag: name=value; a request counts under each of its key's tags"},
                "requests": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"}, "cached_tokens": {"type": "integer"},
                "cost_usd": {"type": "number"}, "estimated": {"type": "integer"}}},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]}}}}},
        },
    },
}
