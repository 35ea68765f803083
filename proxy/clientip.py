"""The client's IP: the socket peer, or, when the peer is a trusted proxy, the
right-most X-Forwarded-For address that is not itself trusted.

Written here rather than taken from aiohttp-remotes: its XForwardedFiltered believes the header
whoever the peer is, and XForwardedStrict refuses clients that do not come through every hop.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from ipaddress import ip_network

from aiohttp import web

from proxy.config import ConfigError


def parse(address: str) -> tuple[int, int] | None:
    """(version, value) of an IP address, or None if it is not one. `inet_pton` is C: `ipaddress`
    took more time than anything else on the anonymous path, with a new address per request."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:  # IPv4-mapped (::ffff:a.b.c.d) is the IPv4 address
        return 4, value & 0xFFFFFFFF
    return 6, value


class ClientIP:
    def __init__(self, trusted_proxies: list[str]) -> None:
        networks: list[tuple[int, int, int]] = []
        for cidr in trusted_proxies:
            try:
                net = ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"server.trusted_proxies: {cidr!r} is not an IP network") from None
            networks.append((net.version, int(net.network_address), int(net.netmask)))
        self.networks = tuple(networks)
        self.trusted_peer = lru_cache(maxsize=4096)(self.trusted)  # peers are few: our proxies

    def trusted(self, address: str) -> bool:
        ip = parse(address)
        return ip is not None and self._within(ip)

    def _within(self, ip: tuple[int, int]) -> bool:
        version, value = ip
        return any(v == version and value & mask == net for v, net, mask in self.networks)

    def __call__(self, request: web.Request) -> str:
        peer = request.remote or ""
        if peer.startswith("::ffff:") and "." in peer:
            peer = peer[7:]  # an IPv4 client on a dual-stack socket
        if not self.networks or not self.trusted_peer(peer):
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", None)
        if not forwarded:
            return peer
        hops = ",".join(forwarded).split(",")
        client = peer
        for hop in reversed(hops):
            hop = hop.strip()
            ip = parse(hop)
            if ip is None:
                break  # garbage left of what our proxies wrote: stop at the last address they vouched for
            client = hop[7:] if ip[0] == 4 and ":" in hop else hop  # ::ffff:a.b.c.d is a.b.c.d
            if not self._within(ip):
                break
        return client
