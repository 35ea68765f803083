from __future__ import annotations

from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from proxy.app import create_app
from proxy.config import Server, _merge, defaults_table, parse
from proxy.protocol import Runner
from tests.fakes import Upstream
from tests.redis_server import own_redis, redis_url  # noqa: F401  (fixtures)

GatewayFactory = Callable[..., Awaitable[TestClient]]


class GatewayServer(TestServer):
    """The app under the server `turnstile serve` runs it with (`proxy.protocol.Runner`)."""

    def __init__(self, app: web.Application, settings: Server, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.settings = settings

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return Runner(self.app, self.settings, **kwargs)


def make_config(**overrides: Any) -> Any:
    """The embedded defaults with `overrides` laid over them as a config file would be."""
    return parse(_merge(defaults_table(), overrides))


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    fake = Upstream()
    fake.server = await aiohttp_server(fake.app())  # type: ignore[attr-defined]
    fake.url = str(fake.server.make_url(""))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def gateway(aiohttp_client: Any, upstream: Upstream, keys_db: str) -> GatewayFactory:
    """A gateway under aiohttp_client with only OpenRouter configured, pointed at the fake upstream.
    `native=True` also configures Anthropic and Gemini, at the same fake."""

    async def make(env: dict[str, str] | None = None, native: bool = False, **overrides: Any) -> TestClient:
        environment = {"OPENROUTER_API_KEY": "sk-or-test-key", "OPENROUTER_BASE_URL": upstream.url}  # type: ignore[attr-defined]
        if native:
            environment.update({"ANTHROPIC_API_KEY": "sk-ant-test-key", "ANTHROPIC_BASE_URL": upstream.url,  # type: ignore[attr-defined]
                                "GEMINI_API_KEY": "gm-test-key", "GEMINI_BASE_URL": upstream.url})  # type: ignore[attr-defined]
        environment.update(env or {})
        overrides.setdefault("pipeline", [])
        overrides.setdefault("keys", {"db": keys_db})
        cfg = make_config(**overrides)
        return await aiohttp_client(GatewayServer(create_app(cfg, environment), cfg.server))

    return make


@pytest.fixture
def keys_db(tmp_path: Any) -> str:
    return str(tmp_path / "keys.db")


@pytest.fixture
def kilo(gateway: GatewayFactory, keys_db: str) -> GatewayFactory:
    """A gateway with the default Kilo pipeline (auth, automodel, freegate, ratelimit)."""

    async def make(**overrides: Any) -> TestClient:
        keys = {"db": keys_db, "refresh_interval": 0.2, **overrides.pop("keys", {})}
        server = {"trusted_proxies": ["127.0.0.0/8"], **overrides.pop("server", {})}
        pipeline = defaults_table()["pipeline"]
        return await gateway(keys=keys, server=server, pipeline=overrides.pop("pipeline", pipeline), **overrides)

    return make


@pytest.fixture
def account(keys_db: str) -> Callable[..., str]:
    """Creates an account in the test's key database and returns its key."""
    from proxy import keys

    def make(name: str = "alice", balance: str = "10") -> str:
        db = keys.connect(keys_db)
        try:
            return keys.create(db, name, balance)[1]
        finally:
            db.close()

    return make
