"""
The daemon's HTTP channel and requests, fed raw HTTP in memory with time on
a Clock: the first-request deadline (GatewayChannel) and the body limit of
a chunked API call (BoundedRequest).  Until these, only the daemon tests
reached them.
"""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wsgw.config import Config
from wsgw.service import make_node
from wsgw.web import GatewaySite, make_resource

LOCAL = IPv4Address("TCP", "127.0.0.1", 5555)
HANDSHAKE_TIMEOUT = 5.0
MAX_BODY = 1000


class Connected:
    """The daemon's site on a Clock, and one connection to it."""

    def __init__(self):
        self.clock = Clock()
        config = Config(handshake_timeout=HANDSHAKE_TIMEOUT, max_api_body=MAX_BODY)
        self.node = make_node(config, reactor=self.clock)
        self.site = GatewaySite(make_resource(self.node), config, reactor=self.clock)
        self.channel = self.site.buildProtocol(LOCAL)
        self.transport = StringTransport(peerAddress=LOCAL)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes):
        self.channel.dataReceived(data)

    @property
    def aborted(self) -> bool:
        # StringTransport.abortConnection sets both; loseConnection only the first.
        return self.transport.disconnecting and self.transport.disconnected

    def answer(self):
        """(status, JSON body) of the one answer written so far."""
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        return status, json.loads(body)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2 :]
    return out


@pytest.fixture
def connected():
    connection = Connected()
    yield connection
    if not connection.transport.disconnected:
        connection.channel.connectionLost(None)


# -- the first-request deadline (GatewayChannel) -----------------------------


def test_a_connection_that_sends_nothing_is_dropped_at_the_deadline(connected):
    connected.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not connected.transport.disconnecting
    connected.clock.advance(0.1)
    assert connected.aborted


def test_a_request_trickling_in_does_not_move_the_deadline(connected):
    """The deadline is for the whole first request, not an idle timer: a
    header line every second does not keep the connection."""
    connected.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    for _ in range(int(HANDSHAKE_TIMEOUT) - 1):
        connected.clock.advance(1)
        connected.send(b"X-Slow: 1\r\n")
        assert not connected.transport.disconnecting
    connected.clock.advance(1)
    assert connected.aborted


def test_a_complete_first_request_in_time_lifts_the_deadline(connected):
    connected.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connected.answer()[0] == 200
    connected.clock.advance(HANDSHAKE_TIMEOUT * 2)  # well within the 60 s idle timeout
    assert not connected.transport.disconnecting


def test_a_connection_that_ends_leaves_no_timer_behind(connected):
    connected.send(b"GET /ws HTTP/1.1\r\n")
    connected.transport.disconnected = True
    connected.channel.connectionLost(None)
    assert connected.clock.getDelayedCalls() == []


# -- the API body limit (BoundedRequest) ----------------------------------------


def _send_request(body_lines: bytes, headers: bytes) -> bytes:
    return b"POST /tapr/ws/conn/send HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body_lines


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_413_and_not_kept(connected):
    """A chunked body gives no length up front; the request stops keeping
    it once it passes the limit, and the API answers 413."""
    kept = []

    class Recording(connected.channel.requestFactory):
        def handleContentChunk(self, data):
            super().handleContentChunk(data)
            kept.append(self.content.seek(0, 2))  # the bytes it holds

    connected.channel.requestFactory = Recording
    chunk = b" " * 600
    connected.send(_send_request(b"", b"Transfer-Encoding: chunked\r\n"))
    connected.send(_chunked(b'{"payload":"x","users":["a"]', chunk, chunk, b"}"))
    assert kept == [28, 628, 0, 0]
    status, body = connected.answer()
    assert status == 413 and body["code"] == 413
    assert str(MAX_BODY) in body["message"]


def test_a_chunked_body_within_the_limit_is_read_whole(connected):
    connected.send(_send_request(b"", b"Transfer-Encoding: chunked\r\n"))
    connected.send(_chunked(b'{"payload":"hi",', b'"users":["nobody"]}'))
    status, body = connected.answer()
    assert (status, body["data"]) == (200, {"matched": 0})


def test_a_declared_length_over_the_limit_is_413(connected):
    body = b"{" + b" " * MAX_BODY + b"}"
    connected.send(_send_request(body, b"Content-Length: %d\r\n" % len(body)))
    status, answer = connected.answer()
    assert status == 413 and answer["code"] == 413
