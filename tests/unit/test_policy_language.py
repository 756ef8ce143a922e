"""The policy language: every mistake gets one line naming file:line:column and the key."""

import pytest

from proxy.facts import StaticFacts
from proxy.policy import Policies, PolicyError
from proxy.policy.language import load_dir, load_text

GOOD_RULE = """\
version: 1
rules:
  - id: ok
    subjects: [anyone]
    mqtt: {topics: ["a/#"], actions: [publish]}
"""


def error_of(text, filename="p.yaml"):
    with pytest.raises(PolicyError) as exc:
        load_text(text, filename)
    return str(exc.value)


@pytest.mark.parametrize("text,expected", [
    ("version: 1\nrules: [\n", r"^p.yaml:3:1: invalid YAML"),
    ("", r"^p.yaml: the file is empty"),
    ("rules: []\n", r"^p.yaml:1:1: version: required"),
    ("version: 2\nrules: []\n", r"^p.yaml:1:10: version: only schema version 1"),
    ("version: 1\nrulez: []\n", r"^p.yaml:2:1: rulez: unknown key \(did you mean rules\?\)"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n", r"^p.yaml:3:5: rules\[0\]: a rule needs mqtt:"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [owenr]\n    mqtt: {topics: [a], actions: [publish]}\n",
     r"^p.yaml:4:16: rules\[0\].subjects: unknown subject 'owenr' \(did you mean owner\?\)"),
    ("version: 1\nrules:\n  - id: x\n    subjects: ['role:']\n    mqtt: {topics: [a], actions: [publish]}\n",
     r"role: needs a name"),
    ("version: 1\nrules:\n  - id: x\n    subjects: ['client-role:x']\n    mqtt: {topics: [a], actions: [publish]}\n",
     r"client-role:CLIENT:ROLE"),
    ("version: 1\nrules:\n  - id: x\n    effect: permit\n"
     "    subjects: [anyone]\n    mqtt: {topics: [a], actions: [publish]}\n",
     r"^p.yaml:4:13: rules\[0\].effect: expected allow or deny, got 'permit'"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    mqtt: {topics: ['a/#/b'], actions: [publish]}\n",
     r"^p.yaml:5:21: rules\[0\].mqtt.topics: # must be the last topic level"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    mqtt: {topics: ['a/b+'], actions: [publish]}\n",
     r"must stand alone"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n"
     "    mqtt: {topics: ['a/x-{username}'], actions: [publish]}\n",
     r"a placeholder must be a whole level"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    mqtt: {topics: ['a/{user}'], actions: [publish]}\n",
     r"unknown placeholder \{user\}"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n"
     "    mqtt: {topics: ['{device}/{device}'], actions: [publish]}\n",
     r"\{device\} may appear only once"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [owner]\n    mqtt: {topics: ['devices/+'], actions: [publish]}\n",
     r"^p.yaml:4:15: rules\[0\].subjects: owner is a relation .* has no \{device\}"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [public]\n    http: {paths: ['/v2/entities'], methods: [GET]}\n",
     r"public is a relation"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n"
     "    mqtt: {topics: [a], actions: [subscribe], retain: false}\n",
     r"^p.yaml:5:47: rules\[0\].mqtt.retain: conditions apply to publishes only"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    mqtt: {topics: [a], actions: [publish], qos: [3]}\n",
     r"QoS is 0, 1 or 2"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    mqtt: {topics: [a], actions: [receive]}\n",
     r"expected publish or subscribe, got 'receive'"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['v2'], methods: [GET]}\n",
     r"a path pattern must start with /"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['/a/%2e'], methods: [GET]}\n",
     r"write path patterns decoded"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['/a/**/b'], methods: [GET]}\n",
     r"\*\* must be the last path segment"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['/c/{client_id}'], methods: [GET]}\n",
     r"^p.yaml:5:20: rules\[0\].http.paths: \{client_id\} is an MQTT client id"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['/a'], methods: ['GET POST']}\n",
     r"not an HTTP method"),
    ("version: 1\nrules:\n  - id: 'has space'\n    subjects: [anyone]\n    http: {paths: ['/a'], methods: [GET]}\n",
     r"rules\[0\].id: ids use letters"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone]\n    http: {paths: ['/a'], methods: [GET]}\n"
     "  - id: x\n    subjects: [anyone]\n    http: {paths: ['/b'], methods: [GET]}\n",
     r"^p.yaml:6:5: rule id 'x' is already used at p.yaml:3:5"),
    ("version: 1\nrules:\n  - id: x\n    id: y\n    subjects: [anyone]\n    http: {paths: ['/a'], methods: [GET]}\n",
     r"rules\[0\].id: given twice"),
    ("version: 1\nrules:\n  - id: x\n    subjects: [anyone, anyone]\n    http: {paths: ['/a'], methods: [GET]}\n",
     r"anyone listed twice"),
    (GOOD_RULE + "tests:\n  - as: {user: a}\n    mqtt: {action: publish, topic: a/b}\n    expect: check-each\n",
     r"^p.yaml:9:13: tests\[0\].expect: expected allow or deny, got 'check-each'"),
    (GOOD_RULE + "tests:\n  - as: {user: a, device: d}\n    mqtt: {action: publish, topic: a/b}\n    expect: allow\n",
     r"tests\[0\].as: give exactly one of"),
    (GOOD_RULE + "tests:\n  - as: {user: a}\n    expect: allow\n", r"exactly one question"),
    (GOOD_RULE + "tests:\n  - as: {user: a}\n    mqtt: {action: publish, topic: a/b}\n    expect: allow\n"
     "    rule: nosuch\n", r"^p.yaml:7:5: rule: no rule has id 'nosuch'"),
    (GOOD_RULE + "tests:\n  - as: {user: a}\n    delegated: [{device: d, permission: all}]\n"
     "    mqtt: {action: publish, topic: a/b}\n    expect: allow\n", r"expected read, write or readwrite"),
])
def test_errors_name_file_line_column(text, expected):
    import re

    msg = error_of(text)
    assert re.search(expected, msg), msg
    assert "\n" not in msg


def test_duplicate_ids_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    (tmp_path / "b.yaml").write_text(GOOD_RULE)
    with pytest.raises(PolicyError, match=r"b.yaml:3:5: rule id 'ok' is already used at .*a.yaml:3:5"):
        load_dir(tmp_path)


def test_test_files_hold_tests_only_and_may_name_rules_in_other_files(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    (tmp_path / "a.test.yaml").write_text(
        "version: 1\ntests:\n  - as: {user: u}\n    mqtt: {action: publish, topic: a/b}\n    expect: allow\n"
        "    rule: ok\n")
    src = load_dir(tmp_path)
    assert [r.id for r in src.rules] == ["ok"] and len(src.tests) == 1
    (tmp_path / "b.test.yaml").write_text(GOOD_RULE)
    with pytest.raises(PolicyError, match=r"b.test.yaml:2:1: rules: unknown key"):
        load_dir(tmp_path)


def test_directory_loading(tmp_path):
    with pytest.raises(PolicyError, match="no policy files"):
        load_dir(tmp_path)
    (tmp_path / ".hidden.yaml").write_text("not: valid: yaml: [")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yml").write_text(GOOD_RULE.replace("ok", "more"))
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    src = load_dir(tmp_path)
    assert [r.id for r in src.rules] == ["ok", "more"]   # sorted path order
    with pytest.raises(PolicyError, match="not a directory"):
        load_dir(tmp_path / "a.yaml")


def test_digest_follows_content(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    d1 = load_dir(tmp_path).digest
    assert load_dir(tmp_path).digest == d1
    (tmp_path / "a.yaml").write_text(GOOD_RULE + "# a comment\n")
    assert load_dir(tmp_path).digest != d1


def test_scalars_are_accepted_for_one_item_lists():
    p = Policies.from_text("version: 1\nrules:\n  - id: x\n    subjects: anyone\n"
                           "    mqtt: {topics: a/b, actions: publish}\n", StaticFacts())
    from tests.unit.policy_helpers import user

    assert p.may_publish(user(), "a/b").allowed


def test_yaml_tags_and_anchors_cannot_smuggle_objects():
    msg = error_of("version: 1\nrules:\n  - id: !!python/object:os.system x\n    subjects: [anyone]\n"
                   "    mqtt: {topics: [a], actions: [publish]}\n")
    assert msg.startswith("p.yaml:3:9: YAML tag tag:yaml.org,2002:python/object:os.system is not allowed"), msg
