"""``keygate store rekey``: re-encrypt the ownership store under a new key.

The new key is read from the environment (``KEYGATE_NEW_STORE_KEY``) or a
file, never from the command line, where it would land in shell history and
in every process listing. Stop ``keygate serve`` first: the store has one
writer. Afterwards, point ``store.key`` / ``store.key_file`` at the new key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlcipher3 import dbapi2 as sqlite

from ownership import store as st
from proxy.config import Config, load_config, store_key
from proxy.errors import CommandError

if TYPE_CHECKING:
    from ownership.pg_store import PgStore

NEW_KEY_ENV = "KEYGATE_NEW_STORE_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    rekey = sub.add_parser("rekey", help="re-encrypt the store under a new key", allow_abbrev=False,
                           description=f"Re-encrypt the store under a new key, read from ${NEW_KEY_ENV} "
                                       "or --new-key-file (never from the command line).")
    rekey.add_argument("-c", "--config", default="proxy.yaml", help="configuration file (default: proxy.yaml)")
    rekey.add_argument("--new-key-file", help=f"file holding the new key (default: ${NEW_KEY_ENV})")
    rekey.add_argument("--finish", action="store_true",
                       help="postgres: once every gateway runs with the new key, make the old one open nothing")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "store_command", None) != "rekey":
        raise CommandError("store: expected a sub-command: rekey")
    return rekey(args.config, args.new_key_file, finish=args.finish)


def rekey(config_path: str, new_key_file: str | None, env: dict[str, str] | None = None, *,
          finish: bool = False) -> int:
    env = dict(os.environ) if env is None else env
    config = load_config(config_path, env=env)
    current = store_key(config)
    if config.store.backend == "postgres" and finish:
        return _finish_postgres(config, current)
    if new_key_file:
        try:
            new = Path(new_key_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CommandError(f"{new_key_file}: cannot read the new key: {exc.strerror}") from None
        source = new_key_file
    else:
        new = env.get(NEW_KEY_ENV, "")
        source = f"${NEW_KEY_ENV}"
    if not new:
        raise CommandError(f"no new key: set {NEW_KEY_ENV} or pass --new-key-file")
    if new == current:
        raise CommandError(f"the new key ({source}) is the current key")
    if config.store.backend == "postgres":
        return _rekey_postgres(config, current, new, source)
    path = config.resolve(config.store.path)
    if not path.exists():
        raise CommandError(f"store {config.store.path}: no such file")
    try:
        store = st.Store.open(path, current, label=config.store.path, busy_timeout=1.0)
    except st.StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        store.rekey(new)
    except sqlite.Error as exc:
        raise CommandError(f"store {config.store.path}: cannot rekey: {exc} (is keygate serve running?)") from None
    finally:
        store.close()
    print(f"store {config.store.path}: re-encrypted under the key from {source}; "
          "update store.key / store.key_file before the next start")
    return 0


def _open_postgres(config: Config, key: str) -> PgStore:
    from ownership.pg_store import PgStore

    try:
        return PgStore.open(config.store.dsn, key, label="postgres", pool_size=1)
    except st.StoreError as exc:
        raise CommandError(str(exc)) from None


def _rekey_postgres(config: Config, current: str, new: str, source: str) -> int:
    """With the gateways running: a new data key, every row re-sealed under it, the key ring moved to
    the new key (and still opening with the old one until --finish)."""
    import psycopg

    store = _open_postgres(config, current)
    try:
        moved = store.rekey(new)
    except psycopg.Error as exc:
        raise CommandError(f"store postgres: cannot rekey: {type(exc).__name__} (nothing half-done is lost: "
                           "run it again)") from None
    except st.StoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    print(f"store postgres: {moved} values re-sealed under a new data key; the key ring opens with the key "
          f"from {source} (and the old key until: keygate store rekey --finish, run with the new key as "
          "store.key once every gateway uses it)")
    return 0


def _finish_postgres(config: Config, current: str) -> int:
    store = _open_postgres(config, current)
    try:
        dropped = store.finish_rekey()
    finally:
        store.close()
    print(f"store postgres: {dropped} key ring(s) under other keys dropped; only store.key opens the store")
    return 0
