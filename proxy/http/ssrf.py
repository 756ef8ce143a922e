"""Notification URLs: where a subscription may make Orion send requests.

Orion sits inside the network; a subscription whose notification URL points
at ``http://127.0.0.1:9100/`` or ``http://169.254.169.254/`` makes it attack
its own neighbours (server-side request forgery). A target passes when:

* its scheme fits its kind (``http``/``https`` for http and httpCustom,
  ``mqtt``/``mqtts`` for mqtt and mqttCustom), it has a host, and it carries
  no userinfo, backslash, whitespace or control character (the parser
  differentials behind ``http://good@evil`` style tricks);
* with an empty ``http.notification_allowlist``: every address the host
  resolves to (through the event loop's ``getaddrinfo``) is globally routable:
  no loopback, link-local, private, shared, multicast, reserved or
  unspecified address, IPv4-mapped IPv6 included;
* with a non-empty allow-list: the host equals a listed host name, or every
  address it resolves to lies in a listed address or CIDR. Listing is also
  how an operator allows an internal receiver.

Host names that a libc would read as numbers (``127.1``, ``0x7f.1``,
``2130706433``) are refused outright: Orion's resolver and ours must agree.
A name is checked when the subscription is made; DNS that later changes
(rebinding) is outside what a proxy can see, so deployments should also keep
Orion's own egress firewalled.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

Resolver = Callable[[str, int], Awaitable[list[str]]]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http": {"http": 80, "https": 443}, "mqtt": {"mqtt": 1883, "mqtts": 8883}}
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?", re.I)
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.I)


class Allowlist:
    def __init__(self, entries: Iterable[str] = ()):
        self.hosts: set[str] = set()
        self.networks: list[IpNetwork] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def covers(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.networks)


async def default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _special(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


async def check_target(url: str, kind: str, allowlist: Allowlist, *,
                       resolve: Resolver = default_resolver) -> str | None:
    """Why Orion must not notify ``url``, or None when it may."""
    if _BAD_CHARS.search(url):
        return "URL contains whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "URL does not parse"
    schemes = _SCHEMES.get(kind, {})
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        return f"scheme must be one of {', '.join(sorted(schemes))}"
    if "@" in parts.netloc or parts.username is not None:
        return "URL must not carry user information"
    host = (parts.hostname or "").lower()
    if not host:
        return "URL has no host"
    port = port or schemes[scheme]
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        literal = _ip(host)
    except ValueError:
        literal = None
    if literal is None:
        if _NUMERIC_HOST.fullmatch(host):
            return "host is a non-canonical numeric address"
        if not _HOSTNAME.fullmatch(host):
            return "host is not a valid host name"
        if host.rstrip(".") in allowlist.hosts:
            return None
        try:
            addresses = [_ip(a) for a in await resolve(host, port)]
        except (OSError, ValueError, UnicodeError):
            return "host does not resolve"
        if not addresses:
            return "host does not resolve"
    else:
        addresses = [literal]
    for ip in addresses:
        if allowlist.covers(ip):
            continue
        if allowlist:
            return "host is not in the notification allow-list"
        special = _special(ip)
        if special is not None:
            return f"host resolves to a {special} address"
    return None
