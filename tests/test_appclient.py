"""
One POST attempt: what the app receives, and how its answers are judged.
"""

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from wsgw.appclient import AppClient, AppRejected, AppUnavailable


class App(Resource):
    isLeaf = True

    def __init__(self, status):
        super().__init__()
        self.status = status
        self.seen = []

    def render_POST(self, request):
        self.seen.append((request.path, request.requestHeaders, request.content.read()))
        request.setResponseCode(self.status)
        return b"ignored"


def attempt(status):
    app = App(status)
    stub = StubTreq(app)
    client = AppClient(stub, "http://127.0.0.1:8888/ws/message", Clock())
    d = client(b'{"action":"open"}', {b"Content-Type": [b"application/json"], b"Cookie": [b"auth_token=a"]})
    stub.flush()
    return app, d


def test_event_posted_with_headers_and_body():
    app, d = attempt(200)
    assert d.result is None  # delivered, no reply asked for
    [(path, headers, body)] = app.seen
    assert path == b"/ws/message"
    assert json.loads(body) == {"action": "open"}
    assert headers.getRawHeaders(b"cookie") == [b"auth_token=a"]
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]


@pytest.mark.parametrize(
    "status, error",
    [
        (500, AppUnavailable),
        (503, AppUnavailable),
        (429, AppUnavailable),
        (408, AppUnavailable),
        (400, AppRejected),
        (404, AppRejected),
    ],
)
def test_failure_kinds(status, error):
    _, d = attempt(status)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(error)
    assert str(status) in failure.getErrorMessage()


@pytest.mark.parametrize("status", [301, 302, 303, 307])
def test_redirect_is_an_answer_not_followed(status):
    app, d = attempt(status)
    assert d.result is None  # delivered
    assert len(app.seen) == 1


class StalledClient:
    """An HTTP client whose app sent headers and then nothing more."""

    def __init__(self):
        self.requests = []

    def post(self, url, data, headers, **options):
        d = Deferred(lambda d: self.requests.append("cancelled"))
        self.requests.append(url)
        return d


def test_attempt_is_bounded_as_a_whole():
    clock = Clock()
    stalled = StalledClient()
    d = AppClient(stalled, "http://127.0.0.1:8888/ws/message", clock, timeout=2)(b"{}", {})
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(Exception)
    assert stalled.requests[-1] == "cancelled"


def test_app_connections_turn_nagle_off():
    """Headers and body go out in separate writes; with Nagle on, every
    event would wait for the app's delayed ACK."""
    from twisted.internet.interfaces import ITCPTransport
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import StringTransport
    from zope.interface import implementer

    from wsgw.appclient import _NoDelayEndpoint

    @implementer(ITCPTransport)
    class TCPTransport(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    class Endpoint:
        def connect(self, factory):
            protocol = Protocol()
            protocol.makeConnection(TCPTransport())
            from twisted.internet.defer import succeed

            return succeed(protocol)

    protocol = _NoDelayEndpoint(Endpoint()).connect(None).result
    assert protocol.transport.no_delay is True


class CookieSetter(App):
    def render_POST(self, request):
        request.addCookie(b"session", b"app-secret", path=b"/")
        return super().render_POST(request)


def test_cookies_the_app_sets_are_never_sent_with_later_events():
    """A Set-Cookie answered to one connection's event must not ride along
    with the events of connections that sent no cookie of their own."""
    from treq.testing import RequestTraversalAgent

    from wsgw.appclient import http_client_for

    app = CookieSetter(200)
    agent = RequestTraversalAgent(app)
    client = AppClient(http_client_for(agent), "http://127.0.0.1:8888/ws/message", Clock())
    first = client(b"{}", {b"Cookie": [b"auth_token=a"]})
    agent.flush()
    second = client(b"{}", {})
    agent.flush()
    assert (first.result, second.result) == (None, None)  # both delivered
    assert app.seen[0][1].getRawHeaders(b"cookie") == [b"auth_token=a"]
    assert app.seen[1][1].getRawHeaders(b"cookie") is None


@pytest.mark.parametrize(
    "url, host",
    [
        ("http://127.0.0.1:8888/ws/message", b"127.0.0.1:8888"),
        ("http://app.example/ws/message", b"app.example"),
        ("https://app.example:443/ws", b"app.example"),
    ],
)
def test_host_header_names_the_app(url, host):
    """The Host header is computed once from the URL, as the agent would."""
    from treq.testing import RequestTraversalAgent

    from wsgw.appclient import http_client_for

    app = App(200)
    agent = RequestTraversalAgent(app)
    d = AppClient(http_client_for(agent), url, Clock())(b"{}", {})
    agent.flush()
    assert d.result is None  # delivered, no reply asked for
    assert app.seen[0][1].getRawHeaders(b"host") == [host]


def test_body_is_written_in_one_call_with_its_length():
    """No cooperator task per request: the whole body goes out at once."""
    from twisted.internet.testing import StringTransport

    from wsgw.appclient import BytesBody

    body = BytesBody(b'{"action":"open"}')
    consumer = StringTransport()
    d = body.startProducing(consumer)
    assert body.length == 17
    assert consumer.value() == b'{"action":"open"}'
    assert d.called
