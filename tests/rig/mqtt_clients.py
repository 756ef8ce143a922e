"""Three real MQTT clients for the gateway tests, behind small async helpers.

* :class:`Paho` — paho-mqtt 2.x in its own network thread; exposes the reason
  codes a test asserts on (CONNACK, SUBACK, PUBACK/PUBREC, DISCONNECT).
* :func:`gmqtt_client` — gmqtt, native asyncio.
* :func:`mosquitto_pub` / :func:`mosquitto_sub` — the Mosquitto command-line clients.
* :class:`RawClient` — a TLS socket writing hand-made bytes, for the attacks
  no well-behaved client would send.
"""

from __future__ import annotations

import asyncio
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

V311, V5 = 4, 5


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Paho:
    """A paho client whose events land in thread-safe queues and fields."""

    def __init__(self, rig, client_id: str, *, version: int = V5, username: str | None = None,
                 password: str | None = None, cert=None, will: tuple[str, bytes, int, bool] | None = None,
                 clean: bool = True, port: int | None = None, properties: Properties | None = None,
                 transport: str = "tcp"):
        self.rig = rig
        proto = paho.MQTTv5 if version == V5 else paho.MQTTv311
        kw: dict[str, Any] = {"client_id": client_id, "protocol": proto, "transport": transport}
        if version != V5:
            kw["clean_session"] = clean
        self.c = paho.Client(CallbackAPIVersion.VERSION2, **kw)
        self.version = version
        self.clean = clean
        self.connect_properties = properties
        if username is not None or password is not None:
            self.c.username_pw_set(username, password)
        ctx = rig.client_ssl(cert)
        if ctx is not None:
            self.c.tls_set_context(ctx)
        if will is not None:
            self.c.will_set(*will)
        self.port = port or rig.port
        self.connack = threading.Event()
        self.connect_rc: Any = None
        self.session_present: bool | None = None  # the CONNACK's flag
        self.disconnected = threading.Event()
        self.disconnect_rc: Any = None
        self.messages: queue.Queue[Message] = queue.Queue()
        self.subacks: dict[int, list] = {}
        self.pubacks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish

    # -- callbacks (paho's thread)
    def _on_connect(self, c, u, flags, rc, props):
        self.connect_rc = rc
        self.session_present = bool(flags.session_present)
        self.connack.set()

    def _on_disconnect(self, c, u, flags, rc, props):
        self.disconnect_rc = rc
        self.disconnected.set()
        self.connack.set()

    def _on_message(self, c, u, msg):
        self.messages.put(Message(msg.topic, msg.payload, msg.qos, bool(msg.retain)))

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self._acked:
            self.subacks[mid] = [int(r.value) if hasattr(r, "value") else int(r) for r in rcs]
            self._acked.notify_all()

    def _on_publish(self, c, u, mid, rc, props):
        with self._acked:
            self.pubacks[mid] = int(rc.value) if hasattr(rc, "value") else int(rc)
            self._acked.notify_all()

    # -- blocking helpers, run in a thread by the async wrappers
    def _wait(self, table: dict, mid: int, timeout: float):
        with self._acked:
            if not self._acked.wait_for(lambda: mid in table, timeout):
                raise TimeoutError(f"no acknowledgement for message id {mid}")
            return table.pop(mid)

    async def connect(self, timeout: float = 5.0) -> int:
        """Connects; the CONNACK reason code (0 = accepted; v3 codes for 3.1.1)."""
        def run():
            kw = {"clean_start": True, "properties": self.connect_properties} if self.version == V5 else {}
            self.c.connect(self.rig.host, self.port, keepalive=30, **kw)
            self.c.loop_start()
            if not self.connack.wait(timeout):
                raise TimeoutError("no CONNACK")
            rc = self.connect_rc
            if rc is None:
                return -1  # the gateway closed without a CONNACK
            return int(rc.value) if hasattr(rc, "value") else int(rc)
        return await asyncio.to_thread(run)

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        def run():
            rc, mid = self.c.subscribe(topic, qos)
            assert rc == paho.MQTT_ERR_SUCCESS, rc
            return self._wait(self.subacks, mid, timeout)
        return await asyncio.to_thread(run)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      timeout: float = 5.0) -> int | None:
        """Publishes; for QoS 1/2 the PUBACK/PUBREC reason code (v5) once acknowledged."""
        def run():
            info = self.c.publish(topic, payload, qos=qos, retain=retain)
            if qos == 0:
                return None
            return self._wait(self.pubacks, info.mid, timeout)
        return await asyncio.to_thread(run)

    async def receive(self, timeout: float = 3.0) -> Message:
        return await asyncio.to_thread(self.messages.get, True, timeout)

    async def received_before(self, sentinel: bytes, timeout: float = 5.0) -> list[Message]:
        """Every message that arrives before the one whose payload is ``sentinel``.

        Publish the sentinel after whatever must not arrive, on a topic this client may read,
        once the broker has acknowledged what went before it: the broker queues a QoS 1/2
        message to its subscribers before it acknowledges it, and keeps one subscriber's
        deliveries in order, so when the sentinel is here whatever was published before it
        would be too. No wait on the clock decides the test (``timeout`` only bounds a failure)."""
        out: list[Message] = []
        while True:
            try:
                m = await self.receive(timeout)
            except queue.Empty:
                raise AssertionError(f"the sentinel {sentinel!r} did not arrive within {timeout} s; "
                                     f"before it: {out}") from None
            if m.payload == sentinel:
                return out
            out.append(m)

    async def received_within(self, seconds: float) -> list[Message]:
        await asyncio.sleep(seconds)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    async def wait_disconnected(self, timeout: float = 5.0) -> Any:
        ok = await asyncio.to_thread(self.disconnected.wait, timeout)
        if not ok:
            raise TimeoutError("still connected")
        rc = self.disconnect_rc
        return int(rc.value) if hasattr(rc, "value") else rc

    def is_connected(self) -> bool:
        return self.c.is_connected()

    async def close(self) -> None:
        def run():
            try:
                self.c.disconnect()
            finally:
                self.c.loop_stop()
        await asyncio.to_thread(run)


# --------------------------------------------------------------------------- gmqtt


async def gmqtt_client(rig, client_id: str, *, username: str | None, password: str | None, version: int = V5,
                       cert=None, clean: bool = True):
    """A connected gmqtt client; ``client.received`` is an asyncio.Queue of Message,
    ``client.subacks`` one of the SUBACKs it got."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50, MQTTv311

    client = gmqtt.Client(client_id, clean_session=clean)
    client.set_config({"reconnect_retries": 0, "reconnect_delay": 1})
    if username is not None:
        client.set_auth_credentials(username, password)
    client.received = asyncio.Queue()

    def on_message(c, topic, payload, qos, properties):
        client.received.put_nowait(Message(topic, payload, qos, bool(properties.get("retain", 0))))
        return 0

    client.on_message = on_message
    client.subacks = asyncio.Queue()  # (mid, granted QoS) per SUBACK: wait for it, not a while

    def on_subscribe(c, mid, qos, properties):
        client.subacks.put_nowait((mid, qos))

    client.on_subscribe = on_subscribe
    await client.connect(rig.host, rig.port, ssl=rig.client_ssl(cert) or False,
                         version=MQTTv50 if version == V5 else MQTTv311, keepalive=30)
    return client


# --------------------------------------------------------------------------- command-line clients


def _cli_args(rig, *, username: str | None, password: str | None, client_id: str | None, version: int,
              cert=None, port: int | None = None) -> list[str]:
    args = ["-h", rig.host, "-p", str(port or rig.port), "-V", "mqttv5" if version == V5 else "mqttv311"]
    if rig.tls:
        args += ["--cafile", str(rig.pki.ca)]
    if cert is not None:
        args += ["--cert", str(cert[0]), "--key", str(cert[1])]
    if username is not None:
        args += ["-u", username]
    if password is not None:
        args += ["-P", password]
    if client_id is not None:
        args += ["-i", client_id]
    return args


async def mosquitto_pub(rig, topic: str, message: str, *, qos: int = 1, retain: bool = False,
                        username: str | None = None, password: str | None = None, client_id: str | None = None,
                        version: int = V5, cert=None, timeout: float = 10.0) -> tuple[int, str]:
    """Runs mosquitto_pub; (exit status, stderr)."""
    args = ["mosquitto_pub", *_cli_args(rig, username=username, password=password, client_id=client_id,
                                         version=version, cert=cert),
            "-t", topic, "-m", message, "-q", str(qos)] + (["-r"] if retain else [])
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None  # communicate() waits for the exit
    return proc.returncode, err.decode(errors="replace")


class MosquittoSub:
    """A running mosquitto_sub printing ``topic payload`` lines."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[str] = []

    async def line(self, timeout: float = 5.0) -> str:
        assert self.proc.stdout is not None and self.proc.stderr is not None  # started with pipes
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise EOFError((await self.proc.stderr.read()).decode(errors="replace"))
        return raw.decode().rstrip("\n")

    async def lines_within(self, seconds: float) -> list[str]:
        out = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(await self.line(left))
            except (TimeoutError, EOFError):
                break
        return out

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def mosquitto_sub(rig, topic: str, *, qos: int = 1, username: str | None = None, password: str | None = None,
                        client_id: str | None = None, version: int = V5, cert=None) -> MosquittoSub:
    """Starts mosquitto_sub and returns once it is subscribed (it prints nothing before a message, so the
    subscription is confirmed through its debug output)."""
    # stdbuf: line-buffered stdout, so the SUBACK trace and each message arrive as they happen.
    args = ["stdbuf", "-oL", "mosquitto_sub", *_cli_args(rig, username=username, password=password, client_id=client_id,
                                         version=version, cert=cert),
            "-t", topic, "-q", str(qos), "-v", "-d"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    sub = MosquittoSub(proc)
    # -d prints protocol traces on stdout: wait for the SUBACK, then keep only message lines.
    try:
        while True:
            line = await sub.line(10.0)
            if "received SUBACK" in line:
                break
    except BaseException:
        await sub.stop()
        raise
    inner_line = sub.line

    async def message_line(timeout: float = 5.0) -> str:
        end = time.monotonic() + timeout
        while True:
            text = await inner_line(max(0.01, end - time.monotonic()))
            if not text.startswith("Client ") and not text.startswith("Subscribed"):
                return text

    sub.line = message_line  # type: ignore[method-assign]
    return sub


# --------------------------------------------------------------------------- raw bytes


class RawClient:
    """A TLS (or plain) connection for hand-written packets."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, rig, *, port: int | None = None, cert=None) -> RawClient:
        ctx = rig.client_ssl(cert)
        r, w = await asyncio.open_connection(rig.host, port or rig.port, ssl=ctx,
                                             server_hostname="localhost" if ctx else None)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self, timeout: float = 5.0) -> bytes | None:
        """One whole packet, or None when the gateway closed the connection."""
        try:
            first = await asyncio.wait_for(self.reader.readexactly(1), timeout)
            length, mult, header = 0, 1, bytearray(first)
            while True:
                b = (await asyncio.wait_for(self.reader.readexactly(1), timeout))[0]
                header.append(b)
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
            return bytes(header) + body
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None

    async def closed_within(self, timeout: float) -> bool:
        """True if the gateway closes (EOF) within ``timeout`` (anything it sends first is skipped)."""
        end = time.monotonic() + timeout
        try:
            while (left := end - time.monotonic()) > 0:
                data = await asyncio.wait_for(self.reader.read(65536), left)
                if not data:
                    return True
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
