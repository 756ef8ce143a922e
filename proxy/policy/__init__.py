"""YAML access policies: language, compiled engine, hot reload and tools.

Public API (the gateways code against exactly this)::

    from proxy.policy import Policies, Decision, SubscribeDecision, Verdict, PolicyError
    policies = Policies.from_dir("policies/", facts)       # PolicyError on a broken set
    policies.may_publish(identity, "devices/d1/telemetry", qos=1, retain=False, client_id="c")
    policies.may_subscribe(identity, "devices/d1/#", qos=1, client_id="c")   # -> SubscribeDecision
    policies.may_receive(identity, "devices/d1/telemetry", client_id="c")
    policies.may_http(identity, "GET", "/v2/entities/d1")
    unsubscribe = policies.subscribe(callback)   # callback(policies) after every swap
    await policies.watch()                       # hot reload task

Modules: :mod:`.language` (the YAML schema and its errors), :mod:`.patterns`
(topic and path patterns, matching and containment), :mod:`.subjects` (who a
rule is for), :mod:`.engine` (the compiled index), :mod:`.holder` (the
swappable :class:`Policies`, hot reload, metrics), :mod:`.paths` (HTTP path
normalisation), :mod:`.checker` and :mod:`.testing` (the ``keygate policy``
tools), :mod:`.cli`.
"""

from proxy.policy.decision import NO_RULE, Decision, PolicyError, SubscribeDecision, Verdict
from proxy.policy.holder import Policies
from proxy.policy.paths import PathError, normalize_path

__all__ = ["Policies", "Decision", "SubscribeDecision", "Verdict", "PolicyError", "NO_RULE",
           "normalize_path", "PathError"]
