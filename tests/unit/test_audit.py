"""The file audit log: bounded lines, repeated denials folded into one line with a count, nothing lost."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit import LIST_ITEMS, MAX_FOLD_WINDOWS, AuditLog, record_bound
from proxy.config import ConfigError, load_config_text
from tests.unit.policy_helpers import user

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingStream(io.StringIO):
    """Counts write calls: each is one write(2) on the line-buffered file."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def make(max_field_bytes: int = 1024, fold_seconds: float = 0.0) -> tuple[AuditLog, CountingStream, Clock]:
    stream, clock = CountingStream(), Clock()
    return AuditLog(stream, max_field_bytes=max_field_bytes, fold_seconds=fold_seconds, clock=clock,
                    monotonic=clock), stream, clock


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def refusals(records: list[dict], **match) -> int:
    """How many refusals the lines record: a folded line counts its repeats."""
    return sum(r.get("repeated", 1) for r in records if all(r.get(k) == v for k, v in match.items()))


def deny(audit: AuditLog, resource: str = "devices/d1/cmd", *, peer: str = "10.0.0.9:40000",
         client_id: str = "bob-1", rule: str | None = None, reason: str = "no rule matched", qos: int = 1) -> None:
    audit.record(protocol="mqtt", action="subscribe", decision="deny", resource=resource, identity=user("bob"),
                 rule=rule, reason=reason, peer=peer, client_id=client_id, qos=qos)


# ----------------------------------------------------------------------------- bounded fields


def test_a_long_field_is_cut_and_its_full_length_recorded():
    audit, stream, _ = make(max_field_bytes=100)
    audit.record(protocol="mqtt", action="subscribe", decision="deny", resource="a/" + "x" * 65534,
                 identity=user("u" * 5000), reason="no rule matched", peer="10.0.0.9:1", client_id="c" * 300)
    (r,) = lines(stream)
    assert r["resource"] == ("a/" + "x" * 98) + "…" and r["resource_bytes"] == 65536
    assert r["identity"]["username"] == "u" * 100 + "…" and r["identity"]["username_bytes"] == 5000
    assert r["client_id"] == "c" * 100 + "…" and r["client_id_bytes"] == 300
    assert "reason_bytes" not in r and r["reason"] == "no rule matched"


def test_a_cut_keeps_whole_characters_and_counts_utf8_bytes():
    audit, stream, _ = make(max_field_bytes=101)
    audit.record(protocol="http", action="GET", decision="deny", resource="/é" * 1000, remote="10.0.0.9")
    (r,) = lines(stream)
    kept = r["resource"].removesuffix("…")
    assert len(kept.encode()) <= 101 and ("/é" * 1000).startswith(kept) and len(kept) == 67
    assert r["resource_bytes"] == 3000


def test_strings_inside_lists_and_dicts_are_cut_and_long_lists_shortened():
    audit, stream, _ = make(max_field_bytes=64)
    devices = ["d1", "d" * 500] + [f"dev-{i}" for i in range(200)]
    audit.record(protocol="http", action="POST", decision="deny", resource="/v2/op/update", remote="10.0.0.9",
                 devices=devices, detail={"entity": "e" * 1000, "nested": {"deep": ["z" * 1000]}})
    (r,) = lines(stream)
    assert len(r["devices"]) == LIST_ITEMS and r["devices_items"] == 202
    assert r["devices"][1] == "d" * 64 + "…" and r["devices_bytes"] == {"1": 500}
    assert r["detail"]["entity"] == "e" * 64 + "…" and r["detail"]["entity_bytes"] == 1000
    deep = r["detail"]["nested"]  # below two levels of objects: kept as (cut) text
    assert deep["deep"].startswith("['zzz") and deep["deep"].endswith("…") and deep["deep_bytes"] == 1004


def test_no_line_is_longer_than_the_bound_even_with_escapes_everywhere():
    """Control characters take 6 bytes each in JSON: a 1 KiB cut string can take 6 KiB. The line
    bound still holds, and who was refused what stays readable."""
    audit, stream, _ = make(max_field_bytes=1024)
    nasty = "\x01" * 70_000
    audit.record(protocol="mqtt", action="connect", decision="deny", resource=nasty, identity=user(nasty, sub=nasty),
                 rule=nasty, reason=nasty, peer="10.0.0.9:1", client_id=nasty, will=nasty, extra_a=[nasty] * 100,
                 extra_b={nasty: nasty})
    line = stream.getvalue()
    assert len(line.encode()) <= audit.max_record_bytes == record_bound(1024) == 16384
    (r,) = lines(stream)
    assert r["protocol"] == "mqtt" and r["decision"] == "deny" and r["peer"] == "10.0.0.9:1"
    assert r["resource"].startswith("\x01") and r["resource_bytes"] == 70_000
    assert set(r["omitted"]) >= {"will", "extra_a", "extra_b"} and r["record_bytes"] > 16384


def test_the_largest_extra_field_goes_first_and_is_named():
    audit, stream, _ = make(max_field_bytes=1024)
    audit.record(protocol="http", action="POST", decision="allow", resource="/v2/op/update", remote="10.0.0.9",
                 status=204, devices=[f"{i:0>1000}" for i in range(60)])
    (r,) = lines(stream)
    assert r["omitted"] == ["devices"] and r["status"] == 204 and r["remote"] == "10.0.0.9"
    assert len(stream.getvalue()) <= audit.max_record_bytes


_TEXT = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(1, 9000))
_LEAF = st.one_of(_TEXT, st.integers(), st.floats(), st.none(), st.booleans())
_INNER = st.one_of(_LEAF, st.lists(_LEAF, max_size=80), st.dictionaries(_TEXT, _LEAF, max_size=5))
_VALUE = st.one_of(_INNER, st.lists(_INNER, max_size=80), st.dictionaries(_TEXT, _INNER, max_size=5))


@settings(max_examples=30, deadline=None)
@given(resource=_TEXT, username=_TEXT, reason=_TEXT,
       extra=st.dictionaries(st.from_regex(r"[a-z]{1,12}", fullmatch=True), _VALUE, max_size=12),
       max_field_bytes=st.sampled_from([64, 256, 1024]))
def test_every_line_is_json_within_the_bound(resource, username, reason, extra, max_field_bytes):
    extra = {k: v for k, v in extra.items() if k not in ("time", "latency_ms", "peer", "client_id", "remote")}
    audit, stream, _ = make(max_field_bytes=max_field_bytes)
    audit.record(protocol="mqtt", action="publish", decision="deny", resource=resource, identity=user(username),
                 reason=reason, peer="10.0.0.9:1", **extra)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(text.encode()) <= audit.max_record_bytes
    r = json.loads(text)
    assert r["action"] == "publish" and r["decision"] == "deny"


# ----------------------------------------------------------------------------- bodies kept

# Values that compare equal across types (1 == 1.0 == True, ["a"] and ("a",)) and values of every
# other kind: a body kept for one must never be written for another.
_ALIKE = st.sampled_from([1, 1.0, True, 0, False, 0.0, None, "1", "", ["a"], ("a",), [], (), ["a", 1], [True], [1],
                          {"a": 1}, {"a": True}, 2**70])


@settings(max_examples=300, deadline=None)
@given(records=st.lists(st.tuples(st.sampled_from(["allow", "deny"]), st.sampled_from(["/v2/a", "x" * 3000]),
                                  st.dictionaries(st.sampled_from(["status", "devices", "remote", "n"]), _ALIKE,
                                                  max_size=4)), min_size=1, max_size=12))
def test_a_log_that_keeps_bodies_writes_what_a_fresh_log_writes(records):
    """Each record through one log (bodies kept from the records before) and through a new log
    of its own (nothing kept): the same line."""
    kept, stream, _ = make(max_field_bytes=256)
    for decision, resource, extra in records:
        fresh, alone, _ = make(max_field_bytes=256)
        for audit in (kept, fresh):
            audit.record(protocol="http", action="GET", decision=decision, resource=resource,
                         identity=user("alice"), rule="r", **extra)
        assert stream.getvalue().splitlines()[-1] == alone.getvalue().strip()


def test_equal_values_of_other_types_keep_their_own_lines():
    """1 == 1.0 == True, also inside a list and as a rule: each is written as itself."""
    audit, stream, _ = make()
    for value in (1, True, 1.0, 1):
        audit.record(protocol="http", action="GET", decision="allow", resource="/v2/a", status=value)
        audit.record(protocol="http", action="GET", decision="allow", resource="/v2/a", devices=[value])
        audit.record(protocol="http", action="GET", decision="allow", resource="/v2/a", rule=value)
    written = stream.getvalue().splitlines()
    assert [json.loads(line).get("status") for line in written[0::3]] == [1, True, 1.0, 1]
    assert [line.split('"status":')[1][:4] for line in written[0::3]] == ["1}", "true", "1.0}", "1}"]
    assert [line.split('"devices":')[1][:4] for line in written[1::3]] == ["[1]}", "[tru", "[1.0", "[1]}"]
    assert [line.split('"rule":')[1][:4] for line in written[2::3]] == ["1}", "true", "1.0}", "1}"]


# ----------------------------------------------------------------------------- folding


def test_identical_denials_within_the_window_are_one_line_and_one_count():
    audit, stream, clock = make(fold_seconds=1.0)
    for _ in range(1000):
        deny(audit)
        clock.t += 0.0005
    assert len(lines(stream)) == 1  # the first, at once
    clock.t += 1.0
    audit.flush()
    first, folded = lines(stream)
    assert "repeated" not in first and folded["repeated"] == 999
    assert folded["since"] == first["time"] and folded["time"] > first["time"]
    assert {k: v for k, v in folded.items() if k not in ("time", "repeated", "since")} == \
        {k: v for k, v in first.items() if k != "time"}
    assert refusals(lines(stream), action="subscribe") == 1000


def test_the_next_record_after_the_window_writes_the_count_first():
    audit, stream, clock = make(fold_seconds=1.0)
    for _ in range(3):
        deny(audit)
    clock.t += 1.5
    audit.record(protocol="mqtt", action="publish", decision="allow", resource="x", peer="10.0.0.1:1")
    records = lines(stream)
    assert [r.get("repeated") for r in records] == [None, 2, None]
    assert records[2]["action"] == "publish"


def test_a_denial_after_the_window_opens_a_new_one():
    audit, stream, clock = make(fold_seconds=1.0)
    for _ in range(5):
        deny(audit)
        clock.t += 0.4  # the window of the first ends at +1.0
    audit.close()
    assert [r.get("repeated") for r in lines(stream)] == [None, 2, None, 1]
    assert refusals(lines(stream)) == 5


def test_close_writes_what_is_still_counted():
    audit, stream, _ = make(fold_seconds=60.0)
    for _ in range(10):
        deny(audit)
    audit.close()
    assert [r.get("repeated") for r in lines(stream)] == [None, 9]


def test_a_window_without_repeats_writes_nothing_more():
    audit, stream, clock = make(fold_seconds=1.0)
    deny(audit)
    clock.t += 2
    audit.flush()
    audit.close()
    assert len(lines(stream)) == 1


def test_allowed_records_and_other_decisions_are_never_folded():
    audit, stream, _ = make(fold_seconds=60.0)
    for decision in ("allow", "close", "fail", "error"):
        for _ in range(4):
            audit.record(protocol="mqtt", action="subscribe", decision=decision, resource="t", peer="10.0.0.9:1",
                         client_id="c")
    assert len(lines(stream)) == 16


def test_denials_differing_in_who_or_what_are_not_folded_together():
    audit, stream, _ = make(fold_seconds=60.0)
    deny(audit)
    deny(audit, peer="10.0.0.9:40001")        # another connection
    deny(audit, client_id="bob-2")            # another client id
    deny(audit, resource="devices/d2/cmd")    # another filter
    deny(audit, rule="r1", reason="denied by r1")  # another rule and reason
    deny(audit, qos=0)                        # another request
    audit.record(protocol="http", action="GET", decision="deny", resource="/v2/entities/x", identity=user("bob"),
                 reason="no rule matched", remote="10.0.0.9", status=403)
    audit.record(protocol="http", action="GET", decision="deny", resource="/v2/entities/x", identity=user("eve"),
                 reason="no rule matched", remote="10.0.0.9", status=403)  # another identity behind one address
    assert len(lines(stream)) == 8


def test_http_denials_fold_by_address_and_latency_does_not_split_them():
    audit, stream, clock = make(fold_seconds=1.0)
    for i in range(20):
        audit.record(protocol="http", action="GET", decision="deny", resource="/v2/entities/x", identity=user("bob"),
                     reason="no rule matched", remote="10.0.0.9", status=403, latency_ms=0.1 + i)
    clock.t += 1
    audit.flush()
    first, folded = lines(stream)
    assert first["latency_ms"] == 0.1 and folded["repeated"] == 19 and "latency_ms" not in folded


def test_denials_without_a_connection_are_not_folded():
    audit, stream, _ = make(fold_seconds=60.0)
    for _ in range(3):
        audit.record(protocol="http", action="subscription.revoke", decision="deny", resource="/v2/subscriptions/1",
                     reason="owner lost access")
    assert len(lines(stream)) == 3


def test_folding_is_off_at_zero_seconds():
    audit, stream, _ = make(fold_seconds=0.0)
    for _ in range(3):
        deny(audit)
    assert len(lines(stream)) == 3


def test_the_folding_state_is_capped_and_the_oldest_window_ends_early():
    audit, stream, _ = make(fold_seconds=60.0)
    for i in range(MAX_FOLD_WINDOWS + 10):
        deny(audit, resource=f"f/{i}")
        deny(audit, resource=f"f/{i}")
    assert len(audit._windows) == MAX_FOLD_WINDOWS
    records = lines(stream)
    early = [r for r in records if "repeated" in r]
    assert [r["resource"] for r in early] == [f"f/{i}" for i in range(10)]
    audit.close()
    assert refusals(lines(stream)) == 2 * (MAX_FOLD_WINDOWS + 10)


def test_a_folded_denial_costs_no_write():
    audit, stream, clock = make(fold_seconds=1.0)
    for _ in range(1000):
        deny(audit)
    assert stream.writes == 1
    clock.t += 1
    deny(audit)  # the count and the new window's first line: one write
    assert stream.writes == 2
    assert [r.get("repeated") for r in lines(stream)] == [None, 999, None]


# ----------------------------------------------------------------------------- configuration and serve


def config_text(tmp_path: Path, audit: str = "", policies: str = "") -> str:
    return textwrap.dedent(f"""\
        oidc:
          issuer: http://127.0.0.1:9/realms/iot
        store:
          path: {tmp_path / "store.db"}
          key: ${{STORE_KEY}}
        policies:
          dir: {REPO / "policies"}
          watch: false
        """) + policies + "audit:\n  path: audit.log\n" + audit


def load(tmp_path: Path, audit: str = "", policies: str = ""):
    return load_config_text(config_text(tmp_path, audit, policies), "proxy.yaml",
                            env={"STORE_KEY": secrets.token_hex(32)}, base_dir=str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ("  max_field_bytes: 10\n", "audit.max_field_bytes: must be at least 64"),
    ("  fold_seconds: -1\n", "audit.fold_seconds: must not be negative"),
])
def test_audit_settings_are_checked(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).endswith(message)


def test_a_negative_cache_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, policies="  cache_max_bytes: -1\n")
    assert str(info.value).endswith("policies.cache_max_bytes: must not be negative")


async def test_serve_opens_the_audit_log_with_its_bounds_and_flushes_it(tmp_path):
    """keygate serve: the configured field size, folding window and cache budget are the ones used, and
    the folded count reaches the file while nothing else is audited."""
    from proxy.app import Listeners, build_services, close_services

    config = load(tmp_path, "  max_field_bytes: 100\n  fold_seconds: 0.05\n", "  cache_max_bytes: 12345\n")
    services = await build_services(config)
    listeners = Listeners(services)
    try:
        assert services.audit.max_field_bytes == 100 and services.audit.fold_seconds == 0.05
        assert services.policies.compiled.cache_max_bytes == 12345
        await listeners.start()
        for _ in range(3):
            deny(services.audit, resource="x" * 500)
        log = tmp_path / "audit.log"
        for _ in range(200):  # bounded wait for the periodic flush
            if '"repeated":2' in log.read_text():
                break
            await asyncio.sleep(0.02)
        first, folded = lines(io.StringIO(log.read_text()))
        assert first["resource_bytes"] == 500 and folded["repeated"] == 2
    finally:
        await listeners.stop()
        await close_services(services)
