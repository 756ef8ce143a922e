"""What the shell needs of a client transport: the part of ``asyncio.Transport`` that
:mod:`proxy.mqtt.server` uses, and that its TLS-on-MemoryBIO and WebSocket transports
provide as well (:mod:`proxy.mqtt.websocket`)."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Transport"]


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def get_write_buffer_size(self) -> int: ...
