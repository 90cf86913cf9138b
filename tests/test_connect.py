"""
The app admits connections (--connect-url): in memory, through the
listener's router with a stand-in app or treq's StubTreq, and against the
real daemon with a real app server and the Node `ws` client.
"""

import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from fakes import FakeApp, make_gateway, node_of
from harness import node_client, start_app, start_daemon
from wsgw.admission import Refusal
from wsgw.config import Config
from wsgw.connect import ConnectHook, Verdict
from wsgw.interfaces import IConnectHook
from wsgw.router import RouterFactory
from wsgw.web import GatewaySite, make_resource, websocket_factory

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost:40010\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"X-Bfl-User: alice\r\nCookie: auth_token=tok-a\r\n\r\n"
)
PEER = IPv4Address("TCP", "127.0.0.1", 5555)


@implementer(IConnectHook)
class StandInApp:
    """The app's connect URL, answered by the test."""

    def __init__(self):
        self.asked = []  # (Connection, Deferred)
        self.counts = {}
        self.asking = 0

    def admit(self, conn):
        d = Deferred()
        self.asked.append((conn, d))
        return d


def front(hook, **settings):
    clock = Clock()
    config = Config(**settings)
    app = FakeApp()
    gateway = make_gateway(clock, app)
    node = node_of(gateway, config)
    node = type(node)(node.config, node.reactor, node.gateway, node.connections, connect_hook=hook)
    websocket = websocket_factory(node)
    site = GatewaySite(make_resource(node, factory=websocket), config, reactor=clock)
    return app, gateway, RouterFactory(site, websocket, clock, config.handshake_timeout)


def handshake(factory, request=UPGRADE):
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    transport.protocol.dataReceived(request)
    return transport


def status_of(transport):
    return int(transport.value().split(b" ", 2)[1]) if transport.value() else None


def test_nothing_is_answered_until_the_app_admits_then_open_follows_with_the_same_conn_id():
    hook = StandInApp()
    app, gateway, factory = front(hook)
    transport = handshake(factory)
    [(conn, decision)] = hook.asked
    assert (conn.user_name, conn.token, conn.access_public) == ("alice", "tok-a", False)
    assert transport.value() == b"" and app.attempts == [] and len(gateway.registry) == 0
    decision.callback(Verdict())
    assert status_of(transport) == 101
    [(event, _record, _d)] = app.attempts
    assert (event["action"], event["conn_id"]) == ("open", conn.conn_id)


def test_a_refusal_passes_the_apps_status_and_body_and_nothing_else_happens():
    hook = StandInApp()
    app, gateway, factory = front(hook)
    transport = handshake(factory)
    body = b'{"code":4031,"reason":"banned"}\n'
    hook.asked[0][1].callback(Verdict(Refusal(403, "refused by the app", "app", body), "refused"))
    head, _, sent = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ") and sent == body
    assert app.attempts == [] and len(gateway.registry) == 0 and len(gateway.live) == 0
    assert gateway.stats.refused == {"app": 1}


def test_an_app_that_cannot_decide_means_503_with_retry_after():
    hook = StandInApp()
    _app, _gateway, factory = front(hook)
    transport = handshake(factory)
    hook.asked[0][1].callback(
        Verdict(
            Refusal(503, "the app cannot admit connections right now; try again later", "connect_timeout"), "timeout"
        )
    )
    head = transport.value().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in head


def test_waiting_handshakes_count_against_the_limits_and_are_bounded():
    hook = StandInApp()
    _app, gateway, factory = front(hook, max_connections=2, max_connections_per_user=1, connect_max_waiting=10)
    first = handshake(factory)
    second = handshake(factory)  # alice again: her one place is taken by the waiting first
    assert status_of(second) == 429
    bob = handshake(factory, UPGRADE.replace(b"alice", b"bob"))
    carol = handshake(factory, UPGRADE.replace(b"alice", b"carol"))  # two wait: the total is reached
    assert status_of(carol) == 503 and b"limit of 2 connections" in carol.value()
    hook.asked[0][1].callback(Verdict())
    hook.asked[1][1].callback(Verdict())
    assert (status_of(first), status_of(bob), len(gateway.registry)) == (101, 101, 2)


def test_the_number_waiting_for_the_app_is_bounded():
    hook = StandInApp()
    _app, _gateway, factory = front(hook, max_connections=0, max_connections_per_user=0, connect_max_waiting=2)
    handshake(factory, UPGRADE.replace(b"alice", b"u1"))
    handshake(factory, UPGRADE.replace(b"alice", b"u2"))
    third = handshake(factory, UPGRADE.replace(b"alice", b"u3"))
    assert status_of(third) == 503 and b"wait for the app already" in third.value()


def test_a_client_that_hangs_up_while_the_app_decides_costs_nothing_afterwards():
    hook = StandInApp()
    app, gateway, factory = front(hook, max_connections=1)
    transport = handshake(factory)
    decision = hook.asked[0][1]
    transport.protocol.connectionLost(Failure(ConnectionDone()))
    assert decision.called  # cancelled: the question is abandoned
    assert app.attempts == [] and len(gateway.registry) == 0
    # Its place is free again.
    second = handshake(factory, UPGRADE.replace(b"alice", b"bob"))
    hook.asked[1][1].callback(Verdict())
    assert status_of(second) == 101


# -- the connect URL over HTTP (treq's StubTreq as the app) ------------------------------


class ConnectApp(Resource):
    isLeaf = True

    def __init__(self, status=200, body=b"{}", hold=False):
        super().__init__()
        self.status, self.body, self.hold = status, body, hold
        self.seen = []

    def render_POST(self, request):
        self.seen.append((json.loads(request.content.read()), request.requestHeaders))
        request.setResponseCode(self.status)
        return NOT_DONE_YET if self.hold else self.body


def ask(resource, clock=None, timeout=2.0):
    from wsgw.registry import Connection

    stub = StubTreq(resource)
    hook = ConnectHook(stub, "http://127.0.0.1:8888/connect", clock or Clock(), timeout)
    conn = Connection(
        conn_id="c1",
        user_name="ann",
        token="t1",
        access_public=False,
        user_agent="ua",
        remote_addr="203.0.113.9",
        cookie="auth_token=t1",
    )
    d = hook.admit(conn)
    stub.flush()
    return hook, d


def test_the_connect_request_says_who_is_connecting():
    app = ConnectApp()
    hook, d = ask(app)
    [(body, headers)] = app.seen
    assert body == {
        "action": "connect",
        "conn_id": "c1",
        "user_name": "ann",
        "token": "t1",
        "access_public": False,
        "user_agent": "ua",
        "remote_addr": "203.0.113.9",
        "data": {},
    }
    assert headers.getRawHeaders(b"cookie") == [b"auth_token=t1"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.9"]
    assert d.result.admitted and hook.counts == {"admitted": 1}


@pytest.mark.parametrize(
    "status, body, passed",
    [
        (403, b'{"error":"banned"}', b'{"error":"banned"}\n'),
        (401, b"<html>no</html>", b'{"code":401,"message":"the app refused this connection"}\n'),
        (404, b'{"x":"' + b"y" * 5000 + b'"}', b'{"code":404,"message":"the app refused this connection"}\n'),
    ],
)
def test_a_4xx_refuses_with_that_status_and_a_small_json_body_of_the_app(status, body, passed):
    _hook, d = ask(ConnectApp(status, body))
    refusal = d.result.refusal
    assert (refusal.status, refusal.body, d.result.result) == (status, passed, "refused")


def test_a_5xx_or_no_answer_in_time_is_a_503_logged_once_per_outage(log_lines):
    hook, d = ask(ConnectApp(502))
    assert (d.result.refusal.status, d.result.result) == (503, "app_error")
    clock = Clock()
    stub = StubTreq(ConnectApp(hold=True))
    hook.client = stub
    hook.clock = clock
    from wsgw.registry import Connection

    conn = Connection(conn_id="c2", user_name="ann", token="t", access_public=True)
    d = hook.admit(conn)
    stub.flush()
    clock.advance(2.1)
    assert (d.result.refusal.status, d.result.result) == (503, "timeout")
    assert len([line for line in log_lines if "does not decide" in line]) == 1
    hook.client = StubTreq(ConnectApp(200))
    d = hook.admit(conn)
    hook.client.flush()
    assert d.result.admitted
    assert [line for line in log_lines if "decides again" in line]
    assert hook.counts == {"app_error": 1, "timeout": 1, "admitted": 1}


# -- the real daemon -----------------------------------------------------------------------


class Decider(Resource):
    """A real connect URL: mallory is refused, everyone else admitted."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.asked = []

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.asked.append(body)
        if body["user_name"] == "mallory":
            request.setResponseCode(403)
            return b'{"reason":"not today"}'
        return b"{}"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_daemon_asks_the_app_before_every_handshake(tmp_path, node_ws):
    decider = Decider()
    port = reactor.listenTCP(0, Site(decider), interface="127.0.0.1")
    app = start_app()
    connect_url = f"http://127.0.0.1:{port.getHost().port}/connect"
    daemon = await start_daemon("--app-url", app.url, "--connect-url", connect_url, cwd=tmp_path)
    try:
        admitted = await node_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        opened = await app.wait_for_action("open")
        assert opened["conn_id"] == decider.asked[0]["conn_id"]
        with pytest.raises(AssertionError, match="HTTP 403"):
            await node_client(daemon.ws_url, {"X-Bfl-User": "mallory"})
        assert [e["user_name"] for e in app.events if e["action"] == "open"] == ["alice"]
        await admitted.stop()
    finally:
        await daemon.terminate()
        await port.stopListening()
        await app.port.stopListening()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_with_the_connect_url_down_handshakes_fail_closed(tmp_path, node_ws):
    from harness import free_port, scrape, upgrade_request

    daemon = await start_daemon(
        "--connect-url", f"http://127.0.0.1:{free_port()}/connect", "--connect-timeout", "1", cwd=tmp_path
    )
    try:
        status, body = await upgrade_request(daemon.base, user="alice")
        assert status == 503 and "try again later" in body["message"]
        samples = await scrape(daemon)
        assert samples["wsgw_connect_decisions_total|result=unreachable"] == 1
    finally:
        await daemon.terminate()
    assert len([line for line in daemon.log_lines() if "does not decide" in line]) == 1


def test_the_connect_url_is_converted_to_a_uri_once_not_per_handshake():
    """treq converts its URL on every request; the hook hands it one that
    is a URI already (as the event poster does), the same each time."""
    from wsgw.registry import Connection

    seen = []

    class Client:
        def post(self, url, **options):
            seen.append(url)
            return Deferred()

    hook = ConnectHook(Client(), "http://127.0.0.1:9/wsgw/connect", Clock(), 2.0)
    for n in range(2):
        hook.admit(Connection(conn_id=f"c{n}", user_name="alice", token="t", access_public=False))
    assert seen[0] is seen[1] and seen[0].to_uri() is seen[0]
    assert seen[0].to_text() == "http://127.0.0.1:9/wsgw/connect"
