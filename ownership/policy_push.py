"""``keygate policy push DIR -c proxy.yaml``: put a policy set in the store (``policies.source: store``).

The set is loaded and compiled exactly as a reload of the directory would be (the same loader);
a set a reload would refuse is refused here with its ``file:line:column: message``, and the store
is left as it was. A good set becomes a new version in the store; every process following the
store loads it (ownership/policy_store.py). Prints the new version and the set's digest: the
one each process then shows in /readyz and ``keygate_policy_info``.
"""

from __future__ import annotations

import argparse
import sys
import time

from proxy.config import load_config, store_key
from proxy.errors import CommandError
from proxy.policy.decision import PolicyError

__all__ = ["add_arguments", "run", "push"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``keygate policy``: the policy layer's sub-commands (proxy/policy/cli.py) and ``push``."""
    from proxy.policy import cli

    sub = cli.add_arguments(parser)
    p = sub.add_parser("push", help="validate a policy set as a reload would and put it in the store "
                                    "(policies.source: store)")
    p.add_argument("dir")
    p.add_argument("-c", "--config", default="proxy.yaml", help="configuration file (default: proxy.yaml)")


def run(args: argparse.Namespace) -> int:
    if args.policy_command == "push":
        return push(args.dir, args.config)
    from proxy.policy import cli

    return cli.run(args)


def push(directory: str, config_path: str) -> int:
    from sqlcipher3 import dbapi2 as sqlite

    from ownership import store as st
    from ownership.facts import EMPTY, MemoryFacts
    from ownership.service import open_store
    from proxy.policy.engine import CompiledPolicies
    from proxy.policy.language import load_dir

    config = load_config(config_path)
    try:
        src = load_dir(directory)
        facts = MemoryFacts()
        facts.load(EMPTY)
        CompiledPolicies(src, facts, admin_role=config.ownership.admin_role,
                         cache_max_bytes=config.policies.cache_max_bytes)
    except PolicyError as exc:
        raise CommandError(f"{exc} (nothing pushed)") from None
    if config.policies.source != "store":
        print(f"keygate: warning: {config_path}: policies.source is {config.policies.source}: the gateways read "
              "policies.dir, not the store, until it is store", file=sys.stderr)
    try:
        store = open_store(config, store_key(config))
    except st.StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        current = store.policy_set()
        if current is not None and current[1] == src.digest and current[2] == src.texts:
            print(f"unchanged: version {current[0]} already holds these {len(src.files)} files, hash {src.digest}")
            return 0
        version = store.put_policy_set(src.texts, src.digest, time.time())
    except (st.StoreError, st.StoreUnavailable, sqlite.Error) as exc:
        raise CommandError(f"store: {exc} (nothing pushed)") from None
    finally:
        store.close()
    print(f"pushed version {version}: {len(src.rules)} rules in {len(src.files)} files, hash {src.digest}")
    return 0
