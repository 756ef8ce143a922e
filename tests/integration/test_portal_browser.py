"""The "My devices" portal in a real browser (Debian's chromium, driven by Playwright) against
``keygate serve`` with the real test OIDC provider, a real Mosquitto and the NGSI stand-in.

Two long flows, so the browser starts once: alice and bob through every page (the issue's
"Done when" walk), and the security checks (CSRF, cookie flags, no token or key in any page
after the one-time display, bob kept out of alice's device pages). Screenshots of each page,
at desktop and phone widths, go to tests/artifacts/portal/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import playwright.sync_api as playwright_sync
import pytest

from proxy.portal.pages import LIVE_STREAMS_PER_SESSION
from tests.rig.oidc import OidcProvider, password_of
from tests.rig.pki import make_csr
from tests.rig.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts" / "portal"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 15000
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.")

# No skip: a missing browser must fail the run, not pass it quietly (scripts/setup --test installs it).
assert os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed: run scripts/setup --test"


class PortalStack:
    def __init__(self, workdir: Path, mosquitto):
        self.workdir = workdir
        self.http_port, self.mqtt_port, self.orion_port = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.http_port}/portal/"
        self.oidc = OidcProvider(workdir / "oidc-work", portal_url=self.base)
        (workdir / "oidc-work").mkdir()
        shutil.copytree(ROOT / "policies", workdir / "policies")
        self.mosquitto = mosquitto
        self.procs: list[subprocess.Popen] = []
        self.log = workdir / "keygate.log"

    def start(self) -> None:
        self.oidc.start()
        orion = subprocess.Popen([sys.executable, "-m", "tests.rig.ngsi_standin", "--port", str(self.orion_port)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(orion)
        wait_for_port(self.orion_port, proc=orion)
        subprocess.run([sys.executable, "-m", "proxy", "certs", "init", str(self.workdir / "certs")], check=True,
                       cwd=ROOT, capture_output=True)
        config = self.workdir / "proxy.yaml"
        config.write_text(self.oidc.config_yaml() + f"""
tls:
  client_ca: certs/devices-ca.crt
  client_ca_key: certs/devices-ca.key   # certificate enrollment (the device page's CSR upload)
mqtt:
  listen: 127.0.0.1:{self.mqtt_port}
  upstream: {self.mosquitto.address}
  tls: false
  max_connections: 200
http:
  listen: 127.0.0.1:{self.http_port}
  upstream: http://127.0.0.1:{self.orion_port}
  tls: false
  max_connections: 200
store:
  path: data/ownership.db
  key: ${{KEYGATE_STORE_KEY}}
ownership:
  advertise_mqtt: mqtt://127.0.0.1:{self.mqtt_port}
  advertise_http: http://127.0.0.1:{self.http_port}
policies:
  dir: policies/
audit:
  path: audit.log
""")
        env = {**os.environ, "KEYGATE_STORE_KEY": "portal-test-store-key"}
        with open(self.log, "wb") as log:   # the child keeps its own descriptor
            gateway = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(config)], cwd=ROOT,
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(gateway)
        for port in (self.http_port, self.mqtt_port):
            wait_for_port(port, proc=gateway, timeout=30)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.oidc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mosquitto):
    s = PortalStack(tmp_path_factory.mktemp("portal"), mosquitto)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with playwright_sync.sync_playwright() as p:
        # A persistent context needs a user-data-dir; plain contexts each get their own profile too.
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(autouse=True)
def keygate_log_on_failure(request, stack):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(stack.log.read_text(errors="replace")[-6000:])
        print(stack.oidc.log()[-3000:])


def shoot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def new_page(browser, stack):
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.base.rstrip("/").rsplit("/", 1)[0])
    context.set_default_timeout(TIMEOUT_MS)
    return context, context.new_page()


def sign_in(page, stack, user: str, shots: str = "") -> None:
    page.goto(stack.base)
    if shots:
        shoot(page, f"{shots}-home")
    page.get_by_role("link", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/interaction/.*"))
    if shots:
        shoot(page, f"{shots}-provider-login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password_of(user))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{stack.base}devices")


def test_portal_walk(stack, browser):
    """Log in as alice, register a device, copy K1, see its reading live, delegate read to bob, bob
    sees it under "shared with me" (not the keys), revoke (gone for bob without a reload), download
    alice's data, erase it, log out."""
    bob_ctx, bob = new_page(browser, stack)
    sign_in(bob, stack, "bob")   # keygate learns bob's name: delegations are by user name
    bob.goto(f"{stack.base}shared")
    bob.get_by_text("Nothing is shared with you.").wait_for()

    alice_ctx, alice = new_page(browser, stack)
    sign_in(alice, stack, "alice", shots="01")
    shoot(alice, "02-devices-empty")

    # Register: a refusal as a sentence first (an id Orion's rules refuse), then the real one.
    alice.get_by_label("Device id").fill("bad id with spaces")
    alice.get_by_label("Type").fill("Thermometer")
    alice.get_by_role("button", name="Register").click()
    error = alice.locator(".error").inner_text()
    assert "{" not in error and "Traceback" not in alice.content()
    shoot(alice, "03-register-error")
    alice.get_by_label("Device id").fill("thermo-portal-1")
    alice.get_by_label("Type").fill("Thermometer")
    alice.get_by_label("Name (optional)").fill("Kitchen")
    alice.get_by_role("button", name="Register").click()
    alice.get_by_text("Copy these keys now.").wait_for()
    k1 = alice.locator("#key-k1").inner_text()
    k2 = alice.locator("#key-k2").inner_text()
    assert len(k1) > 20 and len(k2) > 20
    assert f"-P '{k1}'" in alice.locator("#cmd-mqtt").inner_text()
    alice.get_by_role("button", name="Copy K1").click()
    copied = alice.evaluate("navigator.clipboard.readText()")
    assert copied == k1
    # The curl line, copied and run as shown: the device creates its entity with its key.
    alice.get_by_role("button", name="Copy the curl line").click()
    curl = shlex.split(alice.evaluate("navigator.clipboard.readText()"))
    answer = subprocess.run([*curl, "-s", "-o", "/dev/null", "-w", "%{http_code}"], capture_output=True, text=True,
                            timeout=20)
    assert answer.stdout == "201", answer
    alice.get_by_role("button", name="Copy the mosquitto_pub line").click()
    mosquitto_pub = shlex.split(alice.evaluate("navigator.clipboard.readText()"))
    assert mosquitto_pub[0] == "mosquitto_pub"
    shoot(alice, "04-keys-once")

    # Same id again: a sentence, not JSON.
    alice.goto(f"{stack.base}devices")
    alice.get_by_label("Device id").fill("thermo-portal-1")
    alice.get_by_label("Type").fill("Thermometer")
    alice.get_by_role("button", name="Register").click()
    assert "taken" in alice.locator(".error").inner_text()

    # The device page: live view, then a device connects with the copied K1 and publishes.
    alice.goto(f"{stack.base}devices/thermo-portal-1")
    alice.get_by_text("Connected: readings appear here").wait_for()
    subprocess.run([MOSQUITTO_PUB, *mosquitto_pub[1:], "-q", "1"], check=True, timeout=20)   # as copied
    alice.locator(".readings li").filter(has_text='{"temperature": 21.5}').wait_for()
    shoot(alice, "05-device-live")

    # Delegate read to bob.
    alice.get_by_label("Share with").select_option("user")
    alice.get_by_label("User or group name").fill("bob")
    alice.get_by_label("Permission").select_option("read")
    alice.get_by_role("button", name="Share").click()
    alice.get_by_text("Shared.").wait_for()
    assert "bob" in alice.locator(".delegations").inner_text()
    shoot(alice, "06-device-shared")

    # Bob's open page shows it without a reload, read only, without the keys.
    bob.locator("#shared").get_by_role("link", name="thermo-portal-1").wait_for()
    assert "read only" in bob.locator("#shared").inner_text()
    shoot(bob, "07-shared-with-bob")
    bob.get_by_role("link", name="thermo-portal-1").click()
    bob.get_by_text("Connected: readings appear here").wait_for()
    # Bob's live view gets the device's readings through his delegation (the gateway's delivery check).
    subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(stack.mqtt_port), "-i", "thermo-portal-1",
                    "-u", "thermo-portal-1", "-P", k2, "-t", "devices/thermo-portal-1/telemetry",
                    "-m", '{"temperature": 22.0}', "-q", "1"], check=True, timeout=20)
    bob.locator(".readings li").filter(has_text='{"temperature": 22.0}').wait_for()
    content = bob.content()
    assert k1 not in content and k2 not in content
    assert "Replace K1" not in content and "Delete this device" not in content   # read only: nothing to manage
    assert "Send a command" not in content   # a read delegate cannot command the device
    # ... and posting the form anyway, the gateway (not the page) refuses the publish.
    bob_csrf = bob.locator("input[name=csrf]").first.get_attribute("value")
    refused = bob.request.post(f"{stack.base}shared/thermo-portal-1/command",
                               form={"csrf": bob_csrf, "name": "setpoint", "payload": "1"})
    assert "Not sent: you may not send this device commands." in refused.text()
    shoot(bob, "08-shared-device")
    bob.goto(f"{stack.base}shared")

    # Alice withdraws it: gone from bob's page, no reload.
    alice.get_by_role("button", name="Withdraw").click()
    alice.get_by_text("Sharing withdrawn.").wait_for()
    bob.get_by_text("Nothing is shared with you.").wait_for()

    # Shared for writing, bob sends the device a command: published as bob through the gateway,
    # which the device (subscribed to its command topics with K2) receives.
    alice.goto(f"{stack.base}devices/thermo-portal-1")
    alice.get_by_label("Share with").select_option("user")
    alice.get_by_label("User or group name").fill("bob")
    alice.get_by_label("Permission").select_option("write")
    alice.get_by_role("button", name="Share").click()
    alice.get_by_text("Shared.").wait_for()
    device = subprocess.Popen(["stdbuf", "-oL", MOSQUITTO_SUB, "-d",
                               "-h", "127.0.0.1", "-p", str(stack.mqtt_port), "-i", "thermo-portal-1",
                               "-u", "thermo-portal-1", "-P", k2, "-t", "devices/thermo-portal-1/cmd/#",
                               "-q", "1", "-C", "1", "-v"], stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout is not None
        for line in device.stdout:   # subscribed (its SUBACK) before anything is sent
            if "SUBACK" in line:
                break
        bob.locator("#shared").get_by_role("link", name="thermo-portal-1").click()
        bob.get_by_label("Command name").fill("setpoint")
        bob.get_by_label("Payload").fill('{"target": 19}')
        bob.get_by_role("button", name="Send").click()
        bob.get_by_text("Command setpoint sent.").wait_for()
        received = [line for line in device.stdout if line.startswith("devices/")]
        assert received == ['devices/thermo-portal-1/cmd/setpoint {"target": 19}\n'], received
        assert device.wait(timeout=20) == 0
    finally:
        device.kill()
    # A name that is no topic level is refused in words, before anything is published.
    bob.get_by_label("Command name").fill("a/#")
    bob.get_by_role("button", name="Send").click()
    bob.get_by_text("A command name is 1 to").wait_for()
    alice.goto(f"{stack.base}devices/thermo-portal-1")
    alice.get_by_role("button", name="Withdraw").click()
    alice.get_by_text("Sharing withdrawn.").wait_for()

    # A certificate from a CSR pasted into the device page.
    alice.goto(f"{stack.base}devices/thermo-portal-1")
    _, csr = make_csr("thermo-portal-1")
    alice.get_by_label(re.compile("Certificate signing request")).fill(csr.decode())
    alice.get_by_role("button", name="Get a certificate").click()
    alice.get_by_text("-----BEGIN CERTIFICATE-----").wait_for()
    shoot(alice, "09-certificate")
    alice.get_by_role("link", name="Back to the device").click()
    assert "serial" in alice.locator("#cert-h + ul").inner_text()

    # Rotation and deletion confirmations say what they do; a rotation shows the new key once.
    alice.goto(f"{stack.base}devices/thermo-portal-1/rotate/k2")
    assert "disconnected" in alice.locator("main").inner_text()
    shoot(alice, "09-rotate-confirm")
    alice.get_by_role("button", name="Replace K2").click()
    alice.get_by_text("Copy this key now.").wait_for()
    new_k2 = alice.locator("#key-k2").inner_text()
    assert new_k2 != k2 and alice.locator("#key-k1").count() == 0
    alice.goto(f"{stack.base}devices/thermo-portal-1/delete")
    text = alice.locator("main").inner_text()
    assert "entity" in text and "retained" in text and "certificates" in text
    shoot(alice, "10-delete-confirm")

    # My personal data: download, then erase (typed confirmation).
    alice.goto(f"{stack.base}devices")
    row = alice.locator("table.devices").inner_text()
    assert "not connected" in row and "never" not in row   # seen when it published
    # Connected now: the device holds a connection (its SUBACK is the sentinel), the list says so.
    # stdbuf: mosquitto_sub's debug lines unbuffered into the pipe, so the SUBACK line arrives as it happens.
    holder = subprocess.Popen(["stdbuf", "-oL", MOSQUITTO_SUB, "-d", "-h", "127.0.0.1", "-p", str(stack.mqtt_port),
                               "-i", "thermo-portal-1", "-u", "thermo-portal-1", "-P", k1,
                               "-t", "devices/thermo-portal-1/cmd/#"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        for line in holder.stdout:
            if "SUBACK" in line:
                break
        else:
            raise AssertionError("the device's mosquitto_sub ended before its SUBACK")
        alice.goto(f"{stack.base}devices")
        assert "connected now" in alice.locator("table.devices").inner_text()
        shoot(alice, "11-devices-list")
    finally:
        holder.terminate()
        holder.wait(10)
    alice.get_by_role("link", name="My personal data").click()
    shoot(alice, "12-personal-data")
    with alice.expect_download() as download_info:
        alice.get_by_role("link", name="Download my data").click()
    exported = json.loads(Path(download_info.value.path()).read_text())
    assert [d["id"] for d in exported["devices"]] == ["thermo-portal-1"]
    assert k1 not in json.dumps(exported)
    alice.get_by_label("Type erase my data to confirm").fill("erase")
    alice.get_by_role("button", name="Erase my data").click()
    assert "erase my data" in alice.locator(".error").inner_text()
    alice.get_by_label("Type erase my data to confirm").fill("erase my data")
    alice.get_by_role("button", name="Erase my data").click()
    alice.get_by_text("Your data was erased").wait_for()
    shoot(alice, "13-erased")
    alice.goto(f"{stack.base}devices")
    alice.get_by_text("You have no devices yet.").wait_for()

    # Log out through the provider's end-session endpoint, back to the portal, signed out.
    alice.get_by_role("button", name="Sign out").click()
    alice.wait_for_url(re.compile(r".*/protocol/openid-connect/logout.*|.*/portal/$"))
    if not alice.url.startswith(stack.base):   # the provider asks to confirm (oidc-provider's own page)
        shoot(alice, "14-provider-logout")
        alice.get_by_role("button", name=re.compile("yes", re.IGNORECASE)).click()
    alice.wait_for_url(stack.base)
    alice.get_by_role("link", name="Sign in").wait_for()
    alice.goto(f"{stack.base}devices")
    alice.wait_for_url(re.compile(r".*/interaction/.*"))   # the session is gone: sign in again
    alice_ctx.close()
    bob_ctx.close()


async def live_streams_until_refused(url: str, cookie: str) -> int:
    """Open live views one after another, each held open (its ``ready`` read), until one is refused
    429; then close one and check a new one is let in again. The number held when refused."""
    import aiohttp

    async with aiohttp.ClientSession(headers={"Cookie": f"keygate_portal={cookie}"}) as http:
        held = []
        try:
            for _ in range(LIVE_STREAMS_PER_SESSION + 2):
                answer = await http.get(url, timeout=aiohttp.ClientTimeout(total=30))
                if answer.status == 429:
                    answer.release()
                    break
                assert answer.status == 200
                assert b"event: ready" in await answer.content.readuntil(b"\n\n")
                held.append(answer)
            count = len(held)
            held.pop().close()
            for _ in range(150):   # the server notices a closed stream at its next write (a heartbeat: 15 s)
                again = await http.get(url, timeout=aiohttp.ClientTimeout(total=30))
                if again.status == 200:
                    again.close()
                    return count
                again.release()
                await asyncio.sleep(0.2)
            raise AssertionError("a closed live view was never given back")
        finally:
            for answer in held:
                answer.close()


def test_portal_security(stack, browser):
    """CSRF refused, cookie flags, no token or key in any page after the one-time display, bob
    cannot reach alice's device pages by URL."""
    alice_ctx, alice = new_page(browser, stack)
    sign_in(alice, stack, "alice")
    cookie = next(c for c in alice_ctx.cookies() if c["name"] == "keygate_portal")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] in ("Lax", "Strict")
    assert cookie["path"] == "/portal/"
    assert alice.evaluate("document.cookie") == ""   # no script reads it

    # No session exists before the sign-in completes: starting one sets only the sealed sign-in
    # cookie (same flags), which is worth nothing as a session id, and is gone after the callback.
    pre_ctx, pre = new_page(browser, stack)
    pre.goto(f"{stack.base}login")
    pre.wait_for_url(re.compile(r".*/interaction/.*"))
    before = {c["name"]: c for c in pre_ctx.cookies()}
    assert "keygate_portal" not in before
    signin = before["keygate_portal_signin"]
    assert signin["httpOnly"] and signin["secure"] and signin["path"] == "/portal/"
    pre.get_by_label("User name").fill("carol")
    pre.get_by_label("Password").fill(password_of("carol"))
    pre.get_by_role("button", name="Sign in").click()
    pre.wait_for_url(f"{stack.base}devices")
    after = {c["name"]: c["value"] for c in pre_ctx.cookies()}
    assert "keygate_portal_signin" not in after and after["keygate_portal"] != signin["value"]
    fixated = pre_ctx.request.get(f"{stack.base}devices",
                                  headers={"Cookie": f"keygate_portal={signin['value']}"}, max_redirects=0)
    assert fixated.status == 302 and "/login" in fixated.headers["location"]
    pre_ctx.close()

    # Every page carries a strict CSP and no-store.
    answer = alice_ctx.request.get(f"{stack.base}devices")
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert answer.headers["cache-control"] == "no-store"

    # Register, keep the keys, then visit every other page: neither key nor any token appears.
    alice.get_by_label("Device id").fill("thermo-secure-1")
    alice.get_by_label("Type").fill("Thermometer")
    alice.get_by_role("button", name="Register").click()
    alice.get_by_text("Copy these keys now.").wait_for()
    k1, k2 = alice.locator("#key-k1").inner_text(), alice.locator("#key-k2").inner_text()
    assert not JWT.search(alice.content())
    pages = ["devices", "devices/thermo-secure-1", "devices/thermo-secure-1/rotate/k1",
             "devices/thermo-secure-1/delete", "shared", "shared/list", "data", ""]
    for path in pages:
        alice.goto(f"{stack.base}{path}")
        content = alice.content()
        assert k1 not in content and k2 not in content, path
        assert not JWT.search(content), path
    exported = alice_ctx.request.get(f"{stack.base}data/export").text()
    assert k1 not in exported and k2 not in exported and not JWT.search(exported)
    for c in alice_ctx.cookies():
        assert not JWT.search(c["value"])

    # A cross-site POST: from another origin, without the CSRF token (the cookie forced on it, as a
    # browser without SameSite would send it). Refused, nothing done.
    csrf = alice.locator("input[name=csrf]").first.get_attribute("value")
    session_cookie = next(c for c in alice_ctx.cookies() if c["name"] == "keygate_portal")["value"]
    for form in ({"confirm": "thermo-secure-1"}, {"confirm": "thermo-secure-1", "csrf": "forged"}):
        refused = alice_ctx.request.post(f"{stack.base}devices/thermo-secure-1/delete", form=form,
                                         headers={"Origin": "https://evil.example",
                                                  "Cookie": f"keygate_portal={session_cookie}"}, max_redirects=0)
        assert refused.status == 403
        assert "Traceback" not in refused.text() and "{" not in refused.text().split("<main", 1)[-1][:400]
    alice.goto(f"{stack.base}devices/thermo-secure-1")   # still there
    assert alice.locator("h1").inner_text() == "thermo-secure-1"
    # A real cross-site form post in the browser (an attacker's page): the Lax cookie stays home.
    evil = alice_ctx.new_page()
    evil.set_content(f'<form method="post" action="{stack.base}data/erase"><input name="confirm" value="erase my data">'
                     '</form><script>document.forms[0].submit()</script>')
    evil.wait_for_load_state()
    evil.wait_for_url(re.compile(r".*/portal/.*"))
    assert evil.get_by_text("Your data was erased").count() == 0
    alice.goto(f"{stack.base}devices/thermo-secure-1")
    assert alice.locator("h1").inner_text() == "thermo-secure-1"
    evil.close()
    assert csrf

    # Bob, signed in, cannot reach alice's device pages by URL: the same 404 as a device that does not exist.
    bob_ctx, bob = new_page(browser, stack)
    sign_in(bob, stack, "bob")
    for path in ("devices/thermo-secure-1", "devices/thermo-secure-1/rotate/k1", "devices/thermo-secure-1/delete",
                 "shared/thermo-secure-1"):
        answer = bob_ctx.request.get(f"{stack.base}{path}", max_redirects=0)
        assert answer.status == 404, path
        missing = bob_ctx.request.get(f"{stack.base}{path.replace('thermo-secure-1', 'no-such-device')}",
                                      max_redirects=0)
        assert missing.status == 404 and missing.text() == answer.text(), path
        assert "thermo-secure-1" not in answer.text()
    bob_csrf = bob.locator("input[name=csrf]").first.get_attribute("value")
    for path, form in (("devices/thermo-secure-1/rotate/k1", {}), ("devices/thermo-secure-1/delete",
                                                                    {"confirm": "thermo-secure-1"})):
        answer = bob_ctx.request.post(f"{stack.base}{path}", form={"csrf": bob_csrf, **form}, max_redirects=0)
        assert answer.status == 404, path
    bob.goto(f"{stack.base}devices/thermo-secure-1")
    shoot(bob, "15-bob-not-found")
    # Bob's live feed of alice's device: the MQTT listener refuses the subscription.
    stream = bob_ctx.request.get(f"{stack.base}devices/thermo-secure-1/live", timeout=TIMEOUT_MS)
    assert "event: ended" in stream.text() and "may not read" in stream.text()
    # A wildcard for an id is refused before anything is subscribed (it would be a filter there).
    for wild in ("%2B", "a%2Bb", "%23"):
        assert bob_ctx.request.get(f"{stack.base}devices/{wild}/live", max_redirects=0).status == 404, wild
    # Live views per signed-in browser are capped: each is an MQTT connection of the person's.
    bob.goto(f"{stack.base}devices")
    bob.get_by_label("Device id").fill("bob-live-1")
    bob.get_by_label("Type").fill("Thermometer")
    bob.get_by_role("button", name="Register").click()
    bob.get_by_text("Copy these keys now.").wait_for()
    bob_cookie = next(c["value"] for c in bob_ctx.cookies() if c["name"] == "keygate_portal")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:   # (Playwright's loop runs in this thread)
        held = pool.submit(asyncio.run, live_streams_until_refused(f"{stack.base}devices/bob-live-1/live",
                                                                   bob_cookie)).result()
    assert held == LIVE_STREAMS_PER_SESSION
    alice.goto(f"{stack.base}devices/thermo-secure-1")
    assert alice.locator("h1").inner_text() == "thermo-secure-1"   # bob's posts did nothing
    # Alice deletes it herself: the typed confirmation, then it is gone.
    alice.get_by_role("link", name="Delete this device").click()
    alice.get_by_label(re.compile("Type the device id")).fill("thermo-secure")
    alice.get_by_role("button", name="Delete the device").click()
    assert "Type the device id" in alice.locator(".error").inner_text()
    alice.get_by_label(re.compile("Type the device id")).fill("thermo-secure-1")
    alice.get_by_role("button", name="Delete the device").click()
    alice.get_by_text("Device thermo-secure-1 was deleted.").wait_for()
    assert alice_ctx.request.get(f"{stack.base}devices/thermo-secure-1", max_redirects=0).status == 404
    bob_ctx.close()
    alice_ctx.close()
