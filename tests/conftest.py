"""Shared fixtures. Each rig module owns one real part the tests start."""

pytest_plugins = [
    "tests.rig.mosquitto",
    "tests.rig.oidc",
    "tests.rig.token_factory",
    "tests.rig.ownership",
    "tests.rig.gateway",
    "tests.rig.postgres",
]
