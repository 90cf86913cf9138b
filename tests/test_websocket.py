"""
The WebSocket protocol, in memory: an Autobahn client talks to the
gateway's protocol over iosim transports, no sockets.
"""

import json

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.test.iosim import FakeTransport, connect

from fakes import FakeApp
from wsgw.config import Config
from wsgw.service import make_gateway


class Client(WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.received = []
        self.close_info = None

    def onMessage(self, payload, isBinary):
        self.received.append(payload)

    def onClose(self, wasClean, code, reason):
        self.close_info = (code, reason)


def pair(gateway, headers=None, protocols=None):
    server = gateway.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    client_factory = WebSocketClientFactory("ws://127.0.0.1:40010/ws", headers=headers or {}, protocols=protocols)
    client = Client()
    client.factory = client_factory
    pump = connect(
        server,
        FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", "10.1.2.3", 5555)),
        client,
        FakeTransport(client, isServer=False),
    )
    return server, client, pump


@pytest.fixture
def app():
    return FakeApp()


@pytest.fixture
def gateway(app):
    gw = make_gateway(Config(max_message_size=1000), http_client=None)
    gw.forwarder.post = app
    return gw


def test_handshake_identifies_and_forwards_open(gateway, app):
    server, client, pump = pair(gateway, {"X-Bfl-User": "alice", "Cookie": "auth_token=abc"})
    pump.flush()
    [(event, headers, _)] = app.attempts
    assert event["action"] == "open"
    assert (event["user_name"], event["token"], event["access_public"]) == ("alice", "abc", False)
    assert event["remote_addr"] == "10.1.2.3"
    assert headers[b"Cookie"] == [b"auth_token=abc"]
    assert gateway.registry.get(event["conn_id"]) is server.conn


def test_ping_pong_bytes_and_message_forwarding(gateway, app):
    server, client, pump = pair(gateway)
    pump.flush()
    client.sendMessage(b'{"event":"ping","data":{}}')
    client.sendMessage(b'{"event":"hello","data":{"x":1}}')
    pump.flush()
    assert client.received == [b'{"event":"pong"}']
    app.answer_all()
    assert [e["data"] for e, _, _ in app.attempts] == [{}, {"event": "hello", "data": {"x": 1}}]


def test_one_of_several_subprotocols_is_selected(gateway):
    server, client, pump = pair(gateway, protocols=["v2.chat", "v1.chat"])
    pump.flush()
    assert client.websocket_protocol_in_use == "v2.chat"


def test_oversized_message_closes_with_1009_and_close_event(gateway, app):
    server, client, pump = pair(gateway)
    pump.flush()
    client.sendMessage(b'"' + b"x" * 2000 + b'"')
    pump.flush()
    assert client.close_info[0] == 1009
    app.answer_all()
    assert [e["action"] for e, _, _ in app.attempts] == ["open", "close"]
    assert len(gateway.registry) == 0


def test_send_through_gateway_reaches_client(gateway, app):
    server, client, pump = pair(gateway, {"X-Bfl-User": "bob"})
    pump.flush()
    assert gateway.send(json.dumps({"hi": 1}).encode(), users=["bob"]) == 1
    pump.flush()
    assert client.received == [b'{"hi": 1}']


def test_pausing_stops_reading(gateway):
    server = gateway.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    server.makeConnection(StringTransport())
    server.pause_reading()
    assert server.transport.producerState == "paused"
    server.resume_reading()
    assert server.transport.producerState == "producing"


def test_handshake_takes_the_factory_settings_without_pretty_printing_them(gateway, monkeypatch):
    """Autobahn pretty-prints every setting of every new connection for a
    debug line; the gateway's protocol copies the settings itself and
    skips that, yet ends up configured exactly as the factory says."""
    import autobahn.websocket.protocol as autobahn_protocol

    printed = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: printed.append(value) or "")
    server, client, pump = pair(gateway)
    pump.flush()
    assert server.state == server.STATE_OPEN
    # (The test's client is Autobahn's too, and prints its own settings.)
    assert not [value for value in printed if "GatewayFactory" in repr(value)]
    factory = gateway.factory
    for name in (
        "maxMessagePayloadSize",
        "openHandshakeTimeout",
        "autoPingInterval",
        "failByDrop",
        "perMessageCompressionAccept",
        "tcpNoDelay",
    ):
        assert getattr(server, name) == getattr(factory, name), name


def test_frames_sent_directly_keep_their_order_behind_queued_ones(gateway):
    """A frame goes straight to the transport only when Autobahn has
    nothing queued; otherwise it queues behind, so order holds."""
    server, client, pump = pair(gateway, {"X-Bfl-User": "carol"})
    pump.flush()
    first = gateway.factory.prepare_text(b'"first"').payloadHybi
    # As a chopped or synced send leaves it: queued, its next write scheduled.
    server.send_queue.append((first, False))
    server.triggered = True
    gateway.send(b'"second"', users=["carol"])
    second = gateway.factory.prepare_text(b'"second"').payloadHybi
    assert list(server.send_queue) == [(first, False), (second, False)]
    server.send_queue.clear()
    server.triggered = False
    gateway.send(b'"third"', users=["carol"])
    pump.flush()
    assert client.received == [b'"third"']


class _Port:
    _realPortNumber = 40010


def _tcp_pair():
    """A real TCP transport (Twisted's) over one end of a socket pair, on a
    memory reactor, and the other end to read what it sends."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 5555), _Port(), 1, reactor)
    return transport, theirs, reactor


def test_frames_go_out_at_once_when_nothing_waits():
    """With nothing buffered, a frame is sent during the call, without the
    reactor watching the socket for writing."""
    from wsgw.websocket import _write_now

    transport, peer, reactor = _tcp_pair()
    _write_now(transport, b"frame-1")
    assert peer.recv(100) == b"frame-1"
    assert transport not in reactor.getWriters()
    transport.socket.close()
    peer.close()


def test_frames_queue_behind_buffered_bytes():
    """Bytes already buffered by the transport go first: a frame written
    after them waits behind them, in order."""
    from wsgw.websocket import _write_now

    transport, peer, reactor = _tcp_pair()
    transport.write(b"buffered;")
    _write_now(transport, b"frame-2")

    try:
        early = peer.recv(100)
    except (OSError, BlockingIOError):
        early = b""
    assert early == b""
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert peer.recv(100) == b"buffered;frame-2"
    transport.socket.close()
    peer.close()


def test_what_the_socket_does_not_take_is_buffered_in_order():
    """A frame larger than the socket takes at once: the rest is buffered
    and follows, before anything written later."""
    from wsgw.websocket import _write_now

    transport, peer, reactor = _tcp_pair()
    big = bytes(range(256)) * 40000  # ~10 MB: more than a socket pair buffers
    _write_now(transport, big)
    _write_now(transport, b"after")
    assert transport in reactor.getWriters()
    received = bytearray()
    while len(received) < len(big) + 5:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            chunk = b""
        received += chunk
        if not chunk:
            transport.doWrite()
    assert bytes(received) == big + b"after"
    transport.socket.close()
    peer.close()


def test_a_transport_without_the_expected_fields_takes_the_ordinary_path():
    """The fast path reads private fields of Twisted's TCP transport; one
    that lacks them (another Twisted release) is not idle, so frames go
    through write() instead of failing."""
    from types import SimpleNamespace

    from wsgw.websocket import _idle

    transport, peer, reactor = _tcp_pair()
    assert _idle(transport)
    assert not _idle(SimpleNamespace(TLS=False, connected=True, disconnecting=False))
    transport.socket.close()
    peer.close()
