"""The open-file budget ``keygate serve`` checks at start counts ``http.max_connections``."""

from __future__ import annotations

import json

import pytest

from proxy import app
from proxy.config import load_config_text
from proxy.errors import CommandError


def _config(**http: int):
    text = json.dumps({"oidc": {"issuer": "http://127.0.0.1:1/realms/iot"},
                       "http": {"listen": "127.0.0.1:0", "tls": False, **http},
                       "mqtt": {"listen": "127.0.0.1:0", "tls": False, "max_connections": 100},
                       "store": {"path": "x.db", "key": "${K}"}})
    return load_config_text(text, env={"K": "budget-test-key"})


def test_each_http_connection_counts_one_open_file():
    small, large = app.descriptors_needed(_config(max_connections=10)), app.descriptors_needed(
        _config(max_connections=5010))
    assert large - small == 5000
    lingering = 1024  # mqtt.limits.lingering_sockets_max: closed sockets still held a moment
    assert small == app.BASE_DESCRIPTORS + 2 * 100 + lingering + 10 + app.HTTP_UPSTREAM_DESCRIPTORS


def test_the_refusal_names_both_numbers_and_both_caps(monkeypatch):
    monkeypatch.setattr(app, "raise_open_file_limit", lambda: 4096)
    config = _config(max_connections=5000)
    with pytest.raises(CommandError) as info:
        app.ensure_open_files(config)
    message = str(info.value)
    need = app.descriptors_needed(config)
    assert f"needs {need} open files" in message and "is 4096" in message
    assert "http.max_connections 5000" in message and "mqtt.max_connections 100 x 2" in message
    assert "mqtt.limits.lingering_sockets_max 1024" in message
    app.ensure_open_files(_config(max_connections=1000))   # 64 + 200 + 1024 + 1000 + 256 fits
