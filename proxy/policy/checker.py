"""``keygate policy check``: what loading alone does not tell the operator.

Loading already refuses broken schema, unknown subjects, duplicate ids and
relation subjects on patterns without ``{device}``. The checker adds, across
the whole set:

* **shadowed** allow rules: a deny rule (anywhere: a deny wins regardless of
  order) covers every question the allow rule answers -- each of its
  patterns is contained in one of the deny's patterns for the same action,
  the deny's subjects hold whenever the allow's do, and its conditions and
  methods are at least as wide. Such a rule can never allow anything.
* **unreachable** allow rules: an earlier allow rule, for the same or
  wider subjects (every subject of this rule appears there, or it has
  ``anyone`` and this rule only authenticated subjects), already allows every
  question this rule answers, so this rule can never be the one that decides
  and the audit log will never name it.
* **untested** rules (a warning): no test case names the rule or is decided
  by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.policy.decision import PolicyError
from proxy.policy.language import PolicySource, Rule, _finish, parse_file
from proxy.policy.patterns import DEVICE, Pattern, contains
from proxy.policy.subjects import RELATIONS
from proxy.policy.testing import run_all

__all__ = ["Finding", "check_dir", "check_source"]

_ANON_CAPABLE = {"anonymous", "delegate", "delegate:read", "delegate:write"}


@dataclass(frozen=True)
class Finding:
    where: str
    message: str
    error: bool = True

    def __str__(self) -> str:
        return f"{self.where}: {'' if self.error else 'warning: '}{self.message}"


def _subjects_covered(allow: Rule, wider: Rule) -> tuple[bool, bool]:
    """(covered, via a relation): do ``wider``'s subjects hold whenever ``allow``'s do?

    "via a relation" means some relation subject is covered only by the same
    relation, which then says the same thing only about the same device.
    """
    ws = set(wider.subjects)
    everyone = "anyone" in ws and "anonymous" in ws
    via_relation = False
    for s in allow.subjects:
        if everyone or ("anyone" in ws and s not in _ANON_CAPABLE):
            continue
        if s in ws:
            via_relation |= s in RELATIONS
            continue
        return False, False
    return True, via_relation


def _pattern_covers(outer: Pattern, inner: Pattern, same_device: bool) -> bool:
    if not contains(outer, inner):
        return False
    return not same_device or (DEVICE in outer and DEVICE in inner and outer.index(DEVICE) == inner.index(DEVICE))


def _questions(rule: Rule) -> list[tuple[str, Pattern]]:
    out: list[tuple[str, Pattern]] = []
    if rule.mqtt:
        for a in sorted(rule.mqtt.actions):
            out.extend((a, p) for p in rule.mqtt.topics)
    if rule.http:
        out.extend(("http", p) for p in rule.http.paths)
    return out


def _conditions_covered(allow: Rule, deny: Rule) -> bool:
    if allow.mqtt and deny.mqtt and "publish" in allow.mqtt.actions:
        if deny.mqtt.retain is not None and deny.mqtt.retain != allow.mqtt.retain:
            return False
        if deny.mqtt.qos is not None and (allow.mqtt.qos is None or not allow.mqtt.qos <= deny.mqtt.qos):
            return False
    if allow.http:
        if not deny.http:
            return False
        if deny.http.methods is not None and (allow.http.methods is None
                                              or not allow.http.methods <= deny.http.methods):
            return False
    return True


def _covers(allow: Rule, wider: Rule) -> bool:
    """Does ``wider`` apply to every request ``allow`` applies to?"""
    covered, same_device = _subjects_covered(allow, wider)
    if not covered or not _conditions_covered(allow, wider):
        return False
    wq = _questions(wider)
    return all(any(q == wq_ and _pattern_covers(wp, p, same_device) for wq_, wp in wq) for q, p in _questions(allow))


def shadowing_deny(allow: Rule, denies: list[Rule]) -> Rule | None:
    return next((d for d in denies if _covers(allow, d)), None)


def check_source(src: PolicySource) -> list[Finding]:
    findings: list[Finding] = []
    denies = [r for r in src.rules if not r.allow]
    for rule in src.rules:
        if rule.allow:
            d = shadowing_deny(rule, denies)
            if d is not None:
                findings.append(Finding(rule.where, f"rule {rule.id!r} is shadowed by deny rule {d.id!r} "
                                                    f"({d.where}): it can never allow anything"))
    allows = [r for r in src.rules if r.allow]
    for i, rule in enumerate(allows):
        for earlier in allows[:i]:
            if _covers(rule, earlier):
                findings.append(Finding(rule.where, f"rule {rule.id!r} is unreachable: earlier rule "
                                                    f"{earlier.id!r} ({earlier.where}) already allows all of it"))
                break
    named = {t.rule for t in src.tests if t.rule}

    decided = {r.rule for r in run_all(src)}
    for rule in src.rules:
        if rule.id not in named and rule.id not in decided:
            findings.append(Finding(rule.where, f"rule {rule.id!r} has no test case", error=False))
    return findings


def check_dir(path: str | Path) -> list[Finding]:
    """Every finding for the directory, one per problem, errors first in file order."""
    root = Path(path)
    if not root.is_dir():
        return [Finding(str(root), "not a directory")]
    names = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    files, findings = [], []
    for p in names:
        try:
            text = p.read_text(encoding="utf-8")
            files.append((str(p), text, p.name.endswith((".test.yaml", ".test.yml"))))
            parse_file(text, str(p), tests_only=files[-1][2])
        except (OSError, UnicodeDecodeError) as exc:
            findings.append(Finding(str(p), f"cannot read: {exc}"))
        except PolicyError as exc:
            where, _, msg = str(exc).partition(": ")
            findings.append(Finding(where, msg))
    if findings:
        return findings
    if not files:
        return [Finding(str(root), "no policy files (*.yaml) found")]
    try:
        src = _finish(files)
    except PolicyError as exc:
        where, _, msg = str(exc).partition(": ")
        return [Finding(where, msg)]
    return check_source(src)
