"""The playbook helper refuses what it must: a test written with it fails when the session
returns a command more, a command less, or another one than the test says."""

from __future__ import annotations

import pytest

from proxy.mqtt.commands import OpenUpstream
from proxy.mqtt.events import Authenticated, ClientData
from tests.unit.mqtt_playbook import Audit, Authenticates, Closes, Playbook, ToBroker, ToClient
from tests.unit.test_mqtt_session import ALICE, connect_packet, make, upstream


def connected() -> Playbook:
    s, _, _ = make()
    return Playbook(s.session) >> ClientData(connect_packet()) << Authenticates(kind="connect")


def test_the_whole_conversation_passes():
    assert (connected()
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(client_id="u/sub-alice/app-1"))
            << Audit(action="connect", decision="allow"))


def test_a_command_not_expected_fails():
    pb = connected() >> Authenticated(ALICE) << OpenUpstream() << ToBroker(upstream())
    with pytest.raises(AssertionError, match="returned but not expected"):
        bool(pb)  # the audit record was left out


def test_a_command_more_than_returned_fails():
    pb = connected()
    with pytest.raises(AssertionError, match="nothing more was returned"):
        pb << OpenUpstream()


@pytest.mark.parametrize("wrong", [ToClient(b"\x20\x02\x00\x00"), Closes("auth_failed"),
                                   ToBroker(upstream(client_id="app-1"))])
def test_another_command_fails(wrong):
    pb = connected() >> Authenticated(ALICE) << OpenUpstream()
    with pytest.raises(AssertionError, match="expected"):
        pb << wrong


def test_a_field_of_an_audit_record_that_differs_fails():
    pb = connected() >> Authenticated(ALICE) << OpenUpstream() << ToBroker(upstream())
    with pytest.raises(AssertionError, match="these differ"):
        pb << Audit(action="connect", decision="deny")


def test_the_next_event_checks_what_the_last_left():
    pb = connected() >> Authenticated(ALICE) << OpenUpstream()
    with pytest.raises(AssertionError, match="returned but not expected"):
        pb >> ClientData(b"\xc0\x00")
