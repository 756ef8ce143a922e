"""Loading and validating ``proxy.yaml``.

The schema is a tree of frozen dataclasses. Loading walks PyYAML's node tree
(not the constructed objects) so that every error can name the file, the line
and the key path: ``proxy.yaml:12: oidc.audience: expected a string``.

``${VAR}`` and ``${VAR:-default}`` are substituted inside scalar values only,
after parsing, so an environment variable can never inject YAML structure.
Unknown keys are errors: a typo must not silently switch a check off.
Secret fields (marked ``secret``) refuse literal values: they must come from
``${ENV}`` substitution or from the matching ``*_file`` key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Section = TypeVar("_Section", bound="DataclassInstance")  # a configuration section's dataclass

__all__ = [
    "ConfigError",
    "Config",
    "OidcConfig",
    "IntrospectionConfig",
    "ServiceAccountsConfig",
    "TlsConfig",
    "MqttConfig",
    "MqttLimitsConfig",
    "RateLimitConfig",
    "HttpConfig",
    "StoreConfig",
    "OwnershipConfig",
    "PoliciesConfig",
    "AuditConfig",
    "MetricsConfig",
    "PortalConfig",
    "load_config",
    "load_config_text",
    "parse_hostport",
]


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line to print."""


def secret(default: Any = "", **kw: Any) -> Any:
    return field(default=default, metadata={"secret": True, **kw})


def doc(default: Any = dataclasses.MISSING, text: str = "", **kw: Any) -> Any:
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"doc": text})
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class IntrospectionConfig:
    enabled: bool = False
    client_id: str = ""
    client_secret: str = secret()
    client_secret_file: str = ""
    endpoint: str = doc("", "override; default from discovery (introspection_endpoint)")
    cache_seconds: float = 10.0
    # Introspect every token, not only opaque / claim-less ones (revocation at once).
    always: bool = False


@dataclass(frozen=True)
class ServiceAccountsConfig:
    """What makes a token a service account's rather than a user's: any enabled rule that holds.
    A client_id claim alone never does (RFC 9068 puts it in every JWT access token)."""
    keycloak: bool = doc(True, 'preferred_username is "service-account-<C>" and the token\'s client_id is C')
    sub_equals_client_id: bool = doc(False, "sub is the client id (Okta and others, for client credentials)")
    gty: tuple[str, ...] = doc((), 'values of the "gty" claim meaning client credentials (Auth0: client-credentials)')


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    discovery_url: str = ""
    audience: str = ""
    algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256")
    leeway_seconds: float = 30.0
    roles: tuple[str, ...] = ("realm_access.roles",)
    username_claim: str = "preferred_username"
    jwks_refresh_seconds: float = 300.0
    unknown_kid_cooldown_seconds: float = 30.0
    http_timeout_seconds: float = 5.0
    token_cache_size: int = 10000
    introspection: IntrospectionConfig = field(default_factory=IntrospectionConfig)
    service_accounts: ServiceAccountsConfig = field(default_factory=ServiceAccountsConfig)


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    # "optional": a client certificate is verified when offered; "required": always.
    client_auth: Literal["optional", "required"] = "optional"
    min_version: Literal["1.2", "1.3"] = "1.2"
    # The private key of the client_ca certificate: with it the ownership API signs enrolled
    # device certificates (POST /devices/{id}/certificate).
    client_ca_key: str = ""
    client_ca_key_password: str = secret()
    client_ca_key_password_file: str = ""
    client_cert_days: int = 365


@dataclass(frozen=True)
class RateLimitConfig:
    messages_per_second: float = 200.0
    burst: int = 400
    action: Literal["disconnect", "drop"] = "disconnect"


@dataclass(frozen=True)
class MqttLimitsConfig:
    """What one connection (or one address, or one identity) can make the gateway hold or compute.
    Byte lengths are of the UTF-8 encoding. 0 turns a per-address limit off."""
    connect_max_bytes: int = 32768         # a CONNECT (the first packet), checked at its fixed header
    client_id_max_bytes: int = 256
    username_max_bytes: int = 1024
    topic_max_bytes: int = 1024            # PUBLISH and Will topics, SUBSCRIBE/UNSUBSCRIBE filters
    subscriptions_per_connection: int = 100
    subscriptions_per_identity: int = 1000  # across all of one identity's connections
    unauthenticated_per_address: int = 64  # connections not yet past CONNACK, per client IP
    unauthenticated_rate_per_address: float = 20.0  # new connections per second per IP (token bucket)
    unauthenticated_burst_per_address: int = 40
    # A client closed for flooding (rate limit, QoS 2 quota) gets a back-off before it may connect
    # again: its identity (after authentication) and, with per-address limits on, its address
    # (at accept, before TLS). Doubles from the initial value to the maximum; 0 turns it off.
    reconnect_penalty_initial_seconds: float = 1.0
    reconnect_penalty_max_seconds: float = 60.0
    # Persistent broker sessions (3.1.1 clean_session=0, v5 Session Expiry > 0) per identity, and
    # how long one is taken to outlive its connection (v5: the client's value capped to this).
    persistent_sessions_per_identity: int = 10
    persistent_session_expiry_seconds: int = 604800
    # Connections of one identity at once (after authentication; more: v5 CONNACK 0x97 / 3.1.1 3).
    connections_per_identity: int = 100
    # Bytes of QoS 2 publishes held awaiting PUBREL, across all of one identity's connections.
    qos2_hold_bytes_per_identity: int = 4194304
    # Sockets closed with a lingering close (FIN, input drained for up to 2 s) at once; beyond it a
    # closed socket is aborted (a reset) instead. They hold a file descriptor each.
    lingering_sockets_max: int = 1024


@dataclass(frozen=True)
class MqttConfig:
    listen: str = "0.0.0.0:8883"
    websocket_listen: str = ""
    upstream: str = "127.0.0.1:1883"  # host:port or unix:/path/to/socket
    upstream_username: str = ""
    upstream_password: str = secret()
    upstream_password_file: str = ""
    tls: bool = True  # false only for tests and benchmarks behind another TLS terminator
    connect_timeout_seconds: float = 10.0
    max_packet_size: int = 1048576
    max_keepalive_seconds: int = 3600  # also the cap applied to keepalive 0
    user_client_id_prefix: str = "u/"
    denied_publish_v3: Literal["drop", "disconnect"] = "drop"
    topic_alias_maximum: int = 10
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    max_connections: int = 10000
    limits: MqttLimitsConfig = field(default_factory=MqttLimitsConfig)

    @property
    def preauth_max_bytes(self) -> int:
        """What a connection may make the gateway hold before its CONNACK (session and WebSocket alike)."""
        return min(self.limits.connect_max_bytes, self.max_packet_size)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "0.0.0.0:8443"
    upstream: str = "http://127.0.0.1:1026"
    # A PEM bundle of the CA(s) that sign an https:// upstream's certificate; empty: the system's store.
    upstream_ca: str = ""
    fiware_service: str = ""
    tls: bool = True
    max_body_bytes: int = 1048576
    upstream_timeout_seconds: float = 30.0
    # Hosts / CIDRs that NGSI subscription notifications may target. Loopback,
    # link-local and private addresses are refused unless listed here.
    notification_allowlist: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    api_prefix: str = "/api/v1"
    header_timeout_seconds: float = 10.0   # a request's head must arrive within this
    body_timeout_seconds: float = 30.0     # and its body within this
    write_timeout_seconds: float = 30.0    # a client that reads none of its answer for this long is closed
    max_pipelined_requests: int = 16       # requests read ahead of their answers on one connection
    max_connections: int = 1000            # open HTTP connections, counted from accept
    max_json_depth: int = 32               # nesting of arrays and objects in a JSON body
    strip_request_headers: tuple[str, ...] = ()   # added to the identity headers never forwarded


@dataclass(frozen=True)
class StoreConfig:
    # sqlcipher: the embedded encrypted file at ``path`` (the default, and keygate dev's);
    # postgres: a PostgreSQL database at ``dsn`` shared by many gateway processes (docs/scale-out.md).
    backend: str = "sqlcipher"
    path: str = "data/ownership.db"
    key: str = secret()
    key_file: str = ""
    dsn: str = secret()
    # Connections the postgres backend keeps open (one more listens for the change feed).
    pool_size: int = 4
    # The postgres change feed unreachable for longer than this: grants that rest on the store fail closed.
    feed_max_silence_seconds: float = 3.0


@dataclass(frozen=True)
class OwnershipConfig:
    admin_role: str = "iot-admin"
    max_devices_per_user: int = 100
    role_quotas: dict[str, int] = field(default_factory=dict)
    # Addresses handed to a newly registered device.
    advertise_mqtt: str = "mqtts://localhost:8883"
    advertise_http: str = "https://localhost:8443"
    # Orion runs behind http.upstream: registration asks it whether the id is taken there, deleting a
    # device removes its entity and subscriptions. false only for a gateway with no Orion behind it.
    orion_lifecycle: bool = True
    # Tenants (Fiware-Service) a role may register devices in, besides http.fiware_service.
    tenants_by_role: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Clean-up Orion did not take is retried: first after this, doubling up to the maximum.
    removal_retry_seconds: float = 1.0
    removal_retry_max_seconds: float = 60.0
    # A write whose outcome at Orion is unknown (the gateway stopped waiting for it) may still land for
    # this long: the clean-up of its id is re-checked until then. Above anything Orion takes to finish.
    unsettled_write_grace_seconds: float = 120.0
    # Writes (POST, PUT, PATCH, DELETE) of the ownership API per user, a token bucket: every write is
    # a change every gateway process applies, so one user writing in a loop must not keep them busy.
    write_rate_per_user: float = 5.0
    write_burst_per_user: int = 30


@dataclass(frozen=True)
class PoliciesConfig:
    # dir: the files under policies.dir (watched when policies.watch); store: the set pushed to the
    # store with keygate policy push, followed through the store (docs/policies.md).
    source: str = "dir"
    dir: str = "policies/"
    watch: bool = True
    cache_max_bytes: int = 32 * 1024 * 1024  # the shared decision cache is dropped when it holds more


@dataclass(frozen=True)
class AuditConfig:
    path: str = "-"
    max_field_bytes: int = 1024   # longer strings are cut (with their length recorded)
    fold_seconds: float = 1.0     # identical denials from one connection within this: one line with a count


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9100"


@dataclass(frozen=True)
class PortalConfig:
    """The "My devices" web portal on the HTTP listener (proxy/portal)."""
    enabled: bool = True
    path: str = "/portal/"
    # The OpenID Connect client the portal logs people in with (authorization code + PKCE).
    client_id: str = "iot-portal"
    client_secret: str = secret()   # empty for a public client
    client_secret_file: str = ""
    scope: str = "openid profile email"
    # The address people reach the portal at, for the redirect URI (default: ownership.advertise_http).
    public_url: str = ""
    # Sessions held at once (each the tokens of one signed-in browser); the oldest go first past it.
    max_sessions: int = 10000


@dataclass(frozen=True)
class Config:
    oidc: OidcConfig
    tls: TlsConfig = field(default_factory=TlsConfig)
    mqtt: MqttConfig | None = None
    http: HttpConfig | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    ownership: OwnershipConfig = field(default_factory=OwnershipConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig | None = None
    portal: PortalConfig = field(default_factory=PortalConfig)
    # Where the file was loaded from; relative paths in it resolve against its folder.
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the file, relative to the file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p


# --------------------------------------------------------------------------- loading

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader:
    def __init__(self, filename: str, env: typing.Mapping[str, str]):
        self.filename = filename
        self.env = env

    def fail(self, node: yaml.Node | None, path: str, message: str) -> typing.NoReturn:
        where = self.filename
        if node is not None:
            where += f":{node.start_mark.line + 1}"
        raise ConfigError(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def substitute(self, node: yaml.ScalarNode, path: str) -> tuple[str, bool]:
        """The scalar's text with ${VAR} replaced, and whether anything was replaced."""
        text = node.value
        used = False

        def repl(m: re.Match[str]) -> str:
            nonlocal used
            used = True
            name, default = m.group(1), m.group(2)
            value = self.env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.fail(node, path, f"environment variable {name} is not set")
                return default
            return value

        if "${" in text:
            text = _ENV.sub(repl, text)
            if "${" in text:
                self.fail(node, path, "malformed ${...} substitution")
        return text, used

    def scalar(self, node: yaml.Node, path: str, tp: Any, is_secret: bool = False) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected {_describe(tp)}, got a {_kind(node)}")
        text, substituted = self.substitute(node, path)
        if is_secret and text and not substituted:
            self.fail(node, path, "secrets may not be written in the file; use ${ENV_VAR} or the *_file key")
        plain = node.style is None  # unquoted scalars carry YAML types
        if tp is str:
            if plain and node.tag == "tag:yaml.org,2002:null" and not substituted:
                self.fail(node, path, "expected a string, got null")
            return text
        if tp is bool:
            low = text.lower()
            if low in ("true", "yes", "on") and (plain or substituted):
                return True
            if low in ("false", "no", "off") and (plain or substituted):
                return False
            self.fail(node, path, f"expected true or false, got {text!r}")
        if tp is int:
            try:
                if not (plain or substituted):
                    raise ValueError
                return int(text, 0)
            except ValueError:
                self.fail(node, path, f"expected an integer, got {text!r}")
        if tp is float:
            try:
                if not (plain or substituted):
                    raise ValueError
                number = float(text)
                if not math.isfinite(number):  # nan would make every time comparison false
                    raise ValueError
                return number
            except ValueError:
                self.fail(node, path, f"expected a number, got {text!r}")
        if get_origin(tp) is Literal:
            allowed = get_args(tp)
            if text not in allowed:
                self.fail(node, path, f"expected one of {', '.join(map(str, allowed))}, got {text!r}")
            return text
        raise AssertionError(f"unsupported scalar type {tp!r}")

    def value(self, node: yaml.Node, path: str, tp: Any, is_secret: bool = False) -> Any:
        origin = get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return None
            return self.value(node, path, args[0], is_secret)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.section(node, path, tp)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                self.fail(node, path, f"expected a list, got a {_kind(node)}")
            (item_tp, _) = get_args(tp)
            return tuple(self.value(item, f"{path}[{i}]", item_tp) for i, item in enumerate(node.value))
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                self.fail(node, path, f"expected a mapping, got a {_kind(node)}")
            _, val_tp = get_args(tp)
            out = {}
            for k, v in node.value:
                key = self.scalar(k, path, str)
                out[key] = self.value(v, f"{path}.{key}", val_tp)
            return out
        return self.scalar(node, path, tp, is_secret)

    def section(self, node: yaml.Node, path: str, cls: type[_Section]) -> _Section:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping, got a {_kind(node)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        values: dict[str, Any] = {}
        for key_node, val_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, path, "keys must be plain strings")
            key = key_node.value
            sub = f"{path}.{key}" if path else key
            if key not in fields:
                near = _closest(key, fields)
                hint = f" (did you mean {near}?)" if near else ""
                self.fail(key_node, sub, f"unknown key{hint}")
            if key in values:
                self.fail(key_node, sub, "given twice")
            values[key] = self.value(val_node, sub, hints[key], bool(fields[key].metadata.get("secret")))
        for name, f in fields.items():
            if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(node if path else None, f"{path}.{name}" if path else name, "required")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # pragma: no cover - schema bug
            self.fail(node, path, str(exc))


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return f"scalar {node.value!r}"


def _describe(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, "a scalar")


def _closest(key: str, options: typing.Iterable[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, list(options), n=1, cutoff=0.75)
    return found[0] if found else None


def load_config_text(text: str, filename: str = "proxy.yaml", env: typing.Mapping[str, str] | None = None,
                     base_dir: str = ".") -> Config:
    loader = _Loader(filename, os.environ if env is None else env)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{filename}{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: invalid YAML: {exc}") from None
    if root is None:
        raise ConfigError(f"{filename}: the file is empty")
    cfg = loader.section(root, "", Config)
    cfg = dataclasses.replace(cfg, base_dir=base_dir)
    _check(cfg, filename)
    return cfg


def load_config(path: str | os.PathLike[str], env: typing.Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    return load_config_text(text, str(p), env, base_dir=str(p.parent))


def _check(cfg: Config, filename: str) -> None:
    """Cross-field rules that a type check cannot express."""

    def bad(path: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{filename}: {path}: {message}")

    if not re.match(r"^https?://", cfg.oidc.issuer):
        bad("oidc.issuer", "must be an http(s) URL")
    for alg in cfg.oidc.algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            bad("oidc.algorithms", f"{alg} is not allowed (asymmetric algorithms only)")
    if not cfg.oidc.algorithms:
        bad("oidc.algorithms", "must not be empty")
    for name in ("leeway_seconds", "jwks_refresh_seconds", "unknown_kid_cooldown_seconds",
                 "http_timeout_seconds", "token_cache_size"):
        if getattr(cfg.oidc, name) < 0:
            bad(f"oidc.{name}", "must not be negative")
    if cfg.oidc.jwks_refresh_seconds < 1:
        bad("oidc.jwks_refresh_seconds", "must be at least 1")
    if cfg.oidc.introspection.enabled and not cfg.oidc.introspection.client_id:
        bad("oidc.introspection.client_id", "required when introspection is enabled")
    if cfg.tls.client_ca_key and not cfg.tls.client_ca:
        bad("tls.client_ca_key", "needs tls.client_ca (the certificate of the same CA)")
    if not 1 <= cfg.tls.client_cert_days <= 3650:
        bad("tls.client_cert_days", "must be between 1 and 3650")
    if cfg.policies.source not in ("dir", "store"):
        bad("policies.source", "must be dir or store")
    if cfg.policies.cache_max_bytes < 0:
        bad("policies.cache_max_bytes", "must not be negative")
    if cfg.audit.max_field_bytes < 64:
        bad("audit.max_field_bytes", "must be at least 64")
    if cfg.audit.fold_seconds < 0:
        bad("audit.fold_seconds", "must not be negative")
    needs_tls = (cfg.mqtt is not None and cfg.mqtt.tls) or (cfg.http is not None and cfg.http.tls)
    if needs_tls and not (cfg.tls.cert and cfg.tls.key):
        bad("tls.cert", "required when a listener uses TLS")
    for section, listen in (("mqtt.listen", cfg.mqtt and cfg.mqtt.listen),
                            ("mqtt.websocket_listen", cfg.mqtt and cfg.mqtt.websocket_listen),
                            ("http.listen", cfg.http and cfg.http.listen),
                            ("metrics.listen", cfg.metrics and cfg.metrics.listen)):
        if listen:
            try:
                parse_hostport(listen)
            except ValueError as exc:
                bad(section, str(exc))
    if cfg.mqtt is not None:
        if not cfg.mqtt.upstream.startswith("unix:"):
            try:
                parse_hostport(cfg.mqtt.upstream)
            except ValueError as exc:
                bad("mqtt.upstream", str(exc))
        if not 2 <= cfg.mqtt.max_packet_size <= 268435455:
            bad("mqtt.max_packet_size", "must be between 2 and 268435455")
        for name in ("connect_max_bytes", "username_max_bytes", "topic_max_bytes", "subscriptions_per_connection",
                     "subscriptions_per_identity"):
            if getattr(cfg.mqtt.limits, name) < 1:
                bad(f"mqtt.limits.{name}", "must be at least 1")
        for name in ("reconnect_penalty_initial_seconds", "reconnect_penalty_max_seconds",
                     "persistent_sessions_per_identity", "persistent_session_expiry_seconds",
                     "connections_per_identity", "lingering_sockets_max"):
            if getattr(cfg.mqtt.limits, name) < 0:
                bad(f"mqtt.limits.{name}", "must be 0 or more")
        if cfg.mqtt.limits.qos2_hold_bytes_per_identity < cfg.mqtt.max_packet_size:
            bad("mqtt.limits.qos2_hold_bytes_per_identity", "must be at least mqtt.max_packet_size")
        if cfg.mqtt.limits.client_id_max_bytes < 23:  # [MQTT-3.1.3-5]: ids of 1 to 23 bytes must be accepted
            bad("mqtt.limits.client_id_max_bytes", "must be at least 23")
    if cfg.http is not None and not re.match(r"^https?://", cfg.http.upstream):
        bad("http.upstream", "must be an http(s) URL")
    if cfg.http is not None and cfg.http.upstream_ca and not cfg.http.upstream.lower().startswith("https://"):
        bad("http.upstream_ca", f"needs an https:// http.upstream (it is {cfg.http.upstream}): "
                                "nothing would be verified with it")
    if cfg.http is not None:
        from proxy.ssrf import parse_entry

        for i, entry in enumerate(cfg.http.notification_allowlist):
            try:
                parse_entry(entry)
            except ValueError as exc:
                bad(f"http.notification_allowlist[{i}]", str(exc))
        for name in ("header_timeout_seconds", "body_timeout_seconds", "write_timeout_seconds"):
            if getattr(cfg.http, name) <= 0:
                bad(f"http.{name}", "must be positive")
        for name in ("max_pipelined_requests", "max_connections"):
            if getattr(cfg.http, name) < 1:
                bad(f"http.{name}", "must be at least 1")
        if cfg.http.max_json_depth < 1:
            bad("http.max_json_depth", "must be at least 1")
        for i, name in enumerate(cfg.http.strip_request_headers):
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                bad(f"http.strip_request_headers[{i}]", f"{name!r} is not a header name")
    if not re.fullmatch(r"/(?:[A-Za-z0-9_.~-]+/)+", cfg.portal.path):
        bad("portal.path", "must be a path of letters, digits and -._~ that starts and ends with / (e.g. /portal/)")
    if cfg.http is not None and cfg.portal.path.startswith(cfg.http.api_prefix.rstrip("/") + "/"):
        bad("portal.path", f"must not lie under http.api_prefix {cfg.http.api_prefix}")
    if cfg.portal.public_url and not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", cfg.portal.public_url):
        bad("portal.public_url", "must be an http(s) URL")
    if cfg.portal.max_sessions < 1:
        bad("portal.max_sessions", "must be at least 1")
    for role, tenants in cfg.ownership.tenants_by_role.items():
        for i, tenant in enumerate(tenants):
            if not re.fullmatch(r"[A-Za-z0-9_]{1,50}", tenant):
                bad(f"ownership.tenants_by_role.{role}[{i}]", "a tenant is 1 to 50 letters, digits or underscores")
    if cfg.store.backend not in ("sqlcipher", "postgres"):
        bad("store.backend", "must be sqlcipher or postgres")
    if cfg.store.backend == "postgres" and not cfg.store.dsn:
        bad("store.dsn", "is required for the postgres backend")
    if cfg.store.pool_size < 1:
        bad("store.pool_size", "must be at least 1")
    if not cfg.store.feed_max_silence_seconds > 0:
        bad("store.feed_max_silence_seconds", "must be above 0")
    if not 0 < cfg.ownership.removal_retry_seconds <= cfg.ownership.removal_retry_max_seconds:
        bad("ownership.removal_retry_seconds", "must be above 0 and at most ownership.removal_retry_max_seconds")
    if not cfg.ownership.unsettled_write_grace_seconds > 0:
        bad("ownership.unsettled_write_grace_seconds", "must be above 0")
    if not cfg.ownership.write_rate_per_user > 0:
        bad("ownership.write_rate_per_user", "must be above 0")
    if cfg.ownership.write_burst_per_user < 1:
        bad("ownership.write_burst_per_user", "must be at least 1")


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (":PORT" is every interface, as documented)
    return host, int(port)


def read_secret(value: str, file: str, cfg: Config | None = None) -> str:
    """A secret from its value or, failing that, from its file (trailing newline dropped)."""
    if value:
        return value
    if file:
        path = cfg.resolve(file) if cfg else Path(file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read secret: {exc.strerror}") from None
    return ""


def store_key(cfg: Config) -> str:
    """The store's key, from ``store.key`` or ``store.key_file``; ConfigError when neither gives one."""
    key = read_secret(cfg.store.key, cfg.store.key_file, cfg)
    if not key:
        raise ConfigError(f"store {cfg.store.path}: no key configured (store.key or store.key_file)")
    return key
