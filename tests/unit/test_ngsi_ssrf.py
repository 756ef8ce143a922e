"""Notification URL checks: each test is an attempt to make Orion call somewhere it must not."""

from __future__ import annotations

import pytest

from proxy.http.ssrf import Allowlist, check_target

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


async def test_scheme_must_fit_the_kind():
    assert await check("mqtt://public.example", "http") is not None
    assert await check("http://public.example", "mqtt") is not None


async def test_allowlist_opens_internal_receivers_and_closes_the_rest():
    allow = ("10.1.0.0/16", "receiver.internal")
    assert await check("http://internal.example/", allow=allow) is None
    assert await check("http://10.1.9.9/", allow=allow) is None
    assert await check("http://receiver.internal/", allow=allow) is None
    assert await check("http://public.example/", allow=allow) == "host is not in the notification allow-list"
    assert await check("http://127.0.0.1/", allow=allow) is not None
