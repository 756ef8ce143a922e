"""What the shell's pieces need of each other's sockets.

:class:`Transport` is the part of ``asyncio.Transport`` a :class:`~proxy.mqtt.connection.Connection`
uses of its client's socket: a plain socket's transport has it, and so do the TLS-on-MemoryBIO
side (:mod:`proxy.mqtt.sockets`) and the WebSocket transport (:mod:`proxy.mqtt.websocket`).
:class:`ClientReceiver` is what a client socket's protocol hands its plaintext and its events
to: the connection, or on the WebSocket listener the HTTP side in front of it.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.mqtt.events import Buffer

__all__ = ["ClientReceiver", "Transport"]


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def get_write_buffer_size(self) -> int: ...


class ClientReceiver(Protocol):
    def client_data(self, data: Buffer) -> None:
        """Bytes from the client; ``data`` may be a slice of a shared buffer, valid for this call only."""

    def client_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None:
        """The client's socket is not keeping up with what is written to it."""

    def resume_writing(self) -> None: ...
