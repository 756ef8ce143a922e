"""The ownership API's writes per user are a token bucket (``ownership.write_rate_per_user``,
``ownership.write_burst_per_user``): each write is a change every gateway process applies, so a
user writing in a loop (a PATCH of their own device's name, say) would keep every process
reloading. Past the burst a write answers 429 with ``Retry-After``, audited; reads are not
counted, and another user's writes are not held back."""

from __future__ import annotations

import dataclasses

import pytest

from tests.rig.ownership import TableTokens, _harness, ownership_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(tmp_path):
    config = ownership_config(tmp_path, extra="  write_rate_per_user: 0.01\n  write_burst_per_user: 3\n")
    tokens = TableTokens()
    async with _harness(config, tokens, tokens.token) as harness:
        yield harness


async def test_writes_past_the_burst_are_refused_with_retry_after_and_reads_are_not(api):
    await api.register("alice", "w1")   # 1
    for name in ("a", "b"):             # 2, 3
        r = await api.call("PATCH", "/devices/w1", as_="alice", json={"name": name})
        assert r.status == 200, await r.text()
    r = await api.call("PATCH", "/devices/w1", as_="alice", json={"name": "c"})
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    r = await api.call("GET", "/devices/w1", as_="alice")   # not changed, and reads still answer
    assert r.status == 200 and (await r.json())["name"] == "b"
    refused = [e for e in api.audit.records if e.get("action") == "write" and e.get("reason") == "rate_limited"]
    assert len(refused) == 1 and refused[0]["resource"] == "/api/v1/devices/w1"
    await api.register("bob", "w2")     # bob's own bucket


async def test_a_user_name_that_keeps_changing_is_recorded_under_the_same_rate(api):
    # Tokens that give one sub two names in turn (an identity provider that lets users rename
    # themselves) would write a known-user change per request, each one every gateway applies.
    service = api.ownership
    carol = await api.identity("carol")
    renamed = dataclasses.replace(carol, username="carol-renamed")
    start = await service._run(service._store.last_change)
    for i in range(20):
        await service.remember_user(renamed if i % 2 else carol)
    assert await service._run(service._store.last_change) - start <= 3   # the burst, then nothing
