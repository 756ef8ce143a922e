"""The connection phase moves only along its transition table (proxy/mqtt/phase.py)."""

import pytest

from proxy.mqtt.phase import AUTH, CLOSED, CONNECT, OPEN, TRANSITIONS, UPSTREAM, Phase, PhaseError, advance


def test_the_handshake_moves_forward_and_any_phase_can_close():
    assert advance(advance(advance(advance(CONNECT, AUTH), UPSTREAM), OPEN), CLOSED) is CLOSED
    for phase in (CONNECT, AUTH, UPSTREAM, OPEN):
        assert advance(phase, CLOSED) is CLOSED


@pytest.mark.parametrize("now", list(Phase))
@pytest.mark.parametrize("to", list(Phase))
def test_every_other_move_is_refused(now, to):
    if to in TRANSITIONS[now]:
        return
    with pytest.raises(PhaseError):
        advance(now, to)  # e.g. CONNECT -> OPEN (skipping authentication), CLOSED -> anything
