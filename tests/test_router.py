"""
A listener routes each connection by its first request: a WebSocket
upgrade of /ws straight to Autobahn (parsed once), anything else to
twisted.web; in memory, over StringTransport.
"""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wsgw.config import Config
from wsgw.router import RouterFactory, _could_be_ws, _is_upgrade_of_ws
from wsgw.service import make_node
from wsgw.web import GatewaySite, make_resource, websocket_factory

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost:40010\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Bfl-User: alice\r\n\r\n"
)
PEER = IPv4Address("TCP", "127.0.0.1", 5555)


def front(**settings):
    clock = Clock()
    config = Config(**settings)
    node = make_node(config, reactor=clock)
    websocket = websocket_factory(node)
    site = GatewaySite(make_resource(node, factory=websocket), config, reactor=clock)
    return clock, node, RouterFactory(site, websocket, clock, config.handshake_timeout, site.rate_limiter)


def connect(factory, *chunks):
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    for chunk in chunks:
        transport.protocol.dataReceived(chunk)
    return transport


def answer(transport):
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_an_upgrade_goes_straight_to_autobahn_without_a_web_request(monkeypatch):
    from twisted.web import server

    made = []
    monkeypatch.setattr(server.Request, "__init__", lambda *a, **k: made.append(a))
    _clock, node, factory = front()
    transport = connect(factory, UPGRADE)
    head, _ = answer(transport)
    assert head[0] == b"HTTP/1.1 101 Switching Protocols"
    assert made == []  # twisted.web never saw it
    assert [c.user_name for c in node.gateway.registry] == ["alice"]


def test_an_upgrade_split_anywhere_is_routed_the_same():
    for cut in (1, 5, 7, 8, 30, len(UPGRADE) - 1):
        _clock, node, factory = front()
        transport = connect(factory, UPGRADE[:cut], UPGRADE[cut:])
        assert answer(transport)[0][0] == b"HTTP/1.1 101 Switching Protocols", cut
        assert len(node.gateway.registry) == 1


def test_the_api_and_everything_else_go_to_twisted_web():
    _clock, _node, factory = front()
    transport = connect(factory, b"GET /tapr/ws/conn/list HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, body = answer(transport)
    assert head[0] == b"HTTP/1.1 200 OK"
    assert json.loads(body)["code"] == 0
    transport = connect(factory, b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")  # no upgrade
    assert answer(transport)[0][0].startswith(b"HTTP/1.1 426")
    transport = connect(factory, b"GET /wsx HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer(transport)[0][0].startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(
    "settings, headers, status, retry_after",
    [
        ({}, b"Origin: https://evil.example\r\n", 403, None),
        ({"require_user": True}, b"", 401, None),
        ({"max_connections": 1}, b"X-Bfl-User: bob\r\n", 503, b"5"),
        ({"max_connections_per_user": 1}, b"X-Bfl-User: bob\r\n", 429, b"5"),
    ],
)
def test_a_refused_upgrade_is_answered_in_json_saying_why(settings, headers, status, retry_after):
    _clock, _node, factory = front(**settings)
    if settings.get("max_connections") or settings.get("max_connections_per_user"):
        connect(factory, UPGRADE.replace(b"alice", b"bob"))  # takes the one place
    request = UPGRADE.replace(b"X-Bfl-User: alice\r\n", headers)
    transport = connect(factory, request)
    head, body = answer(transport)
    assert head[0].startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(body)["code"] == status and json.loads(body)["message"]
    assert (b"Retry-After: " + retry_after in head) if retry_after else not any(b"Retry-After" in h for h in head)
    assert transport.disconnecting


def test_upgrades_count_against_the_rate_limit():
    _clock, _node, factory = front(rate_limit=1.0)  # bursts of 2
    statuses = [answer(connect(factory, UPGRADE))[0][0].split(b" ")[1] for _ in range(3)]
    assert statuses == [b"101", b"101", b"429"]


def test_a_connection_that_sends_no_complete_head_in_time_is_dropped():
    clock, _node, factory = front(handshake_timeout=2.0)
    transport = connect(factory, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_a_head_over_the_limit_is_refused():
    _clock, _node, factory = front()
    transport = connect(factory, b"GET /ws HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 17000 + b"\r\n")
    assert answer(transport)[0][0].startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n", True),
        (b"GET /ws?x=1 HTTP/1.1\r\nupgrade: WebSocket\r\n", True),
        (b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\n", False),
        (b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\n", False),
        (b"GET /ws/x HTTP/1.1\r\nUpgrade: websocket\r\n", False),
        (b"GET /ws HTTP/1.1\r\nX-Upgrade: websocket\r\nUpgrade: h2c\r\n", False),
    ],
)
def test_what_counts_as_an_upgrade_of_ws(head, expected):
    assert _is_upgrade_of_ws(head) is expected


def test_request_line_prefixes():
    assert _could_be_ws(b"GE") and _could_be_ws(b"GET /ws") and _could_be_ws(b"GET /ws ")
    assert not _could_be_ws(b"POST") and not _could_be_ws(b"GET /wsx") and not _could_be_ws(b"GET /a")


def test_the_log_names_a_refused_origin(log_lines):
    _clock, _node, factory = front()
    connect(factory, UPGRADE.replace(b"X-Bfl-User: alice\r\n", b"Origin: https://evil.example\r\n"))
    assert [line for line in log_lines if "handshake refused" in line and "Origin: https://evil.example" in line]
