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
  no address of the IANA IPv4/IPv6 special-purpose registries that is not
  globally reachable (loopback, link-local, private, shared, benchmarking,
  documentation, multicast, reserved, this-network, site-local, unique-local,
  Teredo, ORCHID, local-use NAT64, ...), IPv6 outside 2000::/3 refused, and
  the IPv4 address inside an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4
  (2002::/16) address checked as itself;
* with a non-empty allow-list: it matches a listed entry, which names one
  receiver by scheme, host and port, and for http(s) optionally a path
  prefix: ``http://10.0.0.5:8080/notify`` admits ``http://10.0.0.5:8080/notify``
  and ``.../notify/...`` and nothing else on that host; ``mqtt://10.0.0.5:1883``
  admits that broker. A port left out is the scheme's default (80, 443, 1883,
  8883), never "any port". An entry's host is a name (matched by name, and the
  target must still resolve) or an address (matched by every address the
  target resolves to). Listing is also how an operator allows an internal
  receiver. The old per-host form (a bare host or CIDR, which opened every
  port of the host, Orion's own API included) is refused when the
  configuration is loaded;
* never, allow-list or not, the upstream Orion itself (``http.upstream``'s
  host and port, by name and by every address it resolves to): a subscription
  that notifies Orion makes Orion send its creator's chosen request, with
  Orion's own authority, to Orion's API.

A path prefix is matched on segment boundaries, and a target path with dot
segments or percent-encoded dots, slashes or backslashes is refused when a
prefix applies, so ``/notify/../v2/entities`` cannot climb out of it.

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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Resolver = Callable[[str, int], Awaitable[list[str]]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEMES = {"http": {"http": 80, "https": 443}, "mqtt": {"mqtt": 1883, "mqtts": 8883}}
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?", re.I)
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.I)


_DEFAULT_PORTS = {"http": 80, "https": 443, "mqtt": 1883, "mqtts": 8883}
_ENCODED_DOT_OR_SLASH = re.compile(r"%(2e|2f|5c)", re.I)


@dataclass(frozen=True)
class AllowEntry:
    """One receiver Orion may notify: scheme, host (a name, or an address) and port; a path prefix for http(s)."""
    scheme: str
    host: str                         # lower case, no trailing dot
    ip: IpAddress | None              # set when the host is an address
    port: int
    path: str = ""                    # "" = any path

    def admits_path(self, path: str) -> bool:
        if not self.path:
            return True
        if self.path.endswith("/"):
            return path.startswith(self.path)
        return path == self.path or path.startswith(self.path + "/")


def parse_entry(text: str) -> AllowEntry:
    """An allow-list entry (``scheme://host[:port][/path]``); ValueError says what is wrong with it."""
    if _BAD_CHARS.search(text):
        raise ValueError("must not contain whitespace, control characters or backslashes")
    if "://" not in text:
        raise ValueError(f"{text!r} is not a URL: write scheme://host:port[/path], e.g. "
                         "http://10.0.0.5:8080/notify (a bare host or CIDR would allow every port of the host)")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError("the host does not parse (CIDR blocks are not accepted)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"scheme must be one of {', '.join(_DEFAULT_PORTS)}")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError("must not carry user information, a query or a fragment")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    elif not 1 <= port <= 65535:
        raise ValueError("the port is not a number from 1 to 65535")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise ValueError("has no host")
    try:
        ip: IpAddress | None = _ip(host)
    except ValueError:
        ip = None
        if _NUMERIC_HOST.fullmatch(host) or not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or an address (CIDR blocks are not accepted)") from None
    path = parts.path
    if path and scheme.startswith("mqtt"):
        raise ValueError("an mqtt entry has no path")
    if path == "/":
        path = ""
    if path and (_has_dot_segment(path) or _ENCODED_DOT_OR_SLASH.search(path)):
        raise ValueError("the path must not hold dot segments or percent-encoded dots, slashes or backslashes")
    return AllowEntry(scheme, host, ip, port, path)


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))


class Allowlist:
    def __init__(self, entries: Iterable[str] = ()):
        self.entries = tuple(parse_entry(e) for e in entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def admits(self, scheme: str, host: str, addresses: list[IpAddress], port: int, path: str) -> bool:
        for e in self.entries:
            if e.scheme != scheme or e.port != port or not e.admits_path(path):
                continue
            if e.ip is None and e.host == host:
                return True
            if e.ip is not None and addresses and all(a == e.ip for a in addresses):
                return True
        return False


async def default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]  # sockaddr: (host, port, ...), the host a string


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# The IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and later), with every block
# that is not "globally reachable" (or is deprecated), checked before Python's own flags, whose list
# lags the registry (Python 3.11 passes 192.88.99.1, fec0::/10, 3fff::/20 and every 6to4 address).
_SPECIAL_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), name) for net, name in (
        ("0.0.0.0/8", "this-network"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "shared"),
        ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF-protocol"), ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4-relay"), ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"), ("255.255.255.255/32", "broadcast")))
_SPECIAL_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), name) for net, name in (
        ("64:ff9b:1::/48", "local-NAT64"), ("100::/64", "discard"), ("100:0:0:1::/64", "dummy"),
        ("2001::/23", "IETF-protocol"),           # Teredo 2001::/32, benchmarking, ORCHID(v2), AMT, ...
        ("2001:db8::/32", "documentation"), ("3fff::/20", "documentation"), ("5f00::/16", "SRv6-SID"),
        ("fc00::/7", "unique-local"), ("fe80::/10", "link-local"), ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast")))
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")   # all of IPv6 that is globally routed
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")        # well-known NAT64: the last 32 bits are an IPv4 address
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")     # 6to4: bits 16-48 are an IPv4 address


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and is routed to (NAT64, 6to4), if any."""
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


def _special(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the address is no place to send a notification (None: a global unicast address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            why = _special(inner)
            return f"{why} (embedded in {'NAT64' if ip in _NAT64 else '6to4'})" if why else None
        if ip not in _GLOBAL_UNICAST:   # ::/128, ::1, IPv4-compatible ::/96, 100::/64, ULA, ... all outside
            return next((name for net, name in _SPECIAL_V6 if ip in net), "non-global")
    table: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = \
        _SPECIAL_V4 if isinstance(ip, ipaddress.IPv4Address) else _SPECIAL_V6
    for net, name in table:
        if ip in net:
            return name
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


async def check_target(url: str, kind: str, allowlist: Allowlist, *, resolve: Resolver = default_resolver,
                       upstream: str = "") -> str | None:
    """Why Orion must not notify ``url``, or None when it may. ``upstream`` is Orion's own URL."""
    if _BAD_CHARS.search(url):
        return "URL contains whitespace, control characters or backslashes"
    # Anywhere, not only in the authority: parsers differ on where the authority ends
    # (``http://good.example?@127.0.0.1/`` is 127.0.0.1 to some), and a fragment is never sent.
    if "@" in url:
        return "URL must not contain '@' (user information, or a character parsers split differently)"
    if "#" in url:
        return "URL must not contain '#' (a fragment)"
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
    literal: IpAddress | None
    try:
        literal = _ip(host)
    except ValueError:
        literal = None
    if literal is None:
        if _NUMERIC_HOST.fullmatch(host):
            return "host is a non-canonical numeric address"
        if not _HOSTNAME.fullmatch(host):
            return "host is not a valid host name"
        addresses = await _resolved(host, port, resolve)   # as spelled: as Orion will resolve it
        if not addresses:
            return "host does not resolve"
        host = host.rstrip(".")
    else:
        addresses = [literal]
    if upstream and await _is_upstream(host, addresses, port, upstream, resolve):
        return "the target is the context broker itself"
    if allowlist:
        path = parts.path or "/"
        if any(e.path for e in allowlist.entries) and (_has_dot_segment(path) or _ENCODED_DOT_OR_SLASH.search(path)):
            return "URL path holds dot segments or percent-encoded dots, slashes or backslashes"
        if allowlist.admits(scheme, host, addresses, port, path):
            return None
        return "target is not in the notification allow-list"
    for ip in addresses:
        special = _special(ip)
        if special is not None:
            return f"host resolves to a {special} address"
    return None


async def _resolved(host: str, port: int, resolve: Resolver) -> list[IpAddress]:
    try:
        return [_ip(a) for a in await resolve(host, port)]
    except (OSError, ValueError, UnicodeError):
        return []


async def _is_upstream(host: str, addresses: list[IpAddress], port: int, upstream: str, resolve: Resolver) -> bool:
    """Whether host:port is Orion's own (by name, or by any address both resolve to)."""
    parts = urlsplit(upstream)
    try:
        up_port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 80)
    except ValueError:
        return False
    up_host = (parts.hostname or "").lower().rstrip(".")
    if port != up_port or not up_host:
        return False
    if host == up_host:
        return True
    try:
        up_addresses = [_ip(up_host)]
    except ValueError:
        up_addresses = await _resolved(up_host, up_port, resolve)
    return any(a in up_addresses for a in addresses)
