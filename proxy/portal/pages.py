"""The portal's pages. Each does what the ownership API says, through :mod:`proxy.portal.api_client`.

Answers are HTML for a person: the API's refusals are shown as sentences on
the page they came from, never as JSON or a traceback. Keys appear once, on
the page that answers the registration or rotation (sent ``no-store``), and
in no other page.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from ownership.validation import is_device_id
from proxy.portal.api_client import ApiAnswer
from proxy.portal.auth import access_token, require_form, require_session, session_of
from proxy.portal.live import LiveError, LiveRefused, Reading
from proxy.portal.sessions import Session
from proxy.portal.state import PORTAL, Portal

HTTP_MESSAGES = {400: "That request was not understood.", 403: "That was refused: the form had expired or "
                 "came from another site. Go back, reload the page and try again.",
                 404: "There is no such page here.", 405: "That page cannot be used like that."}

# API codes whose message is written for programs: what a person reads instead.
FRIENDLY = {
    "conflict": "This device id is taken. Choose another id.",
    "quota_exceeded": "You have registered as many devices as you may.",
    "unknown_user": "There is no user by that name (they must have signed in to keygate once).",
    "orion_unreachable": "The data service cannot be reached right now; nothing was changed. Try again shortly.",
    "enrollment_unavailable": "Certificates cannot be issued by this gateway (no device CA is configured).",
    "issuer_unreachable": "The sign-in service cannot be reached right now. Try again shortly.",
    "tenant_not_allowed": "You may not register devices in that tenant.",
}


def _portal(request: web.Request) -> Portal:
    return request.app[PORTAL]


def _q(device_id: str) -> str:
    return quote(device_id, safe="")


def problem(answer: ApiAnswer) -> str:
    if answer.status >= 500 and answer.error_code not in FRIENDLY:
        return "Something went wrong on our side; nothing may have been changed. Please try again."
    message = FRIENDLY.get(answer.error_code) or answer.error_message or "That was refused."
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


def when(value: Any) -> str:
    """An ISO time (or a timestamp) as a person reads it, in UTC."""
    if value is None or value == "":
        return "never"
    try:
        moment = (dt.datetime.fromtimestamp(value, dt.UTC) if isinstance(value, int | float)
                  else dt.datetime.fromisoformat(str(value)))
    except (ValueError, OverflowError, OSError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    session = session_of(request)
    notices = session.take_notices() if session is not None else []
    ctx = {"session": session, "user": session.username if session and session.signed_in else "",
           "csrf": session.csrf if session else "", "notices": notices, "when": when, "q": _q, **context}
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


def error_page(request: web.Request, status: int, message: str, *, sign_in: bool = False) -> web.Response:
    return render(request, "error.html", {"title": "Something is not right", "message": message,
                                          "sign_in": sign_in}, status=status)


async def _api(request: web.Request, session: Session, method: str, path: str, **kw: Any) -> ApiAnswer:
    token = await access_token(request, session)
    answer = await _portal(request).api.call(token, method, path, **kw)
    if answer.status == 401:   # the provider ended the session (token revoked): sign in again
        _portal(request).sessions.end(session)
        raise web.HTTPFound(f"{_portal(request).base}login")
    return answer


def _see(request: web.Request, where: str) -> web.HTTPFound:
    return web.HTTPFound(f"{_portal(request).base}{where}")


# --------------------------------------------------------------------------- pages


async def home(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    if session is not None and session.signed_in:
        raise _see(request, "devices")
    return render(request, "home.html", {"title": "My devices"})


def _status(request: web.Request, device_id: str) -> dict[str, Any]:
    getter = _portal(request).presence
    presence = getter() if getter is not None else None
    if presence is None:
        return {"connected": False, "last_seen": None, "known": False}
    return {"connected": presence.connected(device_id), "last_seen": presence.last_seen(device_id), "known": True}


async def devices(request: web.Request, form: dict[str, str] | None = None, error: str = "",
                  status: int = 200) -> web.Response:
    session = require_session(request)
    answer = await _api(request, session, "GET", "/devices")
    rows = answer.body.get("devices", []) if answer.ok and isinstance(answer.body, dict) else []
    listed = [{**d, "status": _status(request, d["id"])} for d in rows]
    return render(request, "devices.html", {"title": "My devices", "devices": listed, "form": form or {},
                                            "error": error or ("" if answer.ok else problem(answer))},
                  status=status)


def _device_fields(fields: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"id": fields.get("id", "").strip(), "type": fields.get("type", "").strip()}
    for name in ("name", "model"):
        if fields.get(name, "").strip():
            body[name] = fields[name].strip()
    lat, lon = fields.get("latitude", "").strip(), fields.get("longitude", "").strip()
    if lat or lon:
        try:
            body["location"] = {"type": "Point", "coordinates": [float(lon), float(lat)]}
        except ValueError:
            body["location"] = "invalid"
    return body


async def register(request: web.Request) -> web.StreamResponse:
    session, fields = await require_form(request)
    body = _device_fields(fields)
    if not body["id"] or not body["type"]:
        return await devices(request, fields, "A device needs an id and a type.", 400)
    if body.get("location") == "invalid":
        return await devices(request, fields, "Latitude and longitude must be numbers, e.g. 43.77 and 11.25.", 400)
    answer = await _api(request, session, "POST", "/devices", body=body)
    if not answer.ok:
        return await devices(request, fields, problem(answer), answer.status if answer.status < 500 else 503)
    return _keys_page(request, answer.body, "registered")


def _keys_page(request: web.Request, device: dict[str, Any], what: str, slot: str = "") -> web.Response:
    """The one page that shows keys: never cached, never shown again."""
    config = _portal(request).services.config
    mqtt = str(device.get("mqtt") or config.ownership.advertise_mqtt)
    http = str(device.get("http") or config.ownership.advertise_http)
    response = render(request, "keys.html", {"title": "Device keys", "device": device, "what": what, "slot": slot,
                                             "mqtt": _hostport(mqtt), "http": http.rstrip("/")})
    response.headers["Cache-Control"] = "no-store"
    return response


def _hostport(url: str) -> dict[str, Any]:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    tls = url.startswith(("mqtts", "wss", "https"))
    return {"host": host or rest, "port": port if port.isdigit() else ("8883" if tls else "1883"), "tls": tls}


async def _device_or_404(request: web.Request, session: Session) -> dict[str, Any]:
    answer = await _api(request, session, "GET", f"/devices/{_q(request.match_info['id'])}")
    if answer.status == 404:
        raise web.HTTPNotFound()
    if not answer.ok:
        raise web.HTTPServiceUnavailable()
    return dict(answer.body)


async def device(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    session = require_session(request)
    record = await _device_or_404(request, session)
    path = f"/devices/{_q(record['id'])}"
    delegations = await _api(request, session, "GET", f"{path}/delegations")
    certificates = await _api(request, session, "GET", f"{path}/certificate")
    return render(request, "device.html", {
        "title": record["id"], "device": record, "status": _status(request, record["id"]), "error": error,
        "delegations": delegations.body.get("delegations", []) if delegations.ok else [],
        "certificates": certificates.body.get("certificates", []) if certificates.ok else [],
        "live_url": f"{_portal(request).base}devices/{_q(record['id'])}/live"}, status=status)


async def rotate_confirm(request: web.Request) -> web.Response:
    session = require_session(request)
    record = await _device_or_404(request, session)
    slot = request.match_info["slot"]
    if slot not in ("k1", "k2"):
        raise web.HTTPNotFound()
    return render(request, "rotate.html", {"title": f"Rotate {slot.upper()}", "device": record, "slot": slot})


async def rotate(request: web.Request) -> web.StreamResponse:
    session, _ = await require_form(request)
    slot = request.match_info["slot"]
    if slot not in ("k1", "k2"):
        raise web.HTTPNotFound()
    device_id = request.match_info["id"]
    answer = await _api(request, session, "POST", f"/devices/{_q(device_id)}/keys/{slot}")
    if answer.status == 404:
        raise web.HTTPNotFound()
    if not answer.ok:
        return await device(request, problem(answer), 503)
    record = await _device_or_404(request, session)
    return _keys_page(request, {**record, slot: answer.body["key"]}, "rotated", slot)


async def delete_confirm(request: web.Request) -> web.Response:
    session = require_session(request)
    record = await _device_or_404(request, session)
    return render(request, "delete.html", {"title": f"Delete {record['id']}", "device": record})


async def delete(request: web.Request) -> web.StreamResponse:
    session, fields = await require_form(request)
    device_id = request.match_info["id"]
    if fields.get("confirm") != device_id:
        record = await _device_or_404(request, session)
        return render(request, "delete.html", {"title": f"Delete {device_id}", "device": record,
                                               "error": "Type the device id to confirm."}, status=400)
    answer = await _api(request, session, "DELETE", f"/devices/{_q(device_id)}")
    if answer.status == 404:
        raise web.HTTPNotFound()
    if not answer.ok:
        return await device(request, problem(answer), 503)
    session.notify("ok", f"Device {device_id} was deleted.")
    raise _see(request, "devices")


def _grantee(fields: dict[str, str]) -> Any:
    kind, name = fields.get("kind", "user"), fields.get("name", "").strip()
    if kind == "public":
        return "anonymous"
    if kind == "group":
        return {"group": name}
    return name


async def grant(request: web.Request) -> web.StreamResponse:
    session, fields = await require_form(request)
    device_id = request.match_info["id"]
    body: dict[str, Any] = {"to": _grantee(fields), "permission": fields.get("permission", "read")}
    if fields.get("kind") != "public" and not fields.get("name", "").strip():
        return await device(request, "Name the user or group to share with.", 400)
    if fields.get("expires", "").strip():
        try:
            moment = dt.datetime.fromisoformat(fields["expires"].strip())
        except ValueError:
            return await device(request, "The expiry must be a date and time.", 400)
        body["expires_at"] = (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).isoformat()
    answer = await _api(request, session, "POST", f"/devices/{_q(device_id)}/delegations", body=body)
    if answer.status == 404 and answer.error_code == "not_found":
        raise web.HTTPNotFound()
    if not answer.ok:
        return await device(request, problem(answer), answer.status if answer.status < 500 else 503)
    session.notify("ok", "Shared.")
    raise _see(request, f"devices/{_q(device_id)}")


async def revoke(request: web.Request) -> web.StreamResponse:
    session, _ = await require_form(request)
    device_id = request.match_info["id"]
    answer = await _api(request, session, "DELETE",
                        f"/devices/{_q(device_id)}/delegations/{_q(request.match_info['delegation'])}")
    if answer.status == 404:
        raise web.HTTPNotFound()
    if not answer.ok:
        return await device(request, problem(answer), 503)
    session.notify("ok", "Sharing withdrawn.")
    raise _see(request, f"devices/{_q(device_id)}")


async def certificate(request: web.Request) -> web.StreamResponse:
    session, fields = await require_form(request)
    device_id = request.match_info["id"]
    csr = fields.get("csr", "").strip()
    if not csr:
        return await device(request, "Paste a certificate signing request (PEM).", 400)
    answer = await _api(request, session, "POST", f"/devices/{_q(device_id)}/certificate", body={"csr": csr})
    if answer.status == 404 and answer.error_code == "not_found":
        raise web.HTTPNotFound()
    if not answer.ok:
        return await device(request, problem(answer), answer.status if answer.status < 500 else 503)
    record = await _device_or_404(request, session)
    return render(request, "certificate.html", {"title": "Certificate", "device": record, "issued": answer.body})


async def _shared_rows(request: web.Request, session: Session) -> list[dict[str, Any]]:
    answer = await _api(request, session, "GET", "/devices", query={"include": "delegated"})
    rows = answer.body.get("devices", []) if answer.ok and isinstance(answer.body, dict) else []
    return [d for d in rows if d.get("relation") == "delegate"]


async def shared(request: web.Request) -> web.Response:
    session = require_session(request)
    return render(request, "shared.html", {"title": "Shared with me", "devices": await _shared_rows(request, session)})


async def shared_list(request: web.Request) -> web.Response:
    """The list alone, for the page's script to refresh it (a withdrawn share disappears without a reload)."""
    session = session_of(request)
    if session is None or not session.signed_in:
        raise web.HTTPUnauthorized()
    return render(request, "shared_list.html", {"devices": await _shared_rows(request, session)})


async def shared_device(request: web.Request) -> web.Response:
    session = require_session(request)
    device_id = request.match_info["id"]
    record = next((d for d in await _shared_rows(request, session) if d["id"] == device_id), None)
    if record is None:
        raise web.HTTPNotFound()
    return render(request, "shared_device.html", {
        "title": device_id, "device": record, "live_url": f"{_portal(request).base}shared/{_q(device_id)}/live",
        "can_write": any("write" in p for p in record.get("permissions", []))})


# A command's name is one topic level (devices/ID/cmd/NAME); its payload a short text.
COMMAND_NAME_MAX = 64
COMMAND_PAYLOAD_MAX = 4096


def _command_problem(name: str, payload: str) -> str | None:
    if not name or len(name) > COMMAND_NAME_MAX or any(c in name for c in "/+#") or \
            not all(33 <= ord(c) <= 126 for c in name):
        return f"A command name is 1 to {COMMAND_NAME_MAX} letters, digits or signs, without spaces, / + or #."
    if len(payload.encode()) > COMMAND_PAYLOAD_MAX:
        return f"A command may hold at most {COMMAND_PAYLOAD_MAX} bytes."
    return None


async def command(request: web.Request) -> web.StreamResponse:
    """A write delegate (or the owner) sends the device a command: published as the person through
    the gateway's MQTT listener, which decides it (the portal checks only the form)."""
    session, fields = await require_form(request)
    device_id = request.match_info["id"]
    if not is_device_id(device_id, new=False) or "+" in device_id:
        raise web.HTTPNotFound()
    record = next((d for d in await _shared_rows(request, session) if d["id"] == device_id), None)
    if record is None:
        raise web.HTTPNotFound()
    name, payload = fields.get("name", "").strip(), fields.get("payload", "")
    problem_text = _command_problem(name, payload)
    if problem_text is None:
        try:
            await _portal(request).live.send_command(await access_token(request, session), device_id, name,
                                                     payload.encode())
        except LiveRefused as exc:
            problem_text = f"Not sent: {exc}."
        except LiveError as exc:
            problem_text = f"Not sent: {exc}. Try again."
    if problem_text is not None:
        session.notify("error", problem_text)
    else:
        session.notify("ok", f"Command {name} sent.")
    raise _see(request, f"shared/{_q(device_id)}")


# A comment line this often: a browser that went away is noticed (the write fails) and its feed closed.
HEARTBEAT_SECONDS = 15.0
# Live views one signed-in browser may hold open at once (each is an MQTT connection of the person).
LIVE_STREAMS_PER_SESSION = 4


async def live(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the device's telemetry, as the gateway delivers it to this person."""
    session = session_of(request)
    if session is None or not session.signed_in:
        raise web.HTTPUnauthorized()
    portal = _portal(request)
    device_id = request.match_info["id"]
    if not is_device_id(device_id, new=False) or "+" in device_id:
        # Before anything is subscribed: the id goes into a topic filter, where + would be a wildcard.
        raise web.HTTPNotFound()
    if session.live_streams >= LIVE_STREAMS_PER_SESSION:
        # Each stream is an MQTT connection of the person's: a page left open in many tabs, or a
        # script, gets a few, not the per-identity connection limit's worth.
        raise web.HTTPTooManyRequests()
    try:
        token = await access_token(request, session)
    except web.HTTPFound:
        raise web.HTTPUnauthorized() from None   # an event stream does not follow a sign-in
    session.live_streams += 1
    try:
        return await _stream(request, portal, token, device_id)
    finally:
        session.live_streams -= 1


async def _stream(request: web.Request, portal: Portal, token: str, device_id: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", **portal.headers})
    await response.prepare(request)
    await response.write(b"retry: 3000\nevent: ready\ndata: {}\n\n")
    readings: asyncio.Queue[Reading | LiveError] = asyncio.Queue(maxsize=100)

    async def pump() -> None:
        try:
            async for reading in portal.live.readings(token, device_id):
                if readings.full():
                    readings.get_nowait()   # a slow browser gets the latest readings, not all
                readings.put_nowait(reading)
        except LiveError as exc:
            readings.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(readings.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.write(b": heartbeat\n\n")
                continue
            if isinstance(item, LiveRefused):
                await response.write(f"event: ended\ndata: {json.dumps(str(item))}\n\n".encode())
                break
            if isinstance(item, LiveError):
                break   # the connection ended (a token expired, the gateway restarted): the browser reconnects
            data = json.dumps({"topic": item.topic, "payload": item.payload, "at": when(time_now(portal))})
            await response.write(f"event: reading\ndata: {data}\n\n".encode())
    except (ConnectionResetError, OSError):
        pass   # the browser went away
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return response


def time_now(portal: Portal) -> float:
    return portal.services.ownership.now()


async def data(request: web.Request) -> web.Response:
    require_session(request)
    return render(request, "data.html", {"title": "My personal data"})


async def export(request: web.Request) -> web.StreamResponse:
    session = require_session(request)
    answer = await _api(request, session, "GET", "/me/data")
    if not answer.ok:
        return render(request, "data.html", {"title": "My personal data", "error": problem(answer)}, status=503)
    return web.Response(body=answer.raw, content_type="application/json", headers={
        "Content-Disposition": answer.headers.get("Content-Disposition", 'attachment; filename="keygate-data.json"'),
        "Cache-Control": "no-store"})


async def erase(request: web.Request) -> web.StreamResponse:
    session, fields = await require_form(request)
    if fields.get("confirm", "").strip().lower() != "erase my data":
        return render(request, "data.html", {"title": "My personal data",
                                             "error": 'Type "erase my data" to confirm.'}, status=400)
    answer = await _api(request, session, "DELETE", "/me/data")
    if not answer.ok:
        return render(request, "data.html", {"title": "My personal data", "error": problem(answer)}, status=503)
    counts = answer.body.get("erased", {}) if isinstance(answer.body, dict) else {}
    return render(request, "data.html", {"title": "My personal data", "erased": counts})
