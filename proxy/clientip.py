"""The client's IP (decision 6): the socket peer, or, when the peer is a trusted proxy, the
right-most X-Forwarded-For address that is not itself trusted.

Written here rather than taken from aiohttp-remotes: its XForwardedFiltered believes the header
whoever the peer is, and XForwardedStrict refuses clients that do not come through every hop.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from aiohttp import web

from proxy.config import ConfigError


class ClientIP:
    def __init__(self, trusted_proxies: list[str]) -> None:
        networks: list[IPv4Network | IPv6Network] = []
        for cidr in trusted_proxies:
            try:
                networks.append(ip_network(cidr, strict=False))
            except ValueError:
                raise ConfigError(f"server.trusted_proxies: {cidr!r} is not an IP network") from None
        self.networks = tuple(networks)
        self.trusted = lru_cache(maxsize=4096)(self._trusted)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def __call__(self, request: web.Request) -> str:
        peer = request.remote or ""
        if peer.startswith("::ffff:") and "." in peer:
            peer = peer[7:]  # an IPv4 client on a dual-stack socket
        if not self.networks or not self.trusted(peer):
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", None)
        if not forwarded:
            return peer
        hops = ",".join(forwarded).split(",")
        client = peer
        for hop in reversed(hops):
            hop = hop.strip()
            try:
                ip_address(hop)
            except ValueError:
                break  # garbage left of what our proxies wrote: stop at the last address they vouched for
            client = hop
            if not self.trusted(hop):
                break
        return client
