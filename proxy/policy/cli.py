"""``keygate policy check|test|explain``: the operator's tools for policy files.

* ``check DIR`` -- load every file and analyse the set (see :mod:`.checker`);
  prints ``file:line:column: message`` per finding, exit 1 on any error
  (warnings alone exit 0).
* ``test DIR`` -- run every YAML test case; prints each decision with the
  rule that made it, failing ones marked ``FAIL`` with what was expected;
  exit 1 on any failure.
* ``push DIR -c proxy.yaml`` -- added by :mod:`ownership.policy_push` (it needs the
  store, a layer above this one): validate as a reload would, put it in the store.
* ``explain DIR --as user:alice [--role R] [--owns D] [--delegated D:read]
  [--public D] (--mqtt ACTION TOPIC | --http METHOD PATH)`` -- prints the
  decision, the rule that made it, and every rule whose pattern matched the
  request with whether its subjects held (so "why not?" has an answer).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from proxy.errors import CommandError
from proxy.policy.decision import PolicyError

if TYPE_CHECKING:  # the command's modules load only when it runs
    from proxy.policy.language import PolicySource, Rule
    from proxy.policy.subjects import Want

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The sub-commands; returns them, so a layer above can add its own (``push``)."""
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("check", help="validate every policy file: schema, subjects, shadowed/unreachable rules")
    p.add_argument("dir")
    p.add_argument("--admin-role", default="iot-admin", help="role the 'admin' subject stands for")
    p = sub.add_parser("test", help="run the YAML test cases next to the policies")
    p.add_argument("dir")
    p.add_argument("-q", "--quiet", action="store_true", help="print failing cases only")
    p.add_argument("--admin-role", default="iot-admin")
    p = sub.add_parser("explain", help="explain one decision")
    p.add_argument("dir")
    p.add_argument("--as", dest="as_", required=True, metavar="WHO",
                   help="user:NAME, device:ID or anonymous")
    p.add_argument("--role", action="append", default=[])
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--scope", action="append", default=[])
    p.add_argument("--client-role", action="append", default=[], metavar="CLIENT:ROLE")
    p.add_argument("--client-id", default="")
    p.add_argument("--owns", action="append", default=[], metavar="DEVICE")
    p.add_argument("--delegated", action="append", default=[], metavar="DEVICE:PERMISSION[:TO]")
    p.add_argument("--public", action="append", default=[], metavar="DEVICE")
    p.add_argument("--qos", type=int, default=0)
    p.add_argument("--retain", action="store_true")
    p.add_argument("--admin-role", default="iot-admin")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--mqtt", nargs=2, metavar=("ACTION", "TOPIC"), help="publish|subscribe|receive TOPIC")
    q.add_argument("--http", nargs=2, metavar=("METHOD", "PATH"))
    return sub


def run(args: argparse.Namespace) -> int:
    return {"check": _check, "test": _test, "explain": _explain}[args.policy_command](args)


def _check(args: argparse.Namespace) -> int:
    from proxy.policy.checker import check_dir

    findings = check_dir(args.dir)
    for f in findings:
        print(f, file=sys.stderr if f.error else sys.stdout)
    errors = sum(f.error for f in findings)
    if errors:
        return 1
    from proxy.policy.language import load_dir

    src = load_dir(args.dir)
    print(f"ok: {len(src.rules)} rules, {len(src.tests)} tests in {len(src.files)} files, hash {src.digest}")
    return 0


def _load(path: str) -> PolicySource:
    from proxy.policy.language import load_dir

    try:
        return load_dir(path)
    except PolicyError as exc:
        raise CommandError(str(exc)) from None


def _test(args: argparse.Namespace) -> int:
    from proxy.policy.testing import run_all

    src = _load(args.dir)
    results = run_all(src, admin_role=args.admin_role)
    failed = [r for r in results if not r.passed]
    for r in results:
        if r.passed and args.quiet:
            continue
        mark = "ok  " if r.passed else "FAIL"
        line = f"{mark} {r.case.where}: {r.who} {r.question} -> {r.got} ({r.rule or r.reason})"
        if not r.passed:
            want = r.case.expect + (f" by {r.case.rule}" if r.case.rule else "")
            line += f"; expected {want}"
        if r.case.name:
            line += f"  [{r.case.name}]"
        print(line)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _explain(args: argparse.Namespace) -> int:
    from proxy.policy.engine import CompiledPolicies
    from proxy.policy.language import TestCase
    from proxy.policy.paths import PathError, normalize_path, split_path
    from proxy.policy.patterns import identity_values, match, pattern_text
    from proxy.policy.subjects import RELATIONS, identity_keys, partition_key, relations_hold
    from proxy.policy.testing import facts_for, identity_for

    src = _load(args.dir)
    who = args.as_
    if who == "anonymous":
        as_: dict[str, Any] = {"kind": "anonymous", "name": ""}
    else:
        kind, sep, name = who.partition(":")
        if not sep or kind not in ("user", "service", "device") or not name:
            raise CommandError("--as takes user:NAME, service:CLIENT, device:ID or anonymous")
        as_ = {"kind": kind, "name": name}
    as_.update(roles=tuple(args.role), groups=tuple(args.group), scopes=tuple(args.scope),
               client_roles=tuple(args.client_role), client_id=args.client_id)
    delegated = []
    for text in args.delegated:
        parts = text.split(":", 2)  # the grantee may be group:NAME or service:CLIENT
        if len(parts) not in (2, 3) or parts[1] not in ("read", "write", "readwrite"):
            raise CommandError(f"--delegated {text}: write DEVICE:read|write|readwrite[:GRANTEE]")
        delegated.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    mqtt: dict[str, Any] | None = None
    http: dict[str, Any] | None = None
    if args.mqtt:
        action, topic = args.mqtt
        if action not in ("publish", "subscribe", "receive"):
            raise CommandError("--mqtt takes publish, subscribe or receive")
        mqtt = {"action": action, "topic": topic, "qos": args.qos, "retain": args.retain}
    else:
        http = {"method": args.http[0], "path": args.http[1]}
    case = TestCase("", as_, tuple(args.owns), tuple(delegated), tuple(args.public), mqtt, http, "allow", None,
                    "<cli>", 0, 0)
    identity = identity_for(as_)
    facts = facts_for(case, identity)
    engine = CompiledPolicies(src, facts, admin_role=args.admin_role)
    vals = identity_values(identity.sub, identity.username, args.client_id)

    levels: list[str] | None
    want: Want
    if mqtt:
        q = mqtt
        if q["action"] == "subscribe":
            s = engine.may_subscribe(identity, q["topic"], qos=q["qos"], client_id=args.client_id)
            verdict, rule, reason = s.verdict.value, s.rule, s.reason
        elif q["action"] == "publish":
            d = engine.may_publish(identity, q["topic"], qos=q["qos"], retain=q["retain"], client_id=args.client_id)
            verdict, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
        else:
            d = engine.may_receive(identity, q["topic"], client_id=args.client_id)
            verdict, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
        question = "publish" if q["action"] == "publish" else "subscribe"
        levels, dollar, want = q["topic"].split("/"), True, ("write" if question == "publish" else "read")
        print(f"{who} mqtt {q['action']} {q['topic']}")
    else:
        assert http is not None  # noqa: S101 (narrowing: --mqtt or --http is required)
        d = engine.may_http(identity, http["method"], http["path"])
        verdict, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
        question = "http"
        try:
            norm = normalize_path(http["path"])
            levels = split_path(norm)
            print(f"{who} http {http['method'].upper()} {norm}")
        except PathError as exc:
            levels = None
            print(f"{who} http {http['method']} {http['path']}: the path is refused: {exc}")
        dollar = False
        want = "read" if http["method"].upper() in ("GET", "HEAD", "OPTIONS") else "write"
    print(f"decision: {verdict}")
    print(f"rule:     {rule or '-'}")
    print(f"reason:   {reason}")
    keys = set(identity_keys(identity))
    candidates = []
    for r in src.rules:
        if question == "http":
            patterns = r.http.paths if r.http else ()
        else:
            patterns = r.mqtt.topics if r.mqtt and question in r.mqtt.actions else ()
        for p in patterns:
            if levels is None or "+" in "".join(levels) or "#" in "".join(levels):
                break  # a refused path or a wildcard filter: the engine's verdict above is the explanation
            ok, device = match(p, levels, vals, dollar_rule=dollar)
            if not ok:
                continue
            held = [s for s in r.subjects if (s in RELATIONS and relations_hold([s], identity, device, facts, want))
                    or (s not in RELATIONS and partition_key(s, args.admin_role) in keys)]
            state = f"subjects hold: {', '.join(held)}" if held else f"no subject holds ({', '.join(r.subjects)})"
            if device:
                state += f"; device {device}"
            unmet = _unmet_condition(r, question, mqtt, http)
            if unmet:
                state += f"; but {unmet}"
            candidates.append(f"  {r.effect:5} {r.id} [{pattern_text(p, question == 'http')}] {state}  ({r.where})")
            break
    if candidates:
        print("matching rules:")
        print("\n".join(candidates))
    elif levels is not None:
        print("matching rules: none")
    return 0


def _unmet_condition(rule: Rule, question: str, mqtt: dict[str, Any] | None, http: dict[str, Any] | None) -> str:
    """Why a rule whose pattern and subjects match still does not apply, or ''."""
    if (question == "http" and rule.http and http and rule.http.methods is not None
            and http["method"].upper() not in rule.http.methods):
        return f"{http['method'].upper()} is not among its methods ({', '.join(sorted(rule.http.methods))})"
    if question == "publish" and mqtt and rule.mqtt:
        if rule.mqtt.retain is not None and rule.mqtt.retain != mqtt["retain"]:
            return f"it applies to retain={str(rule.mqtt.retain).lower()} only"
        if rule.mqtt.qos is not None and mqtt["qos"] not in rule.mqtt.qos:
            return f"QoS {mqtt['qos']} is not among {sorted(rule.mqtt.qos)}"
    return ""
