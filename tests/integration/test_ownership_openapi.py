"""The OpenAPI document is valid OpenAPI 3, describes every route, and a bounded
schemathesis run against the live API (real port) finds no 500s and no
answers outside the document."""

from __future__ import annotations

import dataclasses
import json
import urllib.request

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.certs import init_dir
from proxy.identity.tokens import TokenValidator
from tests.rig.ownership import LiveApi, rig_config

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 10  # x 16 operations: ~160 requests (positive, negative, an existing device)


def fetch_spec(live: LiveApi) -> dict:
    with urllib.request.urlopen(f"{live.base_url}/openapi.json", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return json.loads(r.read())


def live_api(tmp_path, oidc) -> LiveApi:
    # With a device CA, so that certificate enrollment is part of what is fuzzed.
    init_dir(tmp_path / "certs")
    base = rig_config(tmp_path, oidc)
    config = dataclasses.replace(base, tls=dataclasses.replace(
        base.tls, client_ca="certs/devices-ca.crt", client_ca_key="certs/devices-ca.key"))
    return LiveApi(config, lambda: TokenValidator(config.oidc))


def test_openapi_document_is_valid_and_covers_every_route(tmp_path, oidc):
    with live_api(tmp_path, oidc) as live:
        spec = fetch_spec(live)
    validate(spec)
    assert spec["openapi"].startswith("3.") and spec["servers"] == [{"url": "/api/v1"}]
    documented = {(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == {
        ("POST", "/devices"), ("GET", "/devices"), ("GET", "/devices/{id}"), ("PATCH", "/devices/{id}"),
        ("DELETE", "/devices/{id}"), ("POST", "/devices/{id}/keys/{slot}"),
        ("POST", "/devices/{id}/delegations"), ("GET", "/devices/{id}/delegations"),
        ("DELETE", "/devices/{id}/delegations/{delegation}"), ("GET", "/me/data"), ("DELETE", "/me/data"),
        ("POST", "/devices/{id}/certificate"), ("GET", "/devices/{id}/certificate"),
        ("DELETE", "/devices/{id}/certificate"), ("DELETE", "/devices/{id}/certificate/{serial}"),
        ("GET", "/openapi.json"),
    }


def test_schemathesis_finds_no_server_errors(tmp_path, oidc):
    with live_api(tmp_path, oidc) as live:
        spec = fetch_spec(live)
        schema = schemathesis.openapi.from_dict(spec)
        headers = {"Authorization": f"Bearer {oidc.password_token('alice')}"}
        checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                  response_schema_conformance]
        operations = [result.ok() for result in schema.get_all_operations()]
        # DELETE /me/data last: it wipes what the others work on.
        operations.sort(key=lambda op: op.label == "DELETE /me/data")
        statuses: dict[str, set[int]] = {}
        for op in operations:
            ensure_device(live, headers)
            strategies = [op.as_strategy(generation_mode=mode)
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
            if "{id}" in op.path:  # half the cases aim at a device that exists
                strategies.append(op.as_strategy(path_parameters={"id": "fuzz-dev"}))

            @given(case=st.one_of(strategies))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            def run(case):
                response = case.call(base_url=live.base_url, headers=headers, timeout=10)
                statuses.setdefault(op.label, set()).add(response.status_code)  # noqa: B023 (run in this iteration)
                case.validate_response(response, checks=checks)

            run()
        assert all(code < 500 for codes in statuses.values() for code in codes), statuses
        # The run reached past validation: devices were registered and found.
        assert 201 in statuses["POST /devices"] and 200 in statuses["GET /devices/{id}"], statuses


def ensure_device(live: LiveApi, headers: dict) -> None:
    body = json.dumps({"id": "fuzz-dev", "type": "Sensor"}).encode()
    req = urllib.request.Request(f"{live.base_url}/devices", data=body, method="POST",
                                 headers={**headers, "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        assert exc.code in (403, 409)


def test_the_document_describes_the_typed_principals(tmp_path):
    """Each form of a delegation's ``to`` the API takes, and the one it answers with."""
    from ownership.openapi import build_openapi
    from tests.rig.ownership import ownership_config
    spec = build_openapi(ownership_config(tmp_path))
    validate(spec)
    schemas = spec["components"]["schemas"]
    forms = schemas["NewDelegation"]["properties"]["to"]["oneOf"]
    assert forms[0]["type"] == "string"
    assert [f["required"] for f in forms[1:]] == [["user"], ["service"], ["group"], ["public"]]
    shown = schemas["Delegation"]["properties"]["to"]["oneOf"]
    assert [sorted(f["required"]) for f in shown] == [["user", "username"], ["service"], ["group"], ["public"]]
    responses = spec["paths"]["/devices/{id}/delegations"]["post"]["responses"]
    assert "unknown_user" in responses["404"]["description"] and "ambiguous_user" in responses["409"]["description"]
    assert "known_user" in schemas["PersonalData"]["properties"]
