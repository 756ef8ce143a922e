"""The ``keygate`` command line.

Each command lives in the module that owns its concern; this file only maps
names to modules and imports the one that runs, so ``keygate --help`` stays
fast and a command's dependencies load only when it is used. A command module
provides ``add_arguments(parser)`` and ``run(args) -> int``.

Errors meant for the user are raised as :class:`proxy.errors.CommandError` (or
``ConfigError``) and printed as one line, ``keygate: <reason>``, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from proxy import __version__
from proxy.errors import CommandError

# name -> (module, one-line help). Groups ("policy", "store", ...) take their own sub-commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("proxy.app", "run every configured listener (MQTT, HTTP gateway, ownership API, metrics)"),
    "check": ("proxy.check", "preflight: configuration, TLS, issuer, store, broker, Orion, policies, ports"),
    "dev": ("proxy.dev", "one-command local stack on throwaway keys (NOT for production)"),
    # proxy.policy.cli's check, test and explain, and push (which needs the store).
    "policy": ("ownership.policy_push", "check, test, explain and push YAML access policies"),
    "store": ("ownership.cli", "manage the encrypted ownership store (rekey)"),
    "certs": ("proxy.certs", "make development certificates (certs init DIR)"),
    "keycloak": ("proxy.keycloak_bootstrap", "create or update the realm in a running Keycloak"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keygate",
        description="Security gateway for IoT brokers (MQTT, NGSI-v2).",
    )
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from proxy.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv else 2
        return int(args._run(args) or 0)
    except (CommandError, ConfigError) as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
