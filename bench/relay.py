"""A bare TLS-terminating byte relay in front of the broker: the floor for keygate.

``python -m bench.relay --listen PORT --upstream HOST:PORT --cert C --key K``

Same process model as keygate (one Python process, uvloop, TLS by the ssl
module, one broker connection per client, TCP_NODELAY) but no MQTT parsing,
no authentication and no policy: bytes in, bytes out. What it costs per
message or per connection is what any Python gateway of this design pays
before doing anything useful; the difference between keygate and this relay
is keygate's own work. Used by the benchmarks only ("relay" mode).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import ssl
import sys


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's is an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Backpressure across the pair, as keygate does.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, upstream: tuple[str, int]):
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._dialing = asyncio.ensure_future(self._dial())  # held: the loop keeps only a weak reference

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, broker = await loop.create_connection(_Side, *self.upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        broker.peer, self.peer = self, broker
        assert broker.transport is not None  # create_connection returns once connection_made ran
        for data in self.pending:
            broker.transport.write(data)
        self.pending.clear()


async def serve(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    host, port = args.upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client((host, int(port))), "127.0.0.1", args.listen, ssl=ctx,
                                      backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
