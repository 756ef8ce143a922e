"""A TCP relay to PostgreSQL that, once armed, lets a write's COMMIT reach the server and drops its
answer: the transaction commits, and the client sees its connection lost (a network blip, a
restart or a failover at the wrong instant). For the change feed's "my own write" bookkeeping."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CommitAnswerLost:
    def __init__(self, target_port: int, marker: bytes):
        self.target = ("127.0.0.1", target_port)
        self.marker = marker          # a statement of the write whose COMMIT's answer is dropped
        self.armed = False
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            state = {"seen": False, "committing": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict[str, bool]) -> None:
        try:
            while data := client.recv(65536):
                if self.armed and self.marker in data:
                    state["seen"] = True
                if state["seen"] and b"COMMIT" in data:
                    state["committing"] = True
                    self.armed = False
                server.sendall(data)
                if state["committing"]:
                    time.sleep(0.3)   # the server commits and answers; the answer goes nowhere
                    self.cut.set()
                    return
        except OSError:
            pass
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        try:
            while data := server.recv(65536):
                if not state["committing"]:
                    client.sendall(data)
        except OSError:
            pass
