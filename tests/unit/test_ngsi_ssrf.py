"""Notification URL checks: each test is an attempt to make Orion call somewhere it must not."""

from __future__ import annotations

import pytest

from proxy.ssrf import Allowlist, check_target

DNS = {
    "public.example": ["93.184.216.34"],
    "sneaky.example": ["93.184.216.34", "127.0.0.1"],       # one bad address is enough
    "v6loop.example": ["::1"],
    "mapped.example": ["::ffff:10.0.0.5"],
    "internal.example": ["10.1.2.3"],
}


async def resolve(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("no such host")
    return DNS[host]


async def check(url: str, kind: str = "http", allow=()) -> str | None:
    return await check_target(url, kind, Allowlist(allow), resolve=resolve)


async def test_public_http_and_mqtt_targets_pass():
    assert await check("http://public.example/notify") is None
    assert await check("https://93.184.216.34:8443/n") is None
    assert await check("mqtt://public.example:1883", "mqtt") is None
    assert await check("mqtts://public.example", "mqtt") is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9100/metrics", "http://localhost.:80/", "http://[::1]/", "http://169.254.169.254/latest",
    "http://10.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/", "http://0.0.0.0/", "http://224.0.0.1/",
    "http://100.64.0.1/", "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://240.0.0.1/",
])
async def test_special_addresses_are_refused(url):
    DNS["localhost."] = ["127.0.0.1"]
    assert await check(url) is not None


@pytest.mark.parametrize("url", ["http://127.1/", "http://0x7f.0.0.1/", "http://2130706433/", "http://017700000001/"])
async def test_numeric_spellings_of_loopback_are_refused(url):
    assert await check(url) is not None


@pytest.mark.parametrize("host", ["sneaky.example", "v6loop.example", "mapped.example", "internal.example"])
async def test_every_resolved_address_is_checked(host):
    assert "address" in (await check(f"http://{host}/"))


@pytest.mark.parametrize("url", [
    "http://public.example@127.0.0.1/", "http://user:pw@public.example/", "http://127.0.0.1\\@public.example/",
    "http://public.example /", "http://pub\tlic.example/", "file:///etc/passwd", "gopher://public.example/",
    "ftp://public.example/", "http:///nohost", "http://public.example:99999/", "http://nonexistent.example/",
    "http://bad_host!.example/",
])
async def test_tricks_and_bad_urls_are_refused(url):
    assert await check(url) is not None


@pytest.mark.parametrize("url", [
    "http://public.example?@127.0.0.1/", "http://public.example#@127.0.0.1/", "http://public.example/?a=@b",
    "http://public.example/p@q", "http://public.example/#frag", "http://public.example#", "mqtt://public.example#x",
])
async def test_an_at_sign_or_a_fragment_anywhere_is_refused(url):
    """Issue 15 (attack15): an '@' after '?' or '#' passed, read by urlsplit as query or fragment;
    other parsers (Orion's among them, by the authority's end they choose) may take 127.0.0.1 as the host."""
    why = await check(url, "mqtt" if url.startswith("mqtt") else "http")
    assert why is not None and ("'@'" in why or "'#'" in why), why


async def test_scheme_must_fit_the_kind():
    assert await check("mqtt://public.example", "http") is not None
    assert await check("http://public.example", "mqtt") is not None


async def test_allowlist_opens_internal_receivers_and_closes_the_rest():
    allow = ("http://10.1.2.3:8080/notify", "http://receiver.internal/hooks/", "mqtt://10.1.2.3:1883")
    DNS["receiver.internal"] = ["10.1.9.9"]
    assert await check("http://internal.example:8080/notify", allow=allow) is None
    assert await check("http://10.1.2.3:8080/notify/sub?x=1", allow=allow) is None
    assert await check("http://receiver.internal/hooks/a", allow=allow) is None
    assert await check("mqtt://10.1.2.3:1883", "mqtt", allow=allow) is None
    assert await check("http://public.example/", allow=allow) == "target is not in the notification allow-list"
    assert await check("http://127.0.0.1/", allow=allow) is not None


@pytest.mark.parametrize("url,kind", [
    ("http://10.1.2.3:1026/v2/entities/b-1/attrs", "http"),   # the same host, another port: Orion's
    ("http://10.1.2.3/notify", "http"),                       # no port is port 80, not "any"
    ("https://10.1.2.3:8080/notify", "http"),                 # another scheme
    ("http://10.1.2.3:8080/notifyx", "http"),                 # the prefix ends at a segment boundary
    ("http://10.1.2.3:8080/other", "http"),
    ("http://10.1.2.3:8080/notify/../v2/entities", "http"),   # dot segments climb out of the prefix
    ("http://10.1.2.3:8080/notify/%2e%2e/v2/entities", "http"),
    ("http://10.1.2.3:8080/notify%2F..%2Fv2", "http"),
    ("mqtt://10.1.2.3:1884", "mqtt"),
    ("mqtts://10.1.2.3:1883", "mqtt"),
])
async def test_an_entry_admits_one_receiver_not_its_whole_host(url, kind):
    allow = ("http://10.1.2.3:8080/notify", "mqtt://10.1.2.3:1883")
    assert await check(url, kind, allow=allow) is not None


@pytest.mark.parametrize("upstream,url", [
    ("http://127.0.0.1:1026", "http://127.0.0.1:1026/v2/entities/b-1/attrs"),
    ("http://127.0.0.1:1026", "http://localhost.:1026/v2/op/update"),        # another name for it
    ("http://127.0.0.1:1026", "https://127.0.0.1:1026/"),                    # any scheme on Orion's port
    ("http://orion.internal:1026", "http://orion.internal:1026/v2/entities"),
    ("http://orion.internal:1026", "http://10.1.2.3:1026/v2/entities"),      # Orion's address, by number
    ("http://orion.internal", "http://internal.example/v2/entities"),        # port 80 both
])
async def test_orion_itself_is_never_a_target_even_when_listed(upstream, url):
    DNS["localhost."] = ["127.0.0.1"]
    DNS["orion.internal"] = ["10.1.2.3"]
    listed = (url.split("/v2")[0].rstrip("/"),)
    why = await check_target(url, "http", Allowlist(listed), resolve=resolve, upstream=upstream)
    assert why == "the target is the context broker itself"
    why = await check_target(url, "http", Allowlist(), resolve=resolve, upstream=upstream)
    assert why == "the target is the context broker itself"
    # and the same receiver on another port is judged by the allow-list as usual
    other = url.replace(":1026", ":8080") if ":1026" in url else url.replace("internal.example", "internal.example:81")
    assert await check_target(other, "http", Allowlist(listed), resolve=resolve, upstream=upstream) != \
        "the target is the context broker itself"


@pytest.mark.parametrize("entry,problem", [
    ("10.1.2.3", "is not a URL"), ("10.1.0.0/16", "is not a URL"), ("receiver.internal", "is not a URL"),
    ("ftp://10.1.2.3", "scheme"), ("http://user@10.1.2.3", "user information"), ("http://10.1.2.3:0", "port"),
    ("http://10.1.2.3:99999", "port"), ("mqtt://10.1.2.3:1883/topic", "no path"), ("http://127.1:80", "host"),
    ("http://10.1.2.3/a/../b", "dot segments"), ("http://10.1.2.3/a%2fb", "percent-encoded"),
    ("http://[10.0.0.0/8]:80", "host"),
])
def test_bad_allowlist_entries_are_refused_with_a_reason(entry, problem):
    with pytest.raises(ValueError, match=problem):
        Allowlist([entry])


def test_entry_defaults():
    (e,) = Allowlist(["HTTP://Receiver.Internal."]).entries
    assert (e.scheme, e.host, e.port, e.path) == ("http", "receiver.internal", 80, "")
    (e,) = Allowlist(["mqtts://10.0.0.5"]).entries
    assert (e.port, str(e.ip)) == (8883, "10.0.0.5")


# --------------------------------------------------------------------------- the IANA special-purpose registries

# One address per block of the IANA IPv4 and IPv6 Special-Purpose Address Registries that is not globally
# reachable, and the IPv6 forms that carry a special IPv4 address. The first five passed before the table.
SPECIAL_LITERALS = [
    "[fec0::1]", "[2002:7f00:1::]", "[3fff::1]", "192.88.99.1", "[64:ff9b:1::a00:1]",
    "0.1.2.3", "10.9.8.7", "100.64.0.1", "127.8.8.8", "169.254.1.1", "172.31.0.1", "192.0.0.8", "192.0.2.1",
    "192.168.0.1", "198.18.0.1", "198.19.255.255", "198.51.100.1", "203.0.113.1", "224.0.0.251",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "[::]", "[::1]", "[::ffff:10.0.0.1]", "[::10.0.0.1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]",
    "[100::1]", "[2001::1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[2001:2::1]", "[2001:10::1]",
    "[2001:20::1]", "[2001:db8::1]", "[2002:a00:1::1]", "[2002:c0a8:101::]", "[5f00::1]", "[fc00::1]",
    "[fd12:3456::1]", "[fe80::1]", "[ff02::1]", "[ff0e::1]", "[4000::1]",
]


@pytest.mark.parametrize("host", SPECIAL_LITERALS)
async def test_every_special_purpose_block_is_refused(host):
    assert "address" in (await check(f"http://{host}/n") or ""), host


@pytest.mark.parametrize("host", ["93.184.216.34", "[2606:2800:220:1:248:1893:25c8:1946]",
                                  "[64:ff9b::5db8:d822]", "[2002:5db8:d822::1]"])
async def test_global_unicast_passes_nat64_and_6to4_of_a_public_address_included(host):
    assert await check(f"http://{host}/n") is None


def test_the_embedded_ipv4_address_decides_for_nat64_and_6to4():
    """Property: for any IPv4 address, its NAT64 and 6to4 forms are refused exactly when it is."""
    import ipaddress
    import random

    from proxy.ssrf import _special

    rng = random.Random(15)
    samples = [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(3000)]
    samples += [net.network_address + 1 for net in map(ipaddress.IPv4Network, (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4"))]
    for v4 in samples:
        refused = _special(v4) is not None
        nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | int(v4))
        six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)
        assert (_special(nat64) is not None) == refused, (v4, nat64)
        assert (_special(six_to_four) is not None) == refused, (v4, six_to_four)
