"""The http.* hardening settings: refused at load, with the key path, when they cannot mean what they say."""

from __future__ import annotations

import json

import pytest

from proxy.config import ConfigError, load_config_text


def load(**http):
    text = json.dumps({"oidc": {"issuer": "https://kc.example.org/realms/iot"},
                       "http": {"tls": False, **http}})
    return load_config_text(text, "proxy.yaml", env={})


def error(**http) -> str:
    with pytest.raises(ConfigError) as info:
        load(**http)
    return str(info.value)


def test_defaults():
    http = load().http
    assert (http.header_timeout_seconds, http.body_timeout_seconds, http.max_json_depth) == (10.0, 30.0, 32)
    assert http.notification_allowlist == () and http.strip_request_headers == ()
    assert (http.write_timeout_seconds, http.max_pipelined_requests, http.max_connections) == (30.0, 16, 1000)


def test_receivers_are_accepted():
    cfg = load(notification_allowlist=["http://10.0.0.5:8080/notify", "mqtt://10.0.0.5:1883", "https://hooks.lan"])
    assert len(cfg.http.notification_allowlist) == 3


@pytest.mark.parametrize("entry", ["10.0.0.5", "10.0.0.0/8", "receiver.lan"])
def test_the_old_per_host_form_is_refused_with_the_new_spelling(entry):
    message = error(notification_allowlist=["http://ok.lan:80/n", entry])
    assert message.startswith("proxy.yaml: http.notification_allowlist[1]: ")
    assert "scheme://host:port" in message


@pytest.mark.parametrize("key,value,problem", [
    ("header_timeout_seconds", 0, "must be positive"), ("body_timeout_seconds", -1, "must be positive"),
    ("max_json_depth", 0, "at least 1"), ("write_timeout_seconds", 0, "must be positive"),
    ("max_pipelined_requests", 0, "at least 1"), ("max_connections", -5, "at least 1"),
    ("strip_request_headers", ["X-Ok", "bad header"], "not a header name"),
])
def test_bad_values_name_their_key(key, value, problem):
    message = error(**{key: value})
    assert f"http.{key}" in message and problem in message
