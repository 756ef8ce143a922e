"""The MQTT shell's Prometheus metrics: the counters the session's ``CountMetrics`` commands
name (the session itself touches no global), and the shell's own (connections, bytes,
refusals, lingering closes).

What is counted per message or per chunk is a :class:`~proxy.metrics.Tally` (plain integers
read at scrape time), not a locked counter, and its labelled children are looked up once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from proxy.metrics import REGISTRY, Tally, TallyChild
from proxy.mqtt.admission import CONNECTIONS_PER_IDENTITY, PER_ADDRESS, RATE, RECONNECT_PENALTY
from proxy.mqtt.commands import Metric

__all__ = ["AUTHENTICATIONS", "BYTES", "BYTES_IN", "BYTES_OUT", "CONNECTIONS_ACTIVE", "CONNECTIONS_CLOSED",
           "CONNECTIONS_REFUSED", "CONNECTIONS_TOTAL", "DECISIONS", "LINGER_REFUSED", "MESSAGES",
           "PROTOCOL_ERRORS", "RATE_LIMITED", "REFUSED_BY_REASON", "TALLIED", "count_metrics"]

# -- what the session counts (CountMetrics), by Metric.name
DECISIONS = Tally("keygate_mqtt_decisions", "MQTT authorization decisions", ["action", "result"])
MESSAGES = Tally("keygate_mqtt_messages", "PUBLISH packets forwarded, by direction", ["direction"])
AUTHENTICATIONS = Counter("keygate_mqtt_authentications", "MQTT authentications",
                          ["method", "result"], registry=REGISTRY)
RATE_LIMITED = Counter("keygate_mqtt_rate_limited", "MQTT messages over the per-identity rate limit",
                       registry=REGISTRY)
PROTOCOL_ERRORS = Counter("keygate_mqtt_protocol_errors", "MQTT protocol violations refused",
                          ["side"], registry=REGISTRY)
_SESSION_METRICS: dict[str, Any] = {"decisions": DECISIONS, "messages": MESSAGES, "authentications": AUTHENTICATIONS,
                                    "rate_limited": RATE_LIMITED, "protocol_errors": PROTOCOL_ERRORS}
_CHILDREN: dict[Metric, Any] = {}  # Metric -> its labelled child (a Tally's has .value, a Counter's .inc)
#: Metric -> its labelled Tally child, for the metrics counted per chunk (decisions, messages): the
#: shell adds to ``.value`` itself; a metric not in here goes through :func:`count_metrics`.
TALLIED: dict[Metric, Any] = {}


def count_metrics(counts: Sequence[tuple[Metric, int]]) -> None:
    """Carry out a CountMetrics command."""
    for metric, n in counts:
        child = _CHILDREN.get(metric)
        if child is None:
            parent = _SESSION_METRICS[metric.name]
            child = _CHILDREN[metric] = parent.labels(*metric.labels) if metric.labels else parent
            if isinstance(child, TallyChild):
                TALLIED[metric] = child
        if hasattr(child, "value"):
            child.value += n
        else:
            child.inc(n)


# -- the shell's own
CONNECTIONS_ACTIVE = Gauge("keygate_mqtt_connections_active", "Open MQTT client connections",
                           registry=REGISTRY)
CONNECTIONS_TOTAL = Counter("keygate_mqtt_connections", "Accepted MQTT client connections",
                            ["transport"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("keygate_mqtt_connections_refused", "Connections refused before CONNECT",
                              ["reason"], registry=REGISTRY)
CONNECTIONS_CLOSED = Counter("keygate_mqtt_connections_closed", "MQTT connections closed by the gateway, by reason",
                             ["reason"], registry=REGISTRY)
BYTES = Tally("keygate_mqtt_bytes", "Bytes read, by direction", ["direction"])  # per chunk: a plain integer
BYTES_IN = BYTES.labels("client_to_broker")
BYTES_OUT = BYTES.labels("broker_to_client")

LINGER_REFUSED = Counter("keygate_mqtt_linger_aborted",
                         "Closed sockets aborted instead of lingering (lingering_sockets_max reached)",
                         registry=REGISTRY)
# The admission's refusals, by reason (labelled once).
REFUSED_BY_REASON = {why: CONNECTIONS_REFUSED.labels(why)
                     for why in (PER_ADDRESS, RATE, RECONNECT_PENALTY, CONNECTIONS_PER_IDENTITY)}
