"""``keygate policy check|test|explain`` and the shipped policies."""

from pathlib import Path

from proxy.cli import main

SHIPPED = str(Path(__file__).resolve().parents[2] / "policies")


def run(capsys, *argv):
    rc = main(["policy", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_shipped_policies_check_clean(capsys):
    rc, out, err = run(capsys, "check", SHIPPED)
    assert rc == 0, err
    assert out.startswith("ok: ") and "warning" not in out  # every shipped rule has a test


def test_shipped_policies_tests_pass(capsys):
    rc, out, _err = run(capsys, "test", SHIPPED)
    assert rc == 0, out
    assert "FAIL" not in out
    assert out.splitlines()[-1].endswith(" passed, 0 failed")
    assert "owners-and-delegates-read" in out   # each decision is printed with its rule


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_check_reports_every_broken_file_with_file_line(tmp_path, capsys):
    write(tmp_path, "a.yaml", "version: 1\nrules:\n  - id: x\n    subjects: [owenr]\n"
                              "    mqtt: {topics: [a], actions: [publish]}\n")
    write(tmp_path, "b.yaml", "version: 1\nrules:\n  - id: y\n    subjects: [owner]\n"
                              "    mqtt: {topics: [a/b], actions: [publish]}\n")
    rc, _out, err = run(capsys, "check", str(tmp_path))
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path}/a.yaml:4:16: rules[0].subjects: unknown subject 'owenr'")
    assert lines[1].startswith(f"{tmp_path}/b.yaml:4:15: rules[0].subjects: owner is a relation")


def test_check_finds_shadowed_and_unreachable_rules(tmp_path, capsys):
    write(tmp_path, "a.yaml", """version: 1
rules:
  - id: wide
    subjects: [anyone]
    mqtt: {topics: ["a/+"], actions: [publish]}
  - id: narrow
    subjects: ["user:x"]
    mqtt: {topics: ["a/b"], actions: [publish]}
  - id: not-shadowed-other-action
    subjects: [anyone]
    mqtt: {topics: ["a/b"], actions: [subscribe]}
  - id: owners-http
    subjects: [owner]
    http: {paths: ["/v2/entities/{device}"], methods: [GET]}
  - id: close-all
    effect: deny
    subjects: [anyone, anonymous]
    mqtt: {topics: ["a/#"], actions: [publish]}
    http: {paths: ["/v2/**"], methods: ["*"]}
tests:
  - as: {user: x}
    mqtt: {action: subscribe, topic: a/b}
    expect: allow
""")
    rc, out, err = run(capsys, "check", str(tmp_path))
    assert rc == 1
    assert f"{tmp_path}/a.yaml:3:5: rule 'wide' is shadowed by deny rule 'close-all' ({tmp_path}/a.yaml:15:5)" in err
    assert "rule 'narrow' is shadowed by deny rule 'close-all'" in err
    assert "rule 'owners-http' is shadowed by deny rule 'close-all'" in err
    assert "rule 'narrow' is unreachable: earlier rule 'wide'" in err
    assert "not-shadowed-other-action" not in err
    assert "warning: rule 'wide' has no test case" in out


def test_a_deny_for_some_subjects_does_not_shadow_others(tmp_path, capsys):
    write(tmp_path, "a.yaml", """version: 1
rules:
  - id: for-anonymous
    subjects: [anonymous, delegate]
    mqtt: {topics: ["d/{device}"], actions: [publish]}
  - id: deny-authenticated
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["#"], actions: [publish]}
tests:
  - as: {anonymous: true}
    mqtt: {action: publish, topic: d/x}
    expect: allow
""")
    rc, _out, err = run(capsys, "check", str(tmp_path))
    assert rc == 0, err


def test_test_command_shows_failures(tmp_path, capsys):
    write(tmp_path, "a.yaml", """version: 1
rules:
  - id: r
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/#"], actions: [subscribe]}
tests:
  - name: passes
    as: {user: alice}
    owns: [d1]
    mqtt: {action: subscribe, topic: devices/d1/x}
    expect: allow
    rule: r
  - name: wrong expectation
    as: {user: bob}
    mqtt: {action: subscribe, topic: devices/d1/x}
    expect: allow
  - name: wrong rule
    as: {user: alice}
    owns: [d1]
    mqtt: {action: subscribe, topic: "devices/+/x"}
    expect: check-each
""")
    rc, out, _err = run(capsys, "test", str(tmp_path))
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"ok   {tmp_path}/a.yaml:7:5: user:alice mqtt subscribe devices/d1/x -> allow (r)")
    assert lines[1].startswith(f"FAIL {tmp_path}/a.yaml:13:5: user:bob mqtt subscribe devices/d1/x -> deny "
                               "(no rule matched); expected allow")
    assert lines[2].startswith("ok  ")
    assert lines[-1] == "2 passed, 1 failed"
    rc, out, _ = run(capsys, "test", "-q", str(tmp_path))
    assert "FAIL" in out and "ok  " not in out


def test_test_command_on_a_broken_set_is_one_line(tmp_path, capsys):
    write(tmp_path, "a.yaml", "version: 1\nrules: {}\n")
    rc, _out, err = run(capsys, "test", str(tmp_path))
    assert rc == 1
    assert err.strip() == f"keygate: {tmp_path}/a.yaml:2:8: rules: expected a list, got a mapping"


def test_explain(capsys):
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:bob", "--delegated", "thermo-1:read",
                     "--mqtt", "publish", "devices/thermo-1/cmd/reboot")
    assert rc == 0
    assert "decision: deny" in out and "reason:   no rule matched" in out
    assert "owners-and-delegates-command [devices/{device}/cmd/#] no subject holds (owner, delegate)" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:alice", "--owns", "t1",
                     "--http", "get", "/v2/entities/t1/../t1/attrs")
    assert "GET /v2/entities/t1/attrs" in out
    assert "decision: allow" in out and "rule:     owners-and-delegates-entities" in out
    assert "subjects hold: owner; device t1" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:root", "--role", "iot-admin",
                     "--mqtt", "subscribe", "devices/+/telemetry")
    assert "decision: allow" in out and "rule:     admins-mqtt" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "anonymous", "--http", "GET", "/v2/%2e%2e/version")
    assert "the path is refused" in out and "decision: deny" in out


def test_explain_keeps_principal_kinds_apart(capsys):
    """A delegation to the service iot-backend holds for that service, not for a user of that name;
    group:NAME and service:CLIENT grantees survive the DEVICE:PERMISSION:TO split."""
    topic = ("--mqtt", "subscribe", "devices/thermo-1/telemetry")
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "service:iot-backend",
                     "--delegated", "thermo-1:read:service:iot-backend", *topic)
    assert rc == 0 and "decision: allow" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:iot-backend",
                     "--delegated", "thermo-1:read:service:iot-backend", *topic)
    assert "decision: deny" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:bob", "--group", "ops",
                     "--delegated", "thermo-1:read:group:ops", *topic)
    assert "decision: allow" in out
    rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "user:group:ops",
                     "--delegated", "thermo-1:read:group:ops", *topic)
    assert "decision: deny" in out


def test_explain_rejects_bad_arguments(capsys):
    rc, _, err = run(capsys, "explain", SHIPPED, "--as", "alice", "--mqtt", "publish", "x")
    assert rc == 1 and "--as takes user:NAME" in err
    rc, _, err = run(capsys, "explain", SHIPPED, "--as", "user:a", "--delegated", "d1:all", "--mqtt", "publish", "x")
    assert rc == 1 and "--delegated d1:all" in err


def test_explain_names_unmet_conditions(capsys):
    _rc, out, _ = run(capsys, "explain", SHIPPED, "--as", "device:thermo-1", "--http", "DELETE",
                      "/v2/entities/thermo-1")
    assert "decision: deny" in out
    assert "device-updates-own-entity [/v2/entities/{device}] subjects hold: device; device thermo-1; " \
           "but DELETE is not among its methods" in out


def test_a_relation_about_another_level_does_not_shadow(tmp_path, capsys):
    write(tmp_path, "a.yaml", """version: 1
rules:
  - id: owners-of-the-second-level
    subjects: [owner]
    mqtt: {topics: ["a/{device}"], actions: [publish]}
  - id: not-owners-of-the-first-level
    effect: deny
    subjects: [owner]
    mqtt: {topics: ["{device}/#"], actions: [publish]}
  - id: same-level
    subjects: [owner]
    mqtt: {topics: ["b/{device}/x"], actions: [publish]}
  - id: deny-same-level
    effect: deny
    subjects: [owner, anonymous]
    mqtt: {topics: ["b/{device}/#"], actions: [publish]}
""")
    rc, _out, err = run(capsys, "check", str(tmp_path))
    assert rc == 1
    assert "owners-of-the-second-level" not in err
    assert "rule 'same-level' is shadowed by deny rule 'deny-same-level'" in err
