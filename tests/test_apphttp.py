"""
The lean HTTP/1.1 agent that carries event POSTs: what it writes, how it
reads every framing of an answer, when it reuses a connection and when it
gives one up.  All in memory: fake endpoints and string transports.
"""

import pytest
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from wsgw.appclient import AppClient, AppRejected, BytesBody, http_client_for
from wsgw.apphttp import AppAgent, AppPool

URL = b"http://127.0.0.1:8888/ws/message"


class Transport(StringTransport):
    """Ends its protocol's connection when told to, as a socket would."""

    protocol = None
    aborted = False

    def loseConnection(self):
        if not self.disconnecting:
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class Endpoints:
    """Every connect succeeds at once over a fresh L{Transport}."""

    def __init__(self):
        self.transports = []

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def endpoints():
    return Endpoints()


@pytest.fixture
def agent(clock, endpoints):
    return AppAgent(clock, endpoints, AppPool(clock, max_idle=2, idle_timeout=120))


def post(agent, body=b'{"a":1}', headers=None):
    return agent.request(b"POST", URL, Headers(headers or {b"Content-Type": [b"application/json"]}), BytesBody(body))


def answer(transport, data, step=None):
    """Feed the answer to the connection, in pieces of C{step} bytes if given."""
    transport.clear()
    step = step or len(data)
    for i in range(0, len(data), step):
        transport.protocol.dataReceived(data[i : i + step])


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_request_is_written_in_one_piece(agent, endpoints):
    """Request line, the given headers (Accept-Encoding dropped: the
    gateway never reads a body), Host and Content-Length, then the body."""
    headers = {b"Content-Type": [b"application/json"], b"Accept-Encoding": [b"gzip"], b"Cookie": [b"a=b"]}
    post(agent, headers=headers)
    [transport] = endpoints.transports
    written = transport.value()
    head, _, body = written.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /ws/message HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [b"Content-Type: application/json", b"Cookie: a=b", b"Host: 127.0.0.1:8888", b"Content-Length: 7"]
    )
    assert body == b'{"a":1}'


@pytest.mark.parametrize("step", [None, 1])
def test_answer_with_length_then_connection_reused(agent, endpoints, step):
    d = post(agent)
    answer(endpoints.transports[0], OK, step)
    assert d.result.code == 200
    assert d.result.body == b"ok"
    d2 = post(agent)
    assert len(endpoints.transports) == 1
    answer(endpoints.transports[0], b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    assert d2.result.code == 503


@pytest.mark.parametrize("step", [None, 1, 3])
def test_chunked_answer(agent, endpoints, step):
    d = post(agent)
    answer(
        endpoints.transports[0],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n",
        step,
    )
    assert d.result.body == b"hello!"
    post(agent)
    assert len(endpoints.transports) == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_huge_answer_body_is_read_but_not_kept(agent, endpoints, framing):
    """The gateway ignores the app's answer body: past the first 64 KiB it
    is read and dropped, however it is framed, and the connection is reused."""
    from wsgw.apphttp import MAX_KEPT_BODY

    d = post(agent)
    transport = endpoints.transports[0]
    piece, pieces = b"z" * 65536, 64  # 4 MiB in all
    if framing == "length":
        answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces))
        for _ in range(pieces):
            transport.protocol.dataReceived(piece)
    elif framing == "chunked":
        answer(transport, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(pieces):
            transport.protocol.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
        transport.protocol.dataReceived(b"0\r\n\r\n")
    else:
        answer(transport, b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(pieces):
            transport.protocol.dataReceived(piece)
        transport.loseConnection()
    assert d.result.code == 200
    assert len(d.result.body) == MAX_KEPT_BODY
    if framing != "close":
        post(agent)
        assert len(endpoints.transports) == 1


def test_answer_without_length_ends_with_the_connection(agent, endpoints):
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, b"HTTP/1.1 200 OK\r\n\r\npart")
    got = []
    d.addCallback(got.append)
    assert got == []
    transport.loseConnection()
    assert got[0].body == b"part"
    post(agent)
    assert len(endpoints.transports) == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_connection_not_reused_when_the_app_says_so(agent, endpoints, head):
    d = post(agent)
    answer(endpoints.transports[0], head)
    assert d.result.code == 200
    assert endpoints.transports[0].disconnecting
    post(agent)
    assert len(endpoints.transports) == 2


def test_no_body_statuses_and_interim_answers(agent, endpoints):
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert d.result.code == 204
    post(agent)
    assert len(endpoints.transports) == 1


def test_connection_lost_mid_answer_fails_the_request(agent, endpoints):
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    transport.protocol.connectionLost(Failure(ConnectionLost()))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    post(agent)
    assert len(endpoints.transports) == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000,
    ],
)
def test_unreadable_answer_fails_and_drops_the_connection(agent, endpoints, garbage):
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, garbage)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    assert transport.aborted


def test_cancel_aborts_the_connection(agent, endpoints):
    """An attempt that timed out leaves its connection mid-answer: dropped."""
    d = post(agent)
    d.cancel()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(CancelledError)
    assert endpoints.transports[0].aborted
    post(agent)
    assert len(endpoints.transports) == 2


def test_app_talking_out_of_turn_drops_the_idle_connection(agent, endpoints):
    d = post(agent)
    answer(endpoints.transports[0], OK + b"HTTP/1.1 200 OK\r\n")
    assert d.result.code == 200
    assert endpoints.transports[0].disconnecting
    d = post(agent)
    answer(endpoints.transports[1], OK)
    endpoints.transports[1].protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert endpoints.transports[1].aborted
    post(agent)
    assert len(endpoints.transports) == 3


def test_idle_connections_are_bounded_and_expire(agent, endpoints, clock):
    waiting = [post(agent) for _ in range(3)]
    for transport in endpoints.transports:
        answer(transport, OK)
    assert [d.result.code for d in waiting] == [200, 200, 200]
    # At most two are kept idle; the third was closed.
    assert [t.disconnecting for t in endpoints.transports] == [False, False, True]
    clock.advance(121)
    assert all(t.disconnecting for t in endpoints.transports)
    post(agent)
    assert len(endpoints.transports) == 4


def test_through_treq_and_the_app_client(agent, endpoints):
    """The agent's answers go through treq's wrappers to the app client."""
    client = AppClient(http_client_for(agent), URL.decode(), Clock())
    d = client(b"{}", {b"Content-Type": [b"application/json"]})
    answer(endpoints.transports[0], OK)
    assert d.result is None  # delivered, no reply asked for
    d = client(b"{}", {})
    answer(endpoints.transports[0], b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!")
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(AppRejected)


def test_bodies_must_be_in_memory(agent):
    from io import BytesIO

    from twisted.web.client import FileBodyProducer

    d = agent.request(b"POST", URL, Headers(), FileBodyProducer(BytesIO(b"x")))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(TypeError)
