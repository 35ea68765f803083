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
from tests.postgres_server import new_database, own_postgres, postgres_url  # noqa: F401  (fixtures)
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
def gateway(aiohttp_client: Any, upstream: Upstream, store_url: str) -> GatewayFactory:
    """A gateway under aiohttp_client with only OpenRouter configured, pointed at the fake upstream.
    `native=True` also configures Anthropic and Gemini, at the same fake."""

    async def make(env: dict[str, str] | None = None, native: bool = False, **overrides: Any) -> TestClient:
        environment = {"OPENROUTER_API_KEY": "sk-or-test-key", "OPENROUTER_BASE_URL": upstream.url}  # type: ignore[attr-defined]
        if native:
            environment.update({"ANTHROPIC_API_KEY": "sk-ant-test-key", "ANTHROPIC_BASE_URL": upstream.url,  # type: ignore[attr-defined]
                                "GEMINI_API_KEY": "gm-test-key", "GEMINI_BASE_URL": upstream.url})  # type: ignore[attr-defined]
        environment.update(env or {})
        overrides.setdefault("pipeline", [])
        overrides.setdefault("store", {"url": store_url})
        cfg = make_config(**overrides)
        return await aiohttp_client(GatewayServer(create_app(cfg, environment), cfg.server))

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: Any, tmp_path: Any) -> str:
    """The test's own store: a SQLite file, then a PostgreSQL database of its own (every test that
    uses a store runs on both backends)."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return new_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_db(tmp_path: Any) -> str:
    """A SQLite file, for the tests of what only that backend has (its file, its journal format)."""
    return str(tmp_path / "keys.db")


@pytest.fixture
def kilo(gateway: GatewayFactory, store_url: str) -> GatewayFactory:
    """A gateway with the default Kilo pipeline (auth, automodel, freegate, ratelimit)."""

    async def make(**overrides: Any) -> TestClient:
        keys = {"refresh_interval": 0.2, **overrides.pop("keys", {})}
        server = {"trusted_proxies": ["127.0.0.0/8"], **overrides.pop("server", {})}
        pipeline = defaults_table()["pipeline"]
        return await gateway(keys=keys, server=server, pipeline=overrides.pop("pipeline", pipeline), **overrides)

    return make


@pytest.fixture
def account(store_url: str) -> Callable[..., str]:
    """Creates an account in the test's store and returns its key."""
    from proxy.store import create_key

    def make(name: str = "alice", balance: str = "10") -> str:
        return create_key(store_url, name, balance)

    return make
