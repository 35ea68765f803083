"""Decision 6: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.clientip import ClientIP, parse
from proxy.config import ConfigError
from tests.conftest import make_config

FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}


async def remaining(client, headers: dict[str, str]) -> int:
    resp = await client.post("/v1/chat/completions", json=FREE, headers=headers)
    await resp.read()
    return int(resp.headers["X-RateLimit-Remaining"])


async def test_untrusted_peer_cannot_choose_its_ip(kilo):
    client = await kilo(server={"trusted_proxies": []})
    assert await remaining(client, {"X-Forwarded-For": "198.51.100.1"}) == 199
    # A different spoofed address is still counted against the real peer.
    assert await remaining(client, {"X-Forwarded-For": "198.51.100.2"}) == 198
    assert await remaining(client, {}) == 197


async def test_trusted_proxy_forwards_the_client_ip(kilo):
    client = await kilo(server={"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]})
    assert await remaining(client, {"X-Forwarded-For": "198.51.100.1"}) == 199
    assert await remaining(client, {"X-Forwarded-For": "198.51.100.2"}) == 199
    # right-most untrusted entry: the client cannot prepend a fake address
    assert await remaining(client, {"X-Forwarded-For": "1.2.3.4, 198.51.100.1, 10.1.2.3"}) == 198
    assert await remaining(client, {"X-Forwarded-For": "1.2.3.4, 198.51.100.1"}) == 197
    # garbage written by the client left of what our proxy appended is ignored
    assert await remaining(client, {"X-Forwarded-For": "not-an-ip, 198.51.100.2"}) == 198


def test_bad_cidr_fails_at_start_up():
    with pytest.raises(ConfigError, match="trusted_proxies"):
        create_app(make_config(server={"trusted_proxies": ["10.0.0.0/33"]}), {})


@pytest.mark.parametrize("address, expected", [
    ("198.51.100.7", (4, int(ipaddress.ip_address("198.51.100.7")))),
    ("2001:db8::1", (6, int(ipaddress.ip_address("2001:db8::1")))),
    ("::ffff:10.1.2.3", (4, int(ipaddress.ip_address("10.1.2.3")))),
    ("01.2.3.4", None), ("1.2.3", None), ("not-an-ip", None), ("", None), ("1.2.3.4\0", None), ("1.2.3.4/32", None),
])
def test_parse(address, expected):
    assert parse(address) == expected


@given(st.one_of(st.ip_addresses().map(str), st.text(alphabet="0123456789abcdef.:", max_size=20)))
def test_parse_agrees_with_ipaddress(text):
    try:
        ipaddress.ip_address(text)
        valid = True
    except ValueError:
        valid = False
    assert (parse(text) is not None) == valid


def test_trusted_networks_of_both_families():
    ip = ClientIP(["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"])
    assert ip.trusted("10.200.0.1") and ip.trusted("::ffff:10.0.0.9") and ip.trusted("2001:db8:1::5")
    assert ip.trusted("127.0.0.1") and not ip.trusted("127.0.0.2")
    assert not ip.trusted("11.0.0.1") and not ip.trusted("2001:db9::1") and not ip.trusted("junk")
