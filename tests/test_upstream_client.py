"""The upstream client (proxy/upstream.py) where real upstreams are: over TLS, verified against the
trust the environment gives (SSL_CERT_FILE), and through a proxy named by the environment (the whole
URL for plain HTTP, a CONNECT tunnel for HTTPS, NO_PROXY obeyed, `proxy_from_env = false`)."""

from __future__ import annotations

import asyncio
import signal
import ssl
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.fakes import Upstream
from tests.processes import free_port, self_signed, start, wait_up

CHAT = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "x"}]}


class Loopback:
    """A raw TCP server on loopback, for as long as `async with` lasts; subclasses write `_serve`."""

    _server: asyncio.AbstractServer | None = None

    async def __aenter__(self):  # noqa: ANN204 (the subclass)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Proxy(Loopback):
    """A forward proxy on loopback, one request per connection: CONNECT tunnels, and plain HTTP
    requests in absolute form, each recorded."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.requests: list[tuple[str, list[bytes]]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, _ = (await reader.readline()).decode().split(" ", 2)
            headers = []
            while (line := await reader.readline()) not in (b"\r\n", b""):
                headers.append(line)
            if method == "CONNECT":
                self.tunnels.append(target)
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                self.requests.append((target, headers))
                url = URL(target)
                up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
                kept = [h for h in headers if not h.lower().startswith((b"proxy-", b"connection"))]
                up_writer.write(f"{method} {url.raw_path_qs} HTTP/1.1\r\n".encode() + b"".join(kept)
                                + b"Connection: close\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ValueError):
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def test_through_the_environments_proxy_unless_no_proxy_or_switched_off(gateway, upstream, monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with Proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://someone:secret@"))
        client = await gateway()
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert resp.status == 200, await resp.text()
            body = await resp.read()
            assert body.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in body
        # Plain HTTP through a proxy: the whole URL, the proxy's credentials for the proxy alone.
        assert [target for target, _ in proxy.requests] == [upstream.url.rstrip("/") + "/chat/completions"] * 2
        assert all(b"Proxy-Authorization: Basic c29tZW9uZTpzZWNyZXQ=\r\n" in headers for _, headers in proxy.requests)
        assert all("Proxy-Authorization" not in seen.headers for seen in upstream.seen)
        assert upstream.seen[0].headers["Authorization"] == "Bearer sk-or-test-key"

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        resp = await (await gateway()).post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200 and len(proxy.requests) == 2  # straight to the upstream

        monkeypatch.delenv("NO_PROXY")
        resp = await (await gateway(upstream={"proxy_from_env": False})).post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200 and len(proxy.requests) == 2 and len(upstream.seen) == 4


async def _served(config: Any, env: dict[str, str], streams: bool = True) -> list[tuple[int, bytes]]:
    """Starts `turnstile serve`, makes a JSON then (if `streams`) a streamed chat request, stops it."""
    port = int(config.read_text().split("port = ")[1].split("\n")[0])
    proc = await start(config, env)
    got = []
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"http://127.0.0.1:{port}")
            for stream in (False, True) if streams else (False,):
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": stream}) as resp:
                    got.append((resp.status, await resp.read()))
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()[-1500:]
    return got


async def test_an_https_upstream_verified_by_the_environments_trust_directly_and_tunnelled(tmp_path):
    cert, key = self_signed(tmp_path)
    fake = Upstream()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port, ssl_context=tls).start()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {free_port()}\n[keys]\ndb = "{tmp_path / "k.db"}"\n[upstream]\nretries = 0\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": f"https://127.0.0.1:{upstream_port}/v1"}
    try:
        # Trusted (the certificate is its own authority): JSON and a stream, straight to the upstream.
        answers = await _served(config, {**env, "SSL_CERT_FILE": cert})
        assert [status for status, _ in answers] == [200, 200] and answers[1][1].endswith(b"data: [DONE]\n\n")
        assert [seen.path for seen in fake.seen] == ["/v1/chat/completions"] * 2
        # Not trusted: refused, never sent.
        [(status, body)] = await _served(config, env, streams=False)
        assert status == 502 and b"could not be reached" in body and len(fake.seen) == 2
        # Through HTTPS_PROXY: a CONNECT tunnel, TLS to the upstream inside it.
        async with Proxy() as proxy:
            answers = await _served(config, {**env, "SSL_CERT_FILE": cert, "HTTPS_PROXY": proxy.url})
        assert [status for status, _ in answers] == [200, 200] and len(fake.seen) == 4
        assert proxy.tunnels and set(proxy.tunnels) == {f"127.0.0.1:{upstream_port}"} and not proxy.requests
    finally:
        await runner.cleanup()


def test_a_provider_header_with_a_line_break_is_refused_at_start_up():
    """It would split every request to the provider."""
    from proxy.config import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="X-Title"):
        make_config(providers=[{"name": "openrouter", "headers": {"X-Title": "a\r\nX-Injected: 1"}}])


async def test_a_request_header_with_a_line_break_is_refused_before_it_is_sent():
    from proxy.config import UpstreamSettings
    from proxy.upstream import Upstream as Client

    client = Client(UpstreamSettings())
    client.start()
    try:
        with pytest.raises(ValueError, match="line break"):
            await client.post("http://127.0.0.1:9/x", {"anthropic-beta": "a\r\nX-Injected: 1"}, b"{}")
    finally:
        await client.close()


class Raw(Loopback):
    """An upstream that answers every request with `answer` (bytes, as they go on the wire, in
    pieces), after reading the request's head and body."""

    def __init__(self, *answer: bytes) -> None:
        self.answer = answer  # pieces, sent 0.1 s apart
        self.heads: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
            for i, piece in enumerate(self.answer):
                if i:
                    await asyncio.sleep(0.1)
                writer.write(piece)
                await writer.drain()
            await asyncio.sleep(0.5)  # the connection held open after the answer
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


SSE_START = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3a\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\r\n")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}",  # a broken status line
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 9000 + b"\r\nContent-Length: 2\r\n\r\n{}",  # a header past aiohttp's limit
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
], ids=["status-line", "huge-header", "101", "204"])
async def test_an_answer_that_is_not_a_chat_answer_is_a_502(gateway, answer, caplog):
    async with Raw(answer) as raw:
        client = await gateway(env={"OPENROUTER_BASE_URL": raw.url}, upstream={"retries": 0})
        for stream in (False, True):
            resp = await asyncio.wait_for(client.post("/v1/chat/completions", json={**CHAT, "stream": stream}), 10)
            body = await resp.json()
            assert resp.status == 502 and body["error"]["code"] == "upstream_error", body


async def test_a_body_that_breaks_off_ends_the_stream_with_the_error_chunk(gateway):
    """aiohttp closes the connection on a malformed chunk and leaves the body's reader waiting: the
    stream ends at once with the error chunk, not at the read timeout (nor never, with keep-alives)."""
    async with Raw(SSE_START, b"zz\r\nxx\r\n") as raw:
        client = await gateway(env={"OPENROUTER_BASE_URL": raw.url}, upstream={"read_timeout": 60.0})
        resp = await asyncio.wait_for(client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 10)
        body = await asyncio.wait_for(resp.read(), 10)
    assert resp.status == 200 and b'"content":"Hi"' in body
    assert b'"finish_reason":"error"' in body and body.endswith(b"data: [DONE]\n\n")


async def test_a_providers_host_and_user_agent_replace_the_gateways(gateway):
    async with Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}") as raw:
        client = await gateway(env={"OPENROUTER_BASE_URL": raw.url}, providers=[
            {"name": "openrouter", "headers": {"Host": "api.example.com", "User-Agent": "acme/1.0"}}])
        await client.post("/v1/chat/completions", json=CHAT)
    head = raw.heads[0].lower()
    assert head.count(b"\r\nhost: ") == 1 and b"\r\nhost: api.example.com\r\n" in head
    assert head.count(b"\r\nuser-agent: ") == 1 and b"\r\nuser-agent: acme/1.0\r\n" in head
    assert head.count(b"\r\ncontent-length: ") == 1


@pytest.mark.parametrize("header", ["Content-Length", "transfer-encoding", "Connection"])
def test_a_provider_header_that_frames_the_request_is_refused_at_start_up(header):
    from proxy.config import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="frames the request"):
        make_config(providers=[{"name": "openrouter", "headers": {header: "0"}}])


async def test_a_key_read_from_a_file_keeps_its_line_end_out_of_the_header(gateway, upstream):
    client = await gateway(env={"OPENROUTER_API_KEY": "sk-or-test-key\n"})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and upstream.seen[0].headers["Authorization"] == "Bearer sk-or-test-key"
    from proxy.app import create_app
    from proxy.config import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="OPENROUTER_API_KEY"):
        create_app(make_config(), {"OPENROUTER_API_KEY": "sk-or\ninjected", "OPENROUTER_BASE_URL": upstream.url})


async def test_a_proxy_that_wants_other_credentials_is_the_operators_503(gateway, monkeypatch, caplog):
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with Raw(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
                   b"Content-Type: text/html\r\nContent-Length: 5\r\n\r\n<h1/>") as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        resp = await (await gateway()).post("/v1/chat/completions", json=CHAT)
        assert resp.status == 503 and (await resp.json())["error_type"] == "temporarily_unavailable"


async def test_a_base_url_with_a_query_keeps_it_after_the_path(gateway):
    """Azure OpenAI's base URLs carry `?api-version=…`: the path goes before it, the query as it was."""
    async with Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}") as raw:
        client = await gateway(env={"OPENROUTER_BASE_URL": raw.url + "/openai/deployments/d/?api-version=2024-10-21&x=a%20b"})
        await client.post("/v1/chat/completions", json=CHAT)
    assert raw.heads[0].startswith(b"POST /openai/deployments/d/chat/completions?api-version=2024-10-21&x=a%20b HTTP/1.1\r\n")


async def test_every_anthropic_beta_the_client_sent_is_passed_on(gateway, upstream):
    client = await gateway(native=True)
    resp = await client.post("/v1/messages", json={"model": "anthropic/claude-sonnet-4.6", "max_tokens": 10,
                                                   "messages": [{"role": "user", "content": "x"}]},
                             headers=[("anthropic-beta", "a-2025"), ("anthropic-beta", "b-2025")])
    assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].headers.get("anthropic-beta") == "a-2025, b-2025"
