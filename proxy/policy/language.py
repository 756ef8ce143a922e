"""The policy language, schema version 1: YAML files in, checked rules and tests out.

A policy directory holds ``*.yaml`` / ``*.yml`` files (searched recursively,
loaded in sorted path order; rule order is that order, then position, and
decides only which allow rule is *reported* when several match). Each file::

    version: 1
    rules:
      - id: owners-use-their-devices        # unique across all files
        description: ...                    # optional
        effect: allow                       # allow (default) | deny
        subjects: [owner, delegate]         # see .subjects; any one holding is enough
        mqtt: {topics: ["devices/{device}/#"], actions: [publish, subscribe],
               retain: false, qos: [0, 1]}  # retain / qos: optional, publish only
        http: {paths: ["/v2/entities/{device}"], methods: [GET, PATCH]}   # "*" = any method
    tests:                                  # here or in *.test.yaml files
      - name: alice reads her thermostat    # optional
        as: {user: alice, roles: [r], groups: [g], scopes: [s], client_roles: ["c:r"], client_id: c1}
        owns: [thermo-1]
        delegated: [{device: d2, permission: read, to: bob}]   # to: bob, service:C, group:G, anonymous;
                                                                # defaults to the caller
        public: [d3]
        mqtt: {action: subscribe, topic: devices/thermo-1/#}   # publish|subscribe|receive
        http: {method: GET, path: /v2/entities/thermo-1}
        expect: allow                       # allow | deny | check-each (subscribe only)
        rule: owners-use-their-devices      # optional: the rule that must decide

The document is *composed* (PyYAML node tree, not constructed objects) so
every error names ``file:line:column`` and the key path. Unknown keys are
errors (a typo must not silently drop a condition). A relation subject on a
rule with a pattern that has no ``{device}`` is an error: it could never hold,
and the operator meant something else.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from proxy.policy.decision import PolicyError
from proxy.policy.patterns import DEVICE, PLACEHOLDERS, Pattern, parse_path_pattern, parse_topic_pattern
from proxy.policy.subjects import IDENTITY_WORDS, PREFIXES, RELATIONS, subject_problem

__all__ = ["Rule", "MqttSpec", "HttpSpec", "TestCase", "PolicySource", "load_dir", "load_files", "load_text",
           "parse_file"]

# libyaml's composer keeps the same marks and is ~10x faster on big rule sets.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_METHOD = re.compile(r"^[A-Za-z]+$")
MQTT_ACTIONS = ("publish", "subscribe")


@dataclass(frozen=True)
class MqttSpec:
    topics: tuple[Pattern, ...]
    topic_texts: tuple[str, ...]
    actions: frozenset[str]
    retain: bool | None = None
    qos: frozenset[int] | None = None


@dataclass(frozen=True)
class HttpSpec:
    paths: tuple[Pattern, ...]
    path_texts: tuple[str, ...]
    methods: frozenset[str] | None  # None = any method


@dataclass(frozen=True, eq=False)
class Rule:
    id: str
    effect: str
    subjects: tuple[str, ...]
    mqtt: MqttSpec | None
    http: HttpSpec | None
    file: str
    line: int
    column: int
    order: int = 0
    description: str = ""

    @property
    def allow(self) -> bool:
        return self.effect == "allow"

    @property
    def relations(self) -> tuple[str, ...]:
        return tuple(s for s in self.subjects if s in RELATIONS)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class TestCase:
    name: str
    as_: dict[str, Any]
    owns: tuple[str, ...]
    delegated: tuple[tuple[str, str, str | None], ...]  # (device, permission, to)
    public: tuple[str, ...]
    mqtt: dict[str, Any] | None
    http: dict[str, Any] | None
    expect: str
    rule: str | None
    file: str
    line: int
    column: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class PolicySource:
    rules: list[Rule] = field(default_factory=list)
    tests: list[TestCase] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    digest: str = ""
    # (name relative to the set's root, text) per file, in load order: what ``keygate policy push``
    # stores, and what the digest covers (so the same files hash the same wherever they live).
    texts: list[tuple[str, str]] = field(default_factory=list)


class _Doc:
    """Walks one composed document, failing with file:line:column."""

    def __init__(self, filename: str):
        self.filename = filename

    def fail(self, node: yaml.Node | None, path: str, message: str) -> NoReturn:
        where = self.filename
        if node is not None:
            where += f":{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        raise PolicyError(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def mapping(self, node: yaml.Node, path: str, keys: tuple[str, ...], required: tuple[str, ...] = ()
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping, got {_kind(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.fail(k, path, "keys must be plain strings")
            sub = f"{path}.{k.value}" if path else k.value
            if k.value not in keys:
                near = difflib.get_close_matches(k.value, keys, n=1, cutoff=0.7)
                self.fail(k, sub, "unknown key" + (f" (did you mean {near[0]}?)" if near else ""))
            if k.value in out:
                self.fail(k, sub, "given twice")
            out[k.value] = (k, v)
        for r in required:
            if r not in out:
                self.fail(node, f"{path}.{r}" if path else r, "required")
        return out

    def string(self, node: yaml.Node, path: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or (not node.style and node.tag == "tag:yaml.org,2002:null"):
            self.fail(node, path, f"expected a string, got {_kind(node)}")
        text: str = node.value  # a scalar's value is its text
        return text

    def seq(self, node: yaml.Node, path: str, *, allow_scalar: bool = False, nonempty: bool = True
            ) -> list[yaml.Node]:
        if allow_scalar and isinstance(node, yaml.ScalarNode):
            return [node]
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list, got {_kind(node)}")
        if nonempty and not node.value:
            self.fail(node, path, "must not be empty")
        return list(node.value)

    def strings(self, node: yaml.Node, path: str, **kw: bool) -> list[tuple[yaml.Node, str]]:
        return [(n, self.string(n, f"{path}[{i}]")) for i, n in enumerate(self.seq(node, path, **kw))]

    def boolean(self, node: yaml.Node, path: str) -> bool:
        if isinstance(node, yaml.ScalarNode) and not node.style:
            if node.value.lower() in ("true", "yes", "on"):
                return True
            if node.value.lower() in ("false", "no", "off"):
                return False
        self.fail(node, path, "expected true or false")

    def integer(self, node: yaml.Node, path: str) -> int:
        if isinstance(node, yaml.ScalarNode) and not node.style and re.fullmatch(r"-?\d+", node.value):
            return int(node.value)
        self.fail(node, path, "expected an integer")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and not node.style:
        return "nothing (null)"
    return f"{node.value!r}"


# --------------------------------------------------------------------------- rules


def _parse_rule(doc: _Doc, node: yaml.Node, path: str) -> Rule:
    m = doc.mapping(node, path, ("id", "description", "effect", "subjects", "mqtt", "http"), ("id", "subjects"))
    id_node = m["id"][1]
    rule_id = doc.string(id_node, f"{path}.id")
    if not _ID.match(rule_id):
        doc.fail(id_node, f"{path}.id", "ids use letters, digits and _ . : - (starting with a letter or digit)")
    description = doc.string(m["description"][1], f"{path}.description") if "description" in m else ""
    effect = "allow"
    if "effect" in m:
        effect = doc.string(m["effect"][1], f"{path}.effect")
        if effect not in ("allow", "deny"):
            doc.fail(m["effect"][1], f"{path}.effect", f"expected allow or deny, got {effect!r}")
    subjects = []
    for n, s in doc.strings(m["subjects"][1], f"{path}.subjects", allow_scalar=True):
        problem = subject_problem(s)
        if problem:
            near = difflib.get_close_matches(s, sorted(RELATIONS | IDENTITY_WORDS) + [p.rstrip(":") for p in PREFIXES],
                                             n=1, cutoff=0.7)
            doc.fail(n, f"{path}.subjects", problem + (f" (did you mean {near[0]}?)" if near else ""))
        if s in subjects:
            doc.fail(n, f"{path}.subjects", f"{s} listed twice")
        subjects.append(s)
    if "mqtt" not in m and "http" not in m:
        doc.fail(node, path, "a rule needs mqtt:, http: or both")
    mqtt = _parse_mqtt(doc, m["mqtt"][1], f"{path}.mqtt") if "mqtt" in m else None
    http = _parse_http(doc, m["http"][1], f"{path}.http") if "http" in m else None
    relations = [s for s in subjects if s in RELATIONS]
    if relations:
        patterns = [(p, t) for p, t in zip(mqtt.topics, mqtt.topic_texts, strict=True)] if mqtt else []
        patterns += [(p, t) for p, t in zip(http.paths, http.path_texts, strict=True)] if http else []
        for p, text in patterns:
            if DEVICE not in p:
                doc.fail(m["subjects"][1], f"{path}.subjects",
                         f"{relations[0]} is a relation to the device bound by {{device}}, but pattern {text!r} "
                         "has no {device}: it could never hold (split the rule)")
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    return Rule(rule_id, effect, tuple(subjects), mqtt, http, doc.filename, line, col, description=description)


def _parse_mqtt(doc: _Doc, node: yaml.Node, path: str) -> MqttSpec:
    m = doc.mapping(node, path, ("topics", "actions", "retain", "qos"), ("topics", "actions"))
    topics, texts = [], []
    for n, t in doc.strings(m["topics"][1], f"{path}.topics", allow_scalar=True):
        try:
            topics.append(parse_topic_pattern(t))
        except ValueError as exc:
            doc.fail(n, f"{path}.topics", str(exc))
        texts.append(t)
    actions = set()
    for n, a in doc.strings(m["actions"][1], f"{path}.actions", allow_scalar=True):
        if a not in MQTT_ACTIONS:
            doc.fail(n, f"{path}.actions", f"expected publish or subscribe, got {a!r} "
                     "(deliveries are checked against subscribe rules)")
        actions.add(a)
    retain = qos = None
    for key in ("retain", "qos"):
        if key in m and "publish" not in actions:
            doc.fail(m[key][0], f"{path}.{key}", "conditions apply to publishes only; this rule has no publish")
    if "retain" in m:
        retain = doc.boolean(m["retain"][1], f"{path}.retain")
    if "qos" in m:
        levels = set()
        for i, n in enumerate(doc.seq(m["qos"][1], f"{path}.qos", allow_scalar=True)):
            q = doc.integer(n, f"{path}.qos[{i}]")
            if q not in (0, 1, 2):
                doc.fail(n, f"{path}.qos", f"QoS is 0, 1 or 2, not {q}")
            levels.add(q)
        qos = frozenset(levels)
    return MqttSpec(tuple(topics), tuple(texts), frozenset(actions), retain, qos)


def _parse_http(doc: _Doc, node: yaml.Node, path: str) -> HttpSpec:
    m = doc.mapping(node, path, ("paths", "methods"), ("paths", "methods"))
    paths, texts = [], []
    for n, t in doc.strings(m["paths"][1], f"{path}.paths", allow_scalar=True):
        try:
            paths.append(parse_path_pattern(t))
        except ValueError as exc:
            doc.fail(n, f"{path}.paths", str(exc))
        if PLACEHOLDERS["client_id"] in paths[-1]:
            doc.fail(n, f"{path}.paths", "{client_id} is an MQTT client id; an HTTP path can never match it")
        texts.append(t)
    methods: set[str] = set()
    any_method = False
    for n, meth in doc.strings(m["methods"][1], f"{path}.methods", allow_scalar=True):
        if meth == "*":
            any_method = True
        elif _METHOD.match(meth):
            methods.add(meth.upper())
        else:
            doc.fail(n, f"{path}.methods", f"not an HTTP method: {meth!r}")
    return HttpSpec(tuple(paths), tuple(texts), None if any_method else frozenset(methods))


# --------------------------------------------------------------------------- tests


def _parse_test(doc: _Doc, node: yaml.Node, path: str) -> TestCase:
    m = doc.mapping(node, path, ("name", "as", "owns", "delegated", "public", "mqtt", "http", "expect", "rule"),
                    ("as", "expect"))
    name = doc.string(m["name"][1], f"{path}.name") if "name" in m else ""
    a = doc.mapping(m["as"][1], f"{path}.as", ("user", "service", "device", "anonymous", "roles", "groups",
                                                "scopes", "client_roles", "client_id"))
    kinds = [k for k in ("user", "service", "device", "anonymous") if k in a]
    if len(kinds) != 1:
        doc.fail(m["as"][1], f"{path}.as", "give exactly one of user:, service:, device:, anonymous: true")
    as_: dict[str, Any] = {"kind": kinds[0]}
    if kinds[0] == "anonymous":
        if not doc.boolean(a["anonymous"][1], f"{path}.as.anonymous"):
            doc.fail(a["anonymous"][1], f"{path}.as.anonymous", "write anonymous: true")
        as_["name"] = ""
    else:
        as_["name"] = doc.string(a[kinds[0]][1], f"{path}.as.{kinds[0]}")
    for key in ("roles", "groups", "scopes", "client_roles"):
        as_[key] = tuple(s for _, s in doc.strings(a[key][1], f"{path}.as.{key}", nonempty=False)) if key in a else ()
    as_["client_id"] = doc.string(a["client_id"][1], f"{path}.as.client_id") if "client_id" in a else ""
    owns = tuple(s for _, s in doc.strings(m["owns"][1], f"{path}.owns", nonempty=False)) if "owns" in m else ()
    public = tuple(s for _, s in doc.strings(m["public"][1], f"{path}.public", nonempty=False)) if "public" in m else ()
    delegated = []
    if "delegated" in m:
        for i, n in enumerate(doc.seq(m["delegated"][1], f"{path}.delegated", nonempty=False)):
            p = f"{path}.delegated[{i}]"
            d = doc.mapping(n, p, ("device", "permission", "to"), ("device", "permission"))
            perm = doc.string(d["permission"][1], f"{p}.permission")
            if perm not in ("read", "write", "readwrite"):
                doc.fail(d["permission"][1], f"{p}.permission", "expected read, write or readwrite")
            to = doc.string(d["to"][1], f"{p}.to") if "to" in d else None
            delegated.append((doc.string(d["device"][1], f"{p}.device"), perm, to))
    if ("mqtt" in m) == ("http" in m):
        doc.fail(node, path, "a test asks exactly one question: mqtt: or http:")
    mqtt = http = None
    expect_node = m["expect"][1]
    expect = doc.string(expect_node, f"{path}.expect")
    if "mqtt" in m:
        q = doc.mapping(m["mqtt"][1], f"{path}.mqtt", ("action", "topic", "qos", "retain"), ("action", "topic"))
        action = doc.string(q["action"][1], f"{path}.mqtt.action")
        if action not in ("publish", "subscribe", "receive"):
            doc.fail(q["action"][1], f"{path}.mqtt.action", "expected publish, subscribe or receive")
        mqtt = {"action": action, "topic": doc.string(q["topic"][1], f"{path}.mqtt.topic"),
                "qos": doc.integer(q["qos"][1], f"{path}.mqtt.qos") if "qos" in q else 0,
                "retain": doc.boolean(q["retain"][1], f"{path}.mqtt.retain") if "retain" in q else False}
        allowed = ("allow", "deny", "check-each") if action == "subscribe" else ("allow", "deny")
    else:
        q = doc.mapping(m["http"][1], f"{path}.http", ("method", "path"), ("method", "path"))
        http = {"method": doc.string(q["method"][1], f"{path}.http.method"),
                "path": doc.string(q["path"][1], f"{path}.http.path")}
        allowed = ("allow", "deny")
    if expect not in allowed:
        doc.fail(expect_node, f"{path}.expect", f"expected {' or '.join(allowed)}, got {expect!r}")
    rule = doc.string(m["rule"][1], f"{path}.rule") if "rule" in m else None
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    return TestCase(name, as_, owns, tuple(delegated), public, mqtt, http, expect, rule, doc.filename, line, col)


# --------------------------------------------------------------------------- files


_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _refuse_tags(doc: _Doc, node: yaml.Node) -> None:
    """Explicit tags (``!!python/...``, ``!custom``) mean nothing here; refuse rather than ignore them."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.tag not in _PLAIN_TAGS:
            doc.fail(n, "", f"YAML tag {n.tag} is not allowed in policy files")
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack += (k, v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def parse_file(text: str, filename: str, *, tests_only: bool = False) -> tuple[list[Rule], list[TestCase]]:
    doc = _Doc(filename)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise PolicyError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{filename}: invalid YAML: {exc}") from None
    if root is None:
        raise PolicyError(f"{filename}: the file is empty (write at least version: 1)")
    _refuse_tags(doc, root)
    keys = ("version", "tests") if tests_only else ("version", "rules", "tests")
    m = doc.mapping(root, "", keys, ("version",))
    version_node = m["version"][1]
    if not (isinstance(version_node, yaml.ScalarNode) and version_node.value == "1"):
        doc.fail(version_node, "version", "only schema version 1 is understood")
    rules = [_parse_rule(doc, n, f"rules[{i}]")
             for i, n in enumerate(doc.seq(m["rules"][1], "rules", nonempty=False))] if "rules" in m else []
    tests = [_parse_test(doc, n, f"tests[{i}]")
             for i, n in enumerate(doc.seq(m["tests"][1], "tests", nonempty=False))] if "tests" in m else []
    return rules, tests


def _finish(files: list[tuple[str, str, bool]], relative: list[str] | None = None) -> PolicySource:
    """Parse (name, text, tests_only) in order; check ids across files; number the rules.

    ``relative`` names the files for the digest (default: their names as given)."""
    src = PolicySource()
    digest = hashlib.sha256()
    seen: dict[str, Rule] = {}
    for i, (name, text, tests_only) in enumerate(files):
        rel = relative[i] if relative is not None else name
        src.texts.append((rel, text))
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        rules, tests = parse_file(text, name, tests_only=tests_only)
        for r in rules:
            if r.id in seen:
                raise PolicyError(f"{r.where}: rule id {r.id!r} is already used at {seen[r.id].where}")
            seen[r.id] = r
            object.__setattr__(r, "order", len(src.rules))
            src.rules.append(r)
        src.tests.extend(tests)
        src.files.append(name)
    for t in src.tests:
        if t.rule is not None and t.rule not in seen:
            raise PolicyError(f"{t.where}: rule: no rule has id {t.rule!r}")
    src.digest = digest.hexdigest()[:16]
    return src


def load_text(text: str, filename: str = "test.yaml") -> PolicySource:
    return _finish([(filename, text, filename.endswith((".test.yaml", ".test.yml")))])


def load_dir(path: str | Path) -> PolicySource:
    root = Path(path)
    if not root.is_dir():
        raise PolicyError(f"{root}: not a directory")
    names = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    files = []
    relative = [p.relative_to(root).as_posix() for p in names]
    for p in names:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{p}: cannot read: {exc}") from None
        files.append((str(p), text, p.name.endswith((".test.yaml", ".test.yml"))))
    if not any(not t for _, _, t in files):
        raise PolicyError(f"{root}: no policy files (*.yaml) found")
    return _finish(files, relative)


def load_files(texts: list[tuple[str, str]], where: str) -> PolicySource:
    """A set held as (relative name, text) pairs, e.g. in the store (``policies.source: store``);
    messages name each file as ``where/name``. The same parser and checks as :func:`load_dir`,
    and the same digest for the same files."""
    names = sorted(name for name, _ in texts)
    by_name = dict(texts)
    if len(by_name) != len(texts):
        raise PolicyError(f"{where}: a file name is used twice")
    files = [(f"{where}/{n}", by_name[n], n.rsplit("/", 1)[-1].endswith((".test.yaml", ".test.yml")))
             for n in names]
    if not any(not t for _, _, t in files):
        raise PolicyError(f"{where}: no policy files (*.yaml) found")
    return _finish(files, names)
