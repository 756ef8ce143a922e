"""The metrics listener: /metrics, /healthz, /readyz on a real socket."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.metrics import add_readiness_check, remove_readiness_check
from proxy.metrics_server import MetricsServer


@pytest.fixture
async def metrics_url():
    server = MetricsServer()
    await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        yield session, f"http://127.0.0.1:{server.port}"
    await server.stop()


@pytest.fixture(autouse=True)
def only_our_checks(monkeypatch):
    # Readiness is process-wide: other tests' checks must not leak into these answers.
    import proxy.metrics

    monkeypatch.setattr(proxy.metrics, "_readiness", {})


@pytest.fixture
def check():
    state = {"ok": True}
    add_readiness_check("test-part", lambda: (state["ok"], "detail here"))
    yield state
    remove_readiness_check("test-part")


async def test_metrics_are_prometheus_text(metrics_url):
    from proxy.identity import tokens  # noqa: F401  (declares keygate_token_validations_total)

    session, url = metrics_url
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        body = await resp.text()
    assert "# TYPE keygate_token_validations_total counter" in body


async def test_healthz(metrics_url):
    session, url = metrics_url
    async with session.get(f"{url}/healthz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ok"}


async def test_readyz_follows_the_checks(metrics_url, check):
    session, url = metrics_url
    async with session.get(f"{url}/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "ready"
        assert body["checks"]["test-part"] == "ok: detail here"
    check["ok"] = False
    async with session.get(f"{url}/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503 and body["status"] == "not ready"
        assert body["checks"]["test-part"] == "not ready: detail here"


async def test_a_crashing_check_reports_instead_of_crashing(metrics_url):
    def broken():
        raise RuntimeError("boom")

    add_readiness_check("broken", broken)
    try:
        session, url = metrics_url
        async with session.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["broken"] == "not ready: check failed: boom"
    finally:
        remove_readiness_check("broken")


async def test_unknown_path_is_404(metrics_url):
    session, url = metrics_url
    async with session.get(f"{url}/admin") as resp:
        assert resp.status == 404


async def test_port_in_use_raises_and_cleans_up(metrics_url):
    _, url = metrics_url
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        await MetricsServer().start("127.0.0.1", port)
