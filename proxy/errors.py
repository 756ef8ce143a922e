"""The one error type every command raises for the user, kept below everything that raises it.

The command modules (policy, store, certs, dev, keycloak, serve) sit in different layers; the
top-level CLI (:mod:`proxy.cli`) catches this and prints it as one line, ``keygate: <reason>``,
exit 1. Living here, it lets a lower layer report to the user without importing the CLI.
"""

from __future__ import annotations


class CommandError(Exception):
    """A failure to report as one line and exit 1."""
