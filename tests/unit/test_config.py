"""proxy.yaml loading: every mistake is one line naming the file, the line and the key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, load_config_text, parse_hostport, read_secret

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
oidc:
  issuer: https://kc.example.org/realms/iot
"""


def load(text: str, **env: str):
    return load_config_text(textwrap.dedent(text), "proxy.yaml", env=env)


def error(text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, **env)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    assert "Traceback" not in message
    return message


# ----------------------------------------------------------------------------- the four classic mistakes


def test_missing_key_names_the_path():
    assert error("oidc:\n  audience: iot-proxy\n") == "proxy.yaml:2: oidc.issuer: required"


def test_missing_section_names_it():
    assert error("audit:\n  path: '-'\n") == "proxy.yaml: oidc: required"


def test_unknown_key_is_an_error_with_a_suggestion():
    msg = error(MINIMAL + "  audiance: iot-proxy\n")
    assert msg == "proxy.yaml:3: oidc.audiance: unknown key (did you mean audience?)"


def test_unknown_top_level_section():
    assert error(MINIMAL + "metrix:\n  listen: 127.0.0.1:9100\n").startswith("proxy.yaml:3: metrix: unknown key")


@pytest.mark.parametrize("snippet, expected", [
    ("  leeway_seconds: soon\n", "proxy.yaml:3: oidc.leeway_seconds: expected a number, got 'soon'"),
    ("  leeway_seconds: '30'\n", "proxy.yaml:3: oidc.leeway_seconds: expected a number, got '30'"),
    ("  leeway_seconds: nan\n", "proxy.yaml:3: oidc.leeway_seconds: expected a number, got 'nan'"),
    ("  token_cache_size: 1.5\n", "proxy.yaml:3: oidc.token_cache_size: expected an integer, got '1.5'"),
    ("  algorithms: RS256\n", "proxy.yaml:3: oidc.algorithms: expected a list, got a scalar 'RS256'"),
    ("  roles: {a: b}\n", "proxy.yaml:3: oidc.roles: expected a list, got a mapping"),
    ("  audience: [a, b]\n", "proxy.yaml:3: oidc.audience: expected a string, got a list"),
    ("  introspection:\n    enabled: maybe\n",
     "proxy.yaml:4: oidc.introspection.enabled: expected true or false, got 'maybe'"),
])
def test_wrong_type_names_the_path(snippet, expected):
    assert error(MINIMAL + snippet) == expected


def test_wrong_literal_choice():
    assert error(MINIMAL + "tls:\n  client_auth: sometimes\n") == \
        "proxy.yaml:4: tls.client_auth: expected one of optional, required, got 'sometimes'"


def test_list_items_are_named_by_index():
    assert error(MINIMAL + "  roles: [realm_access.roles, [x]]\n") == \
        "proxy.yaml:3: oidc.roles[1]: expected a string, got a list"


def test_missing_env_var_names_the_key_and_the_variable():
    assert error("oidc:\n  issuer: ${KC_ISSUER}\n") == \
        "proxy.yaml:2: oidc.issuer: environment variable KC_ISSUER is not set"


def test_key_given_twice():
    assert error(MINIMAL + "  issuer: https://other.example/realms/iot\n") == "proxy.yaml:3: oidc.issuer: given twice"


def test_invalid_yaml_names_the_line():
    msg = error(MINIMAL + "  audience: [unclosed\n")
    assert msg.startswith("proxy.yaml:") and "invalid YAML" in msg


def test_empty_file():
    assert error("") == "proxy.yaml: the file is empty"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file$"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- substitution


def test_env_substitution_and_defaults():
    cfg = load("oidc:\n  issuer: ${ISS}\n  audience: ${AUD:-iot-proxy}\n  leeway_seconds: ${LEEWAY:-5}\n",
               ISS="https://kc.example.org/realms/iot")
    assert cfg.oidc.issuer == "https://kc.example.org/realms/iot"
    assert cfg.oidc.audience == "iot-proxy"
    assert cfg.oidc.leeway_seconds == 5.0


def test_empty_env_var_takes_the_default():
    cfg = load(MINIMAL + "  audience: ${AUD:-iot-proxy}\n", AUD="")
    assert cfg.oidc.audience == "iot-proxy"


def test_env_cannot_inject_yaml_structure():
    cfg = load(MINIMAL + "  audience: ${AUD}\n", AUD="x\n  algorithms: [HS256]")
    assert cfg.oidc.audience == "x\n  algorithms: [HS256]"
    assert cfg.oidc.algorithms == ("RS256", "ES256", "PS256")


def test_malformed_substitution():
    assert error(MINIMAL + "  audience: ${not closed\n") == \
        "proxy.yaml:3: oidc.audience: malformed ${...} substitution"


# ----------------------------------------------------------------------------- secrets


def test_secrets_refuse_literal_values():
    assert error(MINIMAL + "store:\n  key: hunter2\n") == \
        "proxy.yaml:4: store.key: secrets may not be written in the file; use ${ENV_VAR} or the *_file key"
    assert error(MINIMAL + "  introspection:\n    client_id: iot-proxy\n    client_secret: s3cret\n").startswith(
        "proxy.yaml:5: oidc.introspection.client_secret: secrets may not be written")


def test_secrets_from_env_or_file(tmp_path):
    cfg = load(MINIMAL + "store:\n  key: ${STORE_KEY}\n", STORE_KEY="k" * 64)
    assert cfg.store.key == "k" * 64
    (tmp_path / "store.key").write_text("from-file\n")
    (tmp_path / "proxy.yaml").write_text(MINIMAL + "store:\n  key_file: store.key\n")
    cfg = load_config(tmp_path / "proxy.yaml", env={})
    assert read_secret(cfg.store.key, cfg.store.key_file, cfg) == "from-file"


def test_unreadable_secret_file_is_one_line(tmp_path):
    (tmp_path / "proxy.yaml").write_text(MINIMAL + "store:\n  key_file: missing.key\n")
    cfg = load_config(tmp_path / "proxy.yaml", env={})
    with pytest.raises(ConfigError, match=r"missing\.key: cannot read secret"):
        read_secret(cfg.store.key, cfg.store.key_file, cfg)


# ----------------------------------------------------------------------------- rules across fields


@pytest.mark.parametrize("algs, bad", [("[RS256, HS256]", "HS256"), ("[none]", "none"), ("[RS256, hs512]", "hs512")])
def test_symmetric_and_none_algorithms_are_refused(algs, bad):
    assert error(MINIMAL + f"  algorithms: {algs}\n") == \
        f"proxy.yaml: oidc.algorithms: {bad} is not allowed (asymmetric algorithms only)"


def test_issuer_must_be_a_url():
    assert error("oidc:\n  issuer: keycloak\n") == "proxy.yaml: oidc.issuer: must be an http(s) URL"


def test_negative_durations_are_refused():
    assert error(MINIMAL + "  leeway_seconds: -5\n") == "proxy.yaml: oidc.leeway_seconds: must not be negative"
    assert error(MINIMAL + "  jwks_refresh_seconds: 0\n") == "proxy.yaml: oidc.jwks_refresh_seconds: must be at least 1"


def test_introspection_needs_a_client_id():
    assert error(MINIMAL + "  introspection:\n    enabled: true\n") == \
        "proxy.yaml: oidc.introspection.client_id: required when introspection is enabled"


def test_tls_listener_needs_a_certificate():
    assert error(MINIMAL + "mqtt:\n  listen: 127.0.0.1:8883\n") == \
        "proxy.yaml: tls.cert: required when a listener uses TLS"


def test_bad_listen_address():
    assert error(MINIMAL + "metrics:\n  listen: localhost\n") == \
        "proxy.yaml: metrics.listen: expected host:port, got 'localhost'"


def test_parse_hostport():
    assert parse_hostport("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_hostport("[::1]:8883") == ("::1", 8883)
    assert parse_hostport(":8443") == ("0.0.0.0", 8443)
    with pytest.raises(ValueError):
        parse_hostport("host:99999")


# ----------------------------------------------------------------------------- defaults and the shipped file


def test_defaults():
    cfg = load(MINIMAL)
    o = cfg.oidc
    assert o.algorithms == ("RS256", "ES256", "PS256")
    assert o.leeway_seconds == 30 and o.unknown_kid_cooldown_seconds == 30 and o.jwks_refresh_seconds == 300
    assert o.roles == ("realm_access.roles",) and o.username_claim == "preferred_username"
    assert o.audience == "" and o.discovery_url == ""
    assert not o.introspection.enabled and o.introspection.cache_seconds == 10
    assert cfg.mqtt is None and cfg.http is None and cfg.metrics is None
    assert cfg.tls.min_version == "1.2" and cfg.tls.client_auth == "optional"
    assert cfg.audit.path == "-"


def test_shipped_proxy_yaml_loads():
    cfg = load_config(REPO / "proxy.yaml", env={"KEYGATE_STORE_KEY": "0" * 64})
    assert cfg.oidc.audience == "iot-proxy"
    assert set(cfg.oidc.roles) == {"realm_access.roles", "resource_access.iot-proxy.roles"}
    assert cfg.mqtt is not None and cfg.http is not None and cfg.metrics is not None
    assert cfg.resolve(cfg.tls.cert) == REPO / "certs" / "server.crt"


def test_shipped_proxy_yaml_needs_the_store_key():
    with pytest.raises(ConfigError, match=r"proxy\.yaml:\d+: store\.key: environment variable KEYGATE_STORE_KEY"):
        load_config(REPO / "proxy.yaml", env={})


def test_the_identity_limits_of_issue_14_are_checked():
    base = MINIMAL + "mqtt:\n  tls: false\n  limits:\n"
    assert error(base + "    qos2_hold_bytes_per_identity: 1000\n") == \
        "proxy.yaml: mqtt.limits.qos2_hold_bytes_per_identity: must be at least mqtt.max_packet_size"
    assert error(base + "    connections_per_identity: -1\n") == \
        "proxy.yaml: mqtt.limits.connections_per_identity: must be 0 or more"
    assert error(base + "    lingering_sockets_max: -1\n") == \
        "proxy.yaml: mqtt.limits.lingering_sockets_max: must be 0 or more"
    limits = load(base + "    connections_per_identity: 5\n").mqtt.limits
    assert (limits.connections_per_identity, limits.qos2_hold_bytes_per_identity, limits.lingering_sockets_max) == \
        (5, 4194304, 1024)
