"""
The WebSocket protocol's close paths, in memory: an Autobahn client talks to
the gateway's protocol over iosim transports, time is a Clock, and the app
is a fake that records each event.  Until these, only the daemon tests
reached them.
"""

import json

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect

from fakes import FakeApp, make_gateway
from fakes import RecordingClient as Client
from wsgw.gateway import CLOSE_BY_APP, CLOSE_GOING_AWAY, CLOSE_TOO_SLOW
from wsgw.registry import Targets
from wsgw.websocket import GatewayFactory, prepare_frame

PEER = IPv4Address("TCP", "10.1.2.3", 5555)


class Setup:
    """A gateway on a Clock, its fake app, and client/server pairs."""

    def __init__(self, **factory_options):
        self.clock = Clock()
        self.app = FakeApp()
        self.gateway = make_gateway(self.clock, self.app, prepare=prepare_frame)
        self.factory = GatewayFactory(self.gateway, reactor=self.clock, **factory_options)

    def send(self, payload, user):
        return self.gateway.send_here(payload, Targets(users=[user]))

    def pair(self, user="alice"):
        server = self.factory.buildProtocol(PEER)
        client = Client()
        client.factory = WebSocketClientFactory("ws://127.0.0.1:40010/ws", headers={"X-Bfl-User": user})
        pump = connect(
            server,
            FakeTransport(server, isServer=True, peerAddress=PEER),
            client,
            FakeTransport(client, isServer=False),
        )
        assert server.state == server.STATE_OPEN
        return server, client, pump

    def close_event(self):
        """The one close event the app received, as (code, reason)."""
        self.app.answer_all()
        closes = [event for event, _, _ in self.app.attempts if event["action"] == "close"]
        assert len(closes) == 1, closes
        return closes[0]["close_code"], closes[0]["close_reason"]


@pytest.fixture
def setup():
    return Setup()


# -- which close code the app is told (GatewayProtocol.onClose) --------------


def test_a_client_close_reports_its_code_and_reason(setup):
    _server, client, pump = setup.pair()
    client.sendClose(1000, "bye")
    pump.flush()
    assert setup.close_event() == (1000, "bye")
    assert len(setup.gateway.registry) == 0


def test_a_client_close_without_a_code_is_1005(setup):
    _server, client, pump = setup.pair()
    client.sendClose()
    pump.flush()
    assert setup.close_event() == (1005, "")


def test_a_connection_that_just_ends_is_1006(setup):
    _server, client, pump = setup.pair()
    client.transport.abortConnection()
    pump.flush()
    assert setup.close_event()[0] == 1006


def test_a_close_the_gateway_started_reports_the_gateways_code_not_the_echo(setup):
    """The client echoes the gateway's close frame; the app hears the code
    and reason of whoever closed first."""
    _server, client, pump = setup.pair(user="bob")
    assert setup.gateway.close_here(Targets(users=["bob"])) == 1
    pump.flush()
    assert client.close_info == CLOSE_BY_APP
    assert setup.close_event() == CLOSE_BY_APP


def test_a_connection_autobahn_fails_reports_autobahns_code(setup):
    """Invalid UTF-8 in a text frame: Autobahn closes with 1007 itself."""
    _server, client, pump = setup.pair()
    client.sendMessage(b"\xff\xfe not utf-8", isBinary=False)
    pump.flush()
    assert client.close_info[0] == 1007
    assert setup.close_event()[0] == 1007


# -- close_with: the channel's close, which may send 1001 ---------------------


def test_close_with_sends_1001_which_autobahns_sendclose_refuses(setup):
    """A server going away must send 1001; Autobahn's public sendClose()
    refuses it, so close_with writes the close frame itself.  If Autobahn
    starts accepting 1001 there, this test says the workaround can go."""
    server, client, pump = setup.pair()
    with pytest.raises(Exception, match="invalid close code 1001"):
        server.sendClose(*CLOSE_GOING_AWAY)
    server.close_with(*CLOSE_GOING_AWAY)
    pump.flush()
    assert client.close_info == CLOSE_GOING_AWAY
    assert setup.close_event() == CLOSE_GOING_AWAY


def test_close_with_truncates_a_long_reason_to_what_a_close_frame_holds(setup):
    server, client, pump = setup.pair()
    server.close_with(4000, "r" * 200)
    pump.flush()
    assert client.close_info == (4000, "r" * 123)


def test_close_with_truncates_a_long_reason_between_characters(setup):
    """Every reason the gateway sends today is short ASCII; a longer one
    cut mid-character would be invalid UTF-8, which the client refuses."""
    server, client, pump = setup.pair()
    server.close_with(4000, "é" * 100)  # 200 bytes of UTF-8
    pump.flush()
    code, reason = client.close_info
    assert code == 4000 and reason == "é" * 61


def test_a_second_close_with_keeps_the_first_code(setup):
    server, _client, pump = setup.pair()
    server.close_with(*CLOSE_BY_APP)
    server.close_with(*CLOSE_GOING_AWAY)
    pump.flush()
    assert setup.close_event() == CLOSE_BY_APP


def test_shutdown_closes_every_client_with_1001(setup):
    pairs = [setup.pair(user=f"u{n}") for n in range(3)]
    drained = setup.gateway.shut_down(5.0)
    for _, _, pump in pairs:
        pump.flush()
    assert [client.close_info for _, client, _ in pairs] == [CLOSE_GOING_AWAY] * 3
    setup.app.answer_all()
    assert drained.called


# -- the too-slow abort (max_outgoing) -----------------------------------------


def test_a_client_that_does_not_read_is_aborted_past_max_outgoing():
    """Once the transport says its buffer is full, what is still sent is
    counted; past max_outgoing the connection is aborted (a close frame
    would wait behind what the client does not read) and the app is told
    4002."""
    setup = Setup(max_outgoing=10_000)
    server, _client, pump = setup.pair(user="slow")
    server.pauseProducing()  # the transport's buffer is full
    frame = json.dumps("x" * 3000).encode()
    assert [setup.send(frame, "slow") for _ in range(3)] == [1, 1, 1]
    assert not server.transport.disconnecting
    assert setup.send(frame, "slow") == 1  # 12 KB > 10,000 bytes
    assert server.transport.disconnecting
    # It left the indexes at once: the next send matches nobody.
    assert setup.send(frame, "slow") == 0
    pump.flush()
    assert setup.close_event() == CLOSE_TOO_SLOW


def test_a_client_whose_buffer_drains_in_time_is_kept():
    setup = Setup(max_outgoing=10_000)
    server, client, pump = setup.pair(user="steady")
    frame = json.dumps("y" * 3000).encode()
    for _ in range(3):
        server.pauseProducing()
        setup.send(frame, "steady")
        setup.send(frame, "steady")
        server.resumeProducing()  # drained: the count starts again
    pump.flush()
    assert not server.transport.disconnecting
    assert len(client.received) == 6


# -- the settings, held by the factory's protocol class ------------------------


def test_a_connection_reads_its_settings_from_its_class_not_its_own_dict(setup):
    """Autobahn copied 29 settings into every connection; the factory's
    protocol class holds them once, and later options reach new ones."""
    from wsgw import internals

    server, _client, _pump = setup.pair()
    assert server.maxMessagePayloadSize == 1024 * 1024
    assert not any(name in vars(server) for name in internals.PROTOCOL_SETTINGS)
    setup.factory.setProtocolOptions(maxMessagePayloadSize=10)
    later, _client, _pump = setup.pair()
    assert later.maxMessagePayloadSize == 10
    assert isinstance(later, type(server).__mro__[1])


def test_a_compression_offer_is_declined_through_the_class_setting(setup):
    """perMessageCompressionAccept is a function setting: held on the class,
    it is still called with the offers alone, and declines them."""
    server = setup.factory.buildProtocol(PEER)
    client = Client()
    client.factory = WebSocketClientFactory("ws://127.0.0.1:40010/ws", headers={"X-Bfl-User": "alice"})
    from autobahn.websocket.compress import PerMessageDeflateOffer

    client.factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
    connect(
        server, FakeTransport(server, isServer=True, peerAddress=PEER), client, FakeTransport(client, isServer=False)
    )
    assert server.state == server.STATE_OPEN
    assert server._perMessageCompress is None


def test_what_the_protocol_sends_itself_is_counted_as_autobahn_counts_it(setup):
    """sendData takes the direct path for the 101 and every later frame; it
    keeps Autobahn's traffic figures, before and after the opening."""
    server, client, pump = setup.pair()
    stats = server.trafficStats
    assert stats.preopenOutgoingOctetsWireLevel >= len(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    before = stats.outgoingOctetsWireLevel
    server.sendMessage(b"hello")
    pump.flush()
    assert client.received[-1:] == [b"hello"]
    assert stats.outgoingOctetsWireLevel == before + len(b"\x81\x05hello")


def test_an_open_connection_keeps_nothing_of_its_handshake_request(setup):
    """The request's bytes and headers and the 101's text are let go once
    the connection is open; the connection still talks."""
    from wsgw import internals

    server, client, pump = setup.pair()
    assert all(getattr(server, name) is None for name in internals.HANDSHAKE_LEFTOVERS)
    server.sendMessage(b"still here")
    pump.flush()
    assert client.received[-1:] == [b"still here"]
