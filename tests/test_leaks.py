"""
After thousands of connections come and go (clean closes, aborted TCP
connections, clients that vanish mid-handshake) nothing is left behind:
no connection in the registry, no timer in the reactor, no memory.
"""

import base64
import ctypes
import gc
import os
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import ClientFactory, Protocol

from harness import bounded, rss_kib, start_app
from wsgw import Config, make_service

pytestmark = pytest.mark.timeout(300)

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n"
    b"X-Bfl-User: cycler\r\n\r\n"
)
# A masked close frame, code 1000 (all-zero mask).
CLOSE_FRAME = b"\x88\x82\x00\x00\x00\x00" + struct.pack("!H", 1000)


class Cycle(Protocol):
    """One client lifetime of a given kind; C{done} fires when it is over."""

    def __init__(self, kind):
        self.kind = kind
        self.done = Deferred()
        self.buffer = b""

    def connectionMade(self):
        if self.kind == "vanish":
            self.transport.write(HANDSHAKE[: len(HANDSHAKE) // 2])
            self.transport.abortConnection()
        else:
            self.transport.write(HANDSHAKE)

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer or self.kind == "closing":
            return
        assert self.buffer.startswith(b"HTTP/1.1 101"), self.buffer[:100]
        if self.kind == "clean":
            self.kind = "closing"
            self.transport.write(CLOSE_FRAME)
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        self.done.callback(None)


def cycle(port, kind):
    proto = Cycle(kind)
    factory = ClientFactory()
    factory.buildProtocol = lambda addr: proto
    reactor.connectTCP("127.0.0.1", port, factory)
    return proto.done


async def run_cycles(port, count):
    kinds = ["clean", "abort", "vanish"]
    limit = DeferredSemaphore(50)
    await gatherResults([limit.run(cycle, port, kinds[n % 3]) for n in range(count)])


def live_rss_kib():
    """
    Resident memory once the allocator has handed freed memory back: what
    stays is memory still in use, not malloc's retained free lists.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_kib(os.getpid())


def timers():
    return [call for call in reactor.getDelayedCalls() if call.active()]


@pytest_twisted.ensureDeferred
async def test_ten_thousand_connections_leave_nothing_behind():
    app = start_app(keep=False)
    service = make_service(Config(listen=["tcp:0:interface=127.0.0.1"], app_url=app.url), reactor)
    service.startService()
    gateway = service.gateway
    try:
        [listening] = await service.listening
        port = listening.getHost().port

        async def settled(expected_closes):
            await app.wait_for(
                lambda: app.counts["close"] >= expected_closes,
                "every close event",
                seconds=60,
            )
            await bounded(gateway.forwarder.drained(), 30, "the forwarder to drain")

        await run_cycles(port, 1500)  # warm up allocators and caches
        await settled(1000)
        first_rss, baseline_timers = live_rss_kib(), len(timers())
        await run_cycles(port, 5000)
        await settled(1000 + 3334)
        middle_rss = live_rss_kib()
        await run_cycles(port, 5000)
        opened = 1000 + 3334 + 3334
        await settled(opened)
        last_rss = live_rss_kib()

        assert len(gateway.registry) == 0
        assert len(gateway.live) == 0
        assert len(gateway.forwarder) == 0
        assert app.counts["open"] == app.counts["close"] == opened
        # Idle pooled connections to the app keep one timer each; nothing
        # grows with the number of clients served.
        assert len(timers()) <= baseline_timers + 5, [repr(t.func) for t in timers()][:10]
        # The allocator keeps some freed memory after the first thousands
        # of connections; from then on memory must stay flat.  A Connection
        # with its protocol and HTTP channel is tens of KiB: leaking even a
        # tenth of 5,000 would add tens of MiB.
        late_growth = (last_rss - middle_rss) / 1024
        assert late_growth < 4, f"grew {late_growth:.1f} MiB over the last 5,000 connections"
        total_growth = (last_rss - first_rss) / 1024
        assert total_growth < 24, f"grew {total_growth:.1f} MiB over 10,000 connections"
    finally:
        await service.stopService()
        app.port.stopListening()
