"""``policies.source: store``: the policy set pushed to the store, followed by every process.

``keygate policy push DIR`` (ownership/policy_push.py) writes a new version of the set to the store.
Each process loads the newest version at start, and follows it: with the postgres backend through
the change feed (a push is one change with its sequence number and NOTIFY, like an ownership
write; after each catch-up the feed asks this module whether the set's version moved), with the
SQLCipher file by asking it every :data:`POLL_SECONDS`. A new version is loaded with the same
loader as a directory and swapped in exactly as a reload is (gateways drop their caches and
re-check open connections); one that does not load keeps the set in force, logged and in /readyz.

When the change feed fails closed, a set pushed meanwhile (one that withdraws a grant, say) could
not be heard either: the set in force is then replaced by one with no rule, so nothing a policy
grants is served until the feed is back and the store's newest set is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from proxy.config import Config, ConfigError
from proxy.policy.decision import PolicyError
from proxy.policy.engine import CompiledPolicies
from proxy.policy.holder import Policies
from proxy.policy.language import PolicySource, load_files

if TYPE_CHECKING:
    from ownership.service import OwnershipService

__all__ = ["StorePolicies", "load_from_store", "POLL_SECONDS"]

log = logging.getLogger("keygate.policy")

#: How often a process on the SQLCipher backend (no change feed) asks the file for a new version.
POLL_SECONDS = 1.0


def where(version: int) -> str:
    """How messages name a stored set's files: ``store@VERSION/NAME:line:column``."""
    return f"store@{version}"


def _no_rule() -> PolicySource:
    return load_files([("failed-closed.yaml", "version: 1\nrules: []\n")], "failed-closed")


def source_of(row: tuple[int, str, list[tuple[str, str]]]) -> PolicySource:
    version, _digest, texts = row
    return load_files(texts, where(version))


async def load_from_store(config: Config, ownership: OwnershipService) -> Policies:
    """The newest pushed set, compiled and in force; ConfigError (one line) when there is none or it does not load."""
    row = await ownership.policy_set()
    if row is None:
        raise ConfigError("policies.source is store, but the store holds no policy set: push one with "
                          "keygate policy push DIR -c CONFIG")
    try:
        src = await asyncio.to_thread(source_of, row)
    except PolicyError as exc:
        raise ConfigError(f"policies.source store: {exc}") from None
    compiled = CompiledPolicies(src, ownership.facts, admin_role=config.ownership.admin_role,
                                cache_max_bytes=config.policies.cache_max_bytes)
    return Policies(compiled, version=row[0], served=True)


class StorePolicies:
    """Keeps ``policies`` on the store's newest version (see the module's docstring)."""

    def __init__(self, policies: Policies, ownership: OwnershipService, *, poll_seconds: float = POLL_SECONDS):
        self.policies = policies
        self._ownership = ownership
        self._poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._tried: int | None = None  # a version refused once is not reloaded at every change
        self._closings = 0  # how many times the feed failed closed: a read from before one is stale

    def start(self) -> None:
        feed = self._ownership.feed
        if feed is not None:
            feed.after_catch_up.append(self.follow)
            feed.on_fail_closed.append(self.fail_closed)
            # A push between the load at start and this hook: the feed may have caught up on it already.
            self._task = asyncio.create_task(self._follow_logged(), name="keygate-policy-store-first-follow")
        else:
            self._task = asyncio.create_task(self._poll(), name="keygate-policy-store-poll")

    async def close(self) -> None:
        feed = self._ownership.feed
        if feed is not None and self.follow in feed.after_catch_up:
            feed.after_catch_up.remove(self.follow)
        if feed is not None and self.fail_closed in feed.on_fail_closed:
            feed.on_fail_closed.remove(self.fail_closed)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow(self) -> None:
        """Load the store's newest set if it is not the one in force (nor one already refused)."""
        async with self._lock:
            closings = self._closings
            version = await self._ownership.policy_set_version()
            if version in (self.policies.version, self._tried):
                return
            row = await self._ownership.policy_set()
            if row is None:
                return
            self._tried = row[0]
            await self.policies.load_source(lambda: source_of(row), version=row[0])
            feed = self._ownership.feed
            if self._closings != closings or (feed is not None and feed.failed_closed):
                # The feed failed closed while this read or compiled (and may be back already): the
                # set read may predate a push made while it was silent, so the set stays the one with
                # no rule, and the next follow reads again (this runs in the loop step that put the
                # loaded set in force).
                self._serve_no_rule()

    def fail_closed(self) -> None:
        """The feed cannot hear the store: serve a set with no rule until it is caught up again (the
        next catch-up's :meth:`follow` loads the store's newest set, whatever its version)."""
        self._closings += 1
        self._serve_no_rule()
        log.error("policy set: the change feed is silent; no policy rule is served until it is back")

    def _serve_no_rule(self) -> None:
        self.policies.swap(self.policies.compile(_no_rule()))
        self.policies.version = None
        self._tried = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            await self._follow_logged()

    async def _follow_logged(self) -> None:
        try:
            await self.follow()
        except Exception as exc:  # the store busy or gone for a moment: the next change or poll tries again
            log.warning("policy set: cannot read the store: %s", exc)
