"""
The WebSocket protocol, in memory: an Autobahn client talks to the
gateway's protocol over iosim transports, no sockets.
"""

import json

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.test.iosim import FakeTransport, connect

from fakes import FakeApp, make_gateway
from fakes import RecordingClient as Client
from wsgw.internals import frame_bytes
from wsgw.registry import Targets
from wsgw.websocket import GatewayFactory, prepare_frame


def pair(factory, headers=None, protocols=None):
    server = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
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
    return make_gateway(reactor, app, prepare=prepare_frame)


@pytest.fixture
def factory(gateway):
    return GatewayFactory(gateway, reactor=reactor, max_message_size=1000)


def test_handshake_identifies_and_forwards_open(gateway, app, factory):
    server, _client, pump = pair(factory, {"X-Bfl-User": "alice", "Cookie": "auth_token=abc"})
    pump.flush()
    [(event, record, _)] = app.attempts
    assert event["action"] == "open"
    assert (event["user_name"], event["token"], event["access_public"]) == ("alice", "abc", False)
    assert event["remote_addr"] == "10.1.2.3"
    assert record.cookie == "auth_token=abc"
    assert gateway.registry.get(event["conn_id"]) is server.conn


def test_ping_pong_bytes_and_message_forwarding(gateway, app, factory):
    _server, client, pump = pair(factory)
    pump.flush()
    client.sendMessage(b'{"event":"ping","data":{}}')
    client.sendMessage(b'{"event":"hello","data":{"x":1}}')
    pump.flush()
    assert client.received == [b'{"event":"pong"}']
    app.answer_all()
    assert [e["data"] for e, _, _ in app.attempts] == [{}, {"event": "hello", "data": {"x": 1}}]


def test_one_of_several_subprotocols_is_selected(gateway, factory):
    _server, client, pump = pair(factory, protocols=["v2.chat", "v1.chat"])
    pump.flush()
    assert client.websocket_protocol_in_use == "v2.chat"


def test_oversized_message_closes_with_1009_and_close_event(gateway, app, factory):
    _server, client, pump = pair(factory)
    pump.flush()
    client.sendMessage(b'"' + b"x" * 2000 + b'"')
    pump.flush()
    assert client.close_info[0] == 1009
    app.answer_all()
    assert [e["action"] for e, _, _ in app.attempts] == ["open", "close"]
    assert len(gateway.registry) == 0


def test_send_through_gateway_reaches_client(gateway, app, factory):
    _server, client, pump = pair(factory, {"X-Bfl-User": "bob"})
    pump.flush()
    assert gateway.send_here(json.dumps({"hi": 1}).encode(), Targets(users=["bob"])) == 1
    pump.flush()
    assert client.received == [b'{"hi": 1}']


def test_pausing_stops_reading(gateway, factory):
    server = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    server.makeConnection(StringTransport())
    server.pause_reading()
    assert server.transport.producerState == "paused"
    server.resume_reading()
    assert server.transport.producerState == "producing"


def test_handshake_takes_the_factory_settings_without_pretty_printing_them(gateway, monkeypatch, factory):
    """Autobahn pretty-prints every setting of every new connection for a
    debug line; the gateway's protocol copies the settings itself and
    skips that, yet ends up configured exactly as the factory says."""
    import autobahn.websocket.protocol as autobahn_protocol

    printed = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: printed.append(value) or "")
    server, _client, pump = pair(factory)
    pump.flush()
    assert server.state == server.STATE_OPEN
    # (The test's client is Autobahn's too, and prints its own settings.)
    assert not [value for value in printed if "GatewayFactory" in repr(value)]
    for name in (
        "maxMessagePayloadSize",
        "openHandshakeTimeout",
        "autoPingInterval",
        "failByDrop",
        "perMessageCompressionAccept",
        "tcpNoDelay",
    ):
        assert getattr(server, name) == getattr(factory, name), name


def test_frames_sent_directly_keep_their_order_behind_queued_ones(gateway, factory):
    """A frame goes straight to the transport only when Autobahn has
    nothing queued; otherwise it queues behind, so order holds."""
    server, client, pump = pair(factory, {"X-Bfl-User": "carol"})
    pump.flush()
    first = frame_bytes(prepare_frame(b'"first"'))
    # As a chopped or synced send leaves it: queued, its next write scheduled.
    server.send_queue.append((first, False))
    server.triggered = True
    gateway.send_here(b'"second"', Targets(users=["carol"]))
    second = frame_bytes(prepare_frame(b'"second"'))
    assert list(server.send_queue) == [(first, False), (second, False)]
    server.send_queue.clear()
    server.triggered = False
    gateway.send_here(b'"third"', Targets(users=["carol"]))
    pump.flush()
    assert client.received == [b'"third"']


def test_an_unsolicited_pong_is_a_sign_of_life(gateway, factory):
    server, client, pump = pair(factory)
    pump.flush()
    server.conn.last_seen = 0.0
    client.sendPong(b"keep-alive")
    pump.flush()
    assert server.conn.last_seen > 0.0


def test_the_gateway_ping_reaches_the_client_which_answers(gateway, factory):
    server, _client, pump = pair(factory)
    pump.flush()
    server.conn.last_seen = 0.0
    gateway.ping_all()
    pump.flush()  # the client's Autobahn answers with a pong
    assert server.conn.last_seen > 0.0
