"""
The daemon's C{Site}, fed raw HTTP in memory.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from wsgw.config import Config
from wsgw.web import GatewaySite


class Recorder(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render_POST(self, request):
        self.seen.append((request.args, request.content.read()))
        return b"{}"


def test_form_labelled_json_body_is_read_as_sent_not_parsed_as_a_form():
    """curl -d labels a JSON body as a form; the API reads the body itself,
    so the site leaves it unparsed (request.args stays empty)."""
    recorder = Recorder()
    site = GatewaySite(recorder, Config(), reactor=Clock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    channel.makeConnection(transport)
    body = b'{"payload":"a=1&b=2","conn_id":"x"}'
    channel.dataReceived(
        b"POST /tapr/ws/conn/send HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert recorder.seen == [({}, body)]
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    channel.connectionLost(None)


def test_websocket_handshake_through_the_site_sets_no_autobahn_timer():
    """Behind the site the upgrade request arrives whole and is answered at
    once; the site's own deadline bounds it, so Autobahn's handshake timer
    is not armed (and cancelled) for every connection."""
    from wsgw.service import make_node
    from wsgw.web import make_resource

    clock = Clock()
    config = Config()
    node = make_node(config, reactor=clock)
    gateway = node.gateway
    site = GatewaySite(make_resource(node), config, reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    transport.protocol = channel  # as a TCP transport has it; Autobahn takes it over
    channel.makeConnection(transport)
    channel.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b"101 Switching Protocols" in transport.value()
    protocol = transport.protocol
    assert protocol.state == protocol.STATE_OPEN
    assert protocol.openHandshakeTimeout == 0
    assert len(gateway.registry) == 1
