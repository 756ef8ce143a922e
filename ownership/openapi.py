"""The API's OpenAPI 3.0 document, built from the same limits the handlers enforce."""

from __future__ import annotations

from typing import Any

from proxy.config import Config

# Printable ASCII minus whitespace and Orion's forbidden characters.
DEVICE_ID_PATTERN = r"^(?!\.\.?$)[!$*+,\-.0-9:@A-Z\[\]^_`a-z{|}~]{1,256}$"
TEXT_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema_ref: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": schema_ref}}}}
    if headers:
        out["headers"] = headers
    return out


def _body(schema_ref: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": {"$ref": schema_ref}}}}


_COMMON = {"401": _error("missing or invalid bearer token"), "403": _error("not allowed"),
           "503": _error("the token issuer cannot be reached")}
_WITH_BODY = {"400": _error("invalid input"), "413": _error("body too large"),
              "415": _error("the body must be application/json")}
_NOT_FOUND = {"404": _error("no such device (or not yours)")}

_DEVICE_ID = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": DEVICE_ID_PATTERN, "maxLength": 256}}

_TEXT = {"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN, "nullable": True}
# A principal's name: no whitespace, no control characters.
_NAME_PATTERN = r"^[^\s\u0000-\u001f\u007f-\u009f]+$"
_SERIAL_PATTERN = r"^[0-9a-f]+$"
_FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"


def build_openapi(config: Config) -> dict[str, Any]:
    prefix = config.http.api_prefix if config.http is not None else "/api/v1"
    location = {"anyOf": [
        {"type": "string", "nullable": True, "maxLength": 256, "pattern": TEXT_PATTERN,
         "description": "a place in words"},
        {"type": "object", "nullable": True, "additionalProperties": False, "required": ["lat", "lon"],
         "properties": {
             "lat": {"type": "number", "minimum": -90, "maximum": 90},
             "lon": {"type": "number", "minimum": -180, "maximum": 180},
             "alt": {"type": "number", "minimum": -100000, "maximum": 1000000},
             "label": {"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN},
         }},
    ]}
    device_fields = {
        "type": {"type": "string", "pattern": DEVICE_ID_PATTERN, "maxLength": 256},
        "name": _TEXT, "model": _TEXT, "location": location, "public": {"type": "boolean"},
    }
    device = {
        "type": "object", "required": ["id", "type", "owner", "public", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"}, "type": {"type": "string"},
            "name": {"type": "string", "nullable": True}, "model": {"type": "string", "nullable": True},
            "location": {"description": "a string, an object with lat and lon, or null"},
            "public": {"type": "boolean"},
            "service": {"type": "string"},
            "owner": {"type": "object", "properties": {"sub": {"type": "string"}, "username": {"type": "string"}}},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "relation": {"type": "string", "enum": ["owner", "delegate", "admin"]},
            "permissions": {"type": "array", "items": {"type": "string"}},
        },
    }
    name = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NAME_PATTERN}

    def one(key: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": [key], "properties": {key: schema},
                "description": description}

    principal_in = {"oneOf": [
        {"type": "string", "minLength": 1, "maxLength": 261, "pattern": _NAME_PATTERN,
         "description": 'a user name, resolved to the sub of the one user seen under it (404 unknown_user, '
                        '409 ambiguous_user); "anonymous" is the public, "group:NAME" a group'},
        one("user", name, "a user, by the provider's sub"),
        one("service", name, "a service account, by its client id"),
        one("group", name, "a group (the token's groups claim)"),
        one("public", {"type": "boolean", "enum": [True]}, "unauthenticated callers"),
    ]}
    principal_out = {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["user", "username"], "properties": {
            "user": {"type": "string", "nullable": True,
                     "description": "the sub; null for a user name a migrated store could not tie to one "
                                    "(it matches nobody: grant it again)"},
            "username": {"type": "string", "nullable": True, "description": "the name last seen, for display"}}},
        one("service", {"type": "string"}, "a service account, by client id"),
        one("group", {"type": "string"}, "a group"),
        one("public", {"type": "boolean", "enum": [True]}, "unauthenticated callers"),
    ]}
    delegation = {
        "type": "object", "required": ["id", "device", "to", "permission", "active"],
        "properties": {
            "id": {"type": "string"}, "device": {"type": "string"}, "to": principal_out,
            "permission": {"type": "string", "enum": ["read", "write", "readwrite"]},
            "expires_at": {"type": "string", "format": "date-time", "nullable": True},
            "active": {"type": "boolean"}, "granted_by": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    }
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "NewDevice": {
            "type": "object", "additionalProperties": False, "required": ["id", "type"],
            "properties": {"id": {"type": "string", "pattern": DEVICE_ID_PATTERN, "maxLength": 256},
                           **device_fields,
                           "service": {"type": "string", "pattern": r"^[A-Za-z0-9_]{0,50}$",
                                       "description": "the Orion tenant: http.fiware_service when left out or "
                                                      "empty; another only if ownership.tenants_by_role allows "
                                                      "it to one of the caller's roles (lower-cased)"},
                           "adopt": {"type": "boolean",
                                     "description": "admin only: register the id although Orion already holds "
                                                    "an entity under it, which the owner then manages"},
                           "owner": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": TEXT_PATTERN,
                                     "description": "admin only: the sub of the user to register the device for"},
                           "owner_username": {"type": "string", "minLength": 1, "maxLength": 256,
                                              "pattern": TEXT_PATTERN,
                                              "description": "admin only, with owner: the owner's name to show"}},
        },
        "DevicePatch": {"type": "object", "additionalProperties": False, "properties": device_fields},
        "Device": device,
        "RegisteredDevice": {"allOf": [{"$ref": "#/components/schemas/Device"}, {
            "type": "object", "required": ["k1", "k2", "mqtt", "http"],
            "properties": {"k1": {"type": "string"}, "k2": {"type": "string"},
                           "mqtt": {"type": "string"}, "http": {"type": "string"}}}]},
        "DeviceList": {"type": "object", "required": ["devices"], "properties": {
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}}},
        "NewKey": {"type": "object", "required": ["device", "slot", "key"], "properties": {
            "device": {"type": "string"}, "slot": {"type": "string", "enum": ["k1", "k2"]},
            "key": {"type": "string"}}},
        "NewDelegation": {
            "type": "object", "additionalProperties": False, "required": ["to", "permission"],
            "properties": {
                "to": principal_in,
                "permission": {"type": "string", "enum": ["read", "write", "readwrite"]},
                "expires_at": {"type": "string", "format": "date-time", "nullable": True},
            },
        },
        "Delegation": delegation,
        "DelegationList": {"type": "object", "required": ["delegations"], "properties": {
            "delegations": {"type": "array", "items": {"$ref": "#/components/schemas/Delegation"}}}},
        "PersonalData": {"type": "object", "required": ["user", "devices"], "properties": {
            "user": {"type": "object"}, "devices": {"type": "array", "items": {"type": "object"}},
            "delegations_granted": {"type": "array", "items": {"type": "object"}},
            "delegations_received": {"type": "array", "items": {"type": "object"}},
            "subscriptions": {"type": "array", "items": {"type": "object"}},
            "quota": {"type": "object", "nullable": True},
            "known_user": {"type": "object", "nullable": True,
                           "description": "the user name this gateway last saw for the caller's sub"},
            "exported_at": {"type": "string", "format": "date-time"}}},
        "Erased": {"type": "object", "required": ["erased"], "properties": {
            "erased": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        "CertificateRequest": {
            "type": "object", "additionalProperties": False, "required": ["csr"],
            "properties": {"csr": {"type": "string", "maxLength": 16384,
                                   "description": "PEM PKCS#10 CSR; subject CN = the device id"}}},
        "IssuedCertificate": {
            "type": "object", "additionalProperties": False,
            "required": ["certificate", "chain", "serial", "fingerprint", "not_after"],
            "properties": {
                "certificate": {"type": "string", "description": "the device's certificate, PEM"},
                "chain": {"type": "string", "description": "the certificate, then the device CA's, PEM"},
                "serial": {"type": "string", "pattern": _SERIAL_PATTERN},
                "fingerprint": {"type": "string", "pattern": _FINGERPRINT_PATTERN},
                "not_after": {"type": "string", "format": "date-time"}}},
        "EnrolledCertificate": {
            "type": "object", "required": ["serial", "fingerprint", "not_after", "created_at"],
            "properties": {
                "serial": {"type": "string", "pattern": _SERIAL_PATTERN},
                "fingerprint": {"type": "string", "pattern": _FINGERPRINT_PATTERN},
                "not_after": {"type": "string", "format": "date-time"},
                "created_at": {"type": "string", "format": "date-time"}}},
        "CertificateList": {"type": "object", "required": ["certificates"], "properties": {
            "certificates": {"type": "array", "maxItems": 2,
                             "items": {"$ref": "#/components/schemas/EnrolledCertificate"}}}},
    }
    no_content = {"description": "done"}
    paths: dict[str, Any] = {
        "/devices": {
            "post": {
                "operationId": "registerDevice", "summary": "Register a device owned by the caller",
                "requestBody": _body("#/components/schemas/NewDevice"),
                "responses": {
                    "201": _json("#/components/schemas/RegisteredDevice",
                                 "registered; k1 and k2 are shown only in this response",
                                 {"Location": {"schema": {"type": "string"}}}),
                    "403": _error("device quota reached (code quota_exceeded), a tenant the caller may not use "
                                  "(code tenant_not_allowed), or adopt / owner without the admin role "
                                  "(code forbidden)"),
                    "409": _error("the id is taken: registered, an entity in Orion in the device's tenant, or "
                                  "its earlier registration still being removed from Orion (code conflict)"),
                    "503": _error("the token issuer cannot be reached, or Orion cannot be asked whether the id "
                                  "is free (code orion_unreachable; Retry-After)"),
                    **_WITH_BODY, **{k: v for k, v in _COMMON.items() if k not in ("403", "503")},
                },
            },
            "get": {
                "operationId": "listDevices", "summary": "The caller's devices",
                "parameters": [{"name": "include", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["delegated", "all"]},
                                "description": "delegated: add devices delegated to the caller; all: every "
                                               "device (admin role)"}],
                "responses": {"200": _json("#/components/schemas/DeviceList", "the devices"),
                              "400": _error("unknown parameter"), **_COMMON},
            },
        },
        "/devices/{id}": {
            "parameters": [_DEVICE_ID],
            "get": {"operationId": "getDevice", "summary": "One device (owner or admin)",
                    "responses": {"200": _json("#/components/schemas/Device", "the device"),
                                  **_NOT_FOUND, **_COMMON}},
            "patch": {"operationId": "updateDevice", "summary": "Change a device's fields (owner or admin)",
                      "requestBody": _body("#/components/schemas/DevicePatch"),
                      "responses": {"200": _json("#/components/schemas/Device", "the updated device"),
                                    **_NOT_FOUND, **_WITH_BODY, **_COMMON}},
            "delete": {"operationId": "deleteDevice",
                       "summary": "Delete a device, its keys, delegations and certificates, and (with Orion) its "
                                  "entity and subscriptions",
                       "responses": {"204": no_content, **_NOT_FOUND, **_COMMON}},
        },
        "/devices/{id}/keys/{slot}": {
            "parameters": [_DEVICE_ID, {"name": "slot", "in": "path", "required": True,
                                        "schema": {"type": "string", "enum": ["k1", "k2"]}}],
            "post": {"operationId": "rotateKey", "summary": "Replace one device key; the new one is shown once",
                     "responses": {"200": _json("#/components/schemas/NewKey", "the new key"),
                                   **_NOT_FOUND, **_COMMON}},
        },
        "/devices/{id}/delegations": {
            "parameters": [_DEVICE_ID],
            "post": {"operationId": "createDelegation",
                     "summary": "Grant a user, a service account, a group or the public access",
                     "requestBody": _body("#/components/schemas/NewDelegation"),
                     "responses": {"201": _json("#/components/schemas/Delegation", "granted",
                                                {"Location": {"schema": {"type": "string"}}}),
                                   "404": _error("no such device (or not yours), or no user seen under that name "
                                                 "(code unknown_user)"),
                                   "409": _error("more than one user has gone by that name (code ambiguous_user)"),
                                   **_WITH_BODY, **_COMMON}},
            "get": {"operationId": "listDelegations", "summary": "The device's delegations",
                    "responses": {"200": _json("#/components/schemas/DelegationList", "the delegations"),
                                  **_NOT_FOUND, **_COMMON}},
        },
        "/devices/{id}/delegations/{delegation}": {
            "parameters": [_DEVICE_ID, {"name": "delegation", "in": "path", "required": True,
                                        "schema": {"type": "string", "maxLength": 64}}],
            "delete": {"operationId": "revokeDelegation", "summary": "Revoke a delegation",
                       "responses": {"204": no_content, **_NOT_FOUND, **_COMMON}},
        },
        "/devices/{id}/certificate": {
            "parameters": [_DEVICE_ID],
            "post": {
                "operationId": "enrollCertificate",
                "summary": "Sign the device's CSR with the device CA and enroll the certificate",
                "description": "Only enrolled certificates authenticate their device. The latest two stay "
                               "enrolled, so a device can roll over; enrolling a third drops the oldest.",
                "requestBody": {"required": True, "content": {
                    "application/pkcs10": {"schema": {"type": "string", "maxLength": 16384},
                                           "example": "-----BEGIN CERTIFICATE REQUEST-----\n..."},
                    "application/json": {"schema": {"$ref": "#/components/schemas/CertificateRequest"}}}},
                "responses": {
                    "201": _json("#/components/schemas/IssuedCertificate", "signed and enrolled",
                                 {"Location": {"schema": {"type": "string"}}}),
                    "400": _error("not a CSR, a bad signature, a weak key, or a CN other than the device id "
                                  "(code invalid_csr)"),
                    "413": _error("body too large"),
                    "415": _error("the body must be application/pkcs10 or application/json"),
                    "501": _error("no device CA key is configured (code enrollment_unavailable)"),
                    **_NOT_FOUND, **_COMMON},
            },
            "get": {"operationId": "listCertificates", "summary": "The device's enrolled certificates, oldest first",
                    "responses": {"200": _json("#/components/schemas/CertificateList", "the certificates"),
                                  **_NOT_FOUND, **_COMMON}},
            "delete": {"operationId": "revokeCertificates", "summary": "Revoke every enrolled certificate",
                       "responses": {"204": no_content, **_NOT_FOUND, **_COMMON}},
        },
        "/devices/{id}/certificate/{serial}": {
            "parameters": [_DEVICE_ID, {"name": "serial", "in": "path", "required": True,
                                        "schema": {"type": "string", "maxLength": 64}}],
            "delete": {"operationId": "revokeCertificate", "summary": "Revoke one enrolled certificate",
                       "responses": {"204": no_content, **_NOT_FOUND, **_COMMON}},
        },
        "/me/data": {
            "get": {"operationId": "exportMyData", "summary": "Every record about the caller (GDPR access)",
                    "responses": {"200": {**_json("#/components/schemas/PersonalData", "a JSON download"),
                                          "headers": {"Content-Disposition": {"schema": {"type": "string"}}}},
                                  **_COMMON}},
            "delete": {"operationId": "eraseMyData", "summary": "Erase every record about the caller (GDPR)",
                       "responses": {"200": _json("#/components/schemas/Erased", "rows erased, by kind"),
                                     **_COMMON}},
        },
        "/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document", "security": [],
                    "responses": {"200": {"description": "the OpenAPI document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}}},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "keygate ownership API", "version": "1.0.0",
                 "description": "Devices, device keys and certificates, delegations and personal data (GDPR) "
                                "for keygate."},
        "servers": [{"url": prefix}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": schemas,
        },
    }
