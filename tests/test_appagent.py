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
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from fakes import tcp_pair
from wsgw.appagent import AppAgent, AppPool, BytesBody
from wsgw.eventpost import EventPoster, http_client_for
from wsgw.events import Event
from wsgw.forwarder import AppRejected

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


def test_request_is_written_in_one_piece(agent, endpoints) -> None:
    """Request line, the given headers as given, Host and Content-Length,
    then the body."""
    headers = {b"Content-Type": [b"application/json"], b"Accept-Encoding": [b"gzip"], b"Cookie": [b"a=b"]}
    post(agent, headers=headers)
    [transport] = endpoints.transports
    written = transport.value()
    head, _, body = written.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /ws/message HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [
            b"Content-Type: application/json",
            b"Accept-Encoding: gzip",
            b"Cookie: a=b",
            b"Host: 127.0.0.1:8888",
            b"Content-Length: 7",
        ]
    )
    assert body == b'{"a":1}'


@pytest.mark.parametrize("step", [None, 1])
def test_answer_with_length_then_connection_reused(agent, endpoints, step) -> None:
    d = post(agent)
    answer(endpoints.transports[0], OK, step)
    assert d.result.code == 200
    assert d.result.body == b"ok"
    d2 = post(agent)
    assert len(endpoints.transports) == 1
    answer(endpoints.transports[0], b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    assert d2.result.code == 503


@pytest.mark.parametrize("step", [None, 1, 3])
def test_chunked_answer(agent, endpoints, step) -> None:
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
def test_a_huge_answer_body_is_read_but_not_kept(agent, endpoints, framing) -> None:
    """The gateway ignores the app's answer body: past the first 64 KiB it
    is read and dropped, however it is framed, and the connection is reused."""
    from wsgw.appagent import MAX_KEPT_BODY

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


def test_answer_without_length_ends_with_the_connection(agent, endpoints) -> None:
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
def test_connection_not_reused_when_the_app_says_so(agent, endpoints, head) -> None:
    d = post(agent)
    answer(endpoints.transports[0], head)
    assert d.result.code == 200
    assert endpoints.transports[0].disconnecting
    post(agent)
    assert len(endpoints.transports) == 2


def test_no_body_statuses_and_interim_answers(agent, endpoints) -> None:
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert d.result.code == 204
    post(agent)
    assert len(endpoints.transports) == 1


def test_connection_lost_mid_answer_fails_the_request(agent, endpoints) -> None:
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
def test_unreadable_answer_fails_and_drops_the_connection(agent, endpoints, garbage) -> None:
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, garbage)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    assert transport.aborted


def test_cancel_aborts_the_connection(agent, endpoints) -> None:
    """An attempt that timed out leaves its connection mid-answer: dropped."""
    d = post(agent)
    d.cancel()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(CancelledError)
    assert endpoints.transports[0].aborted
    post(agent)
    assert len(endpoints.transports) == 2


def test_app_talking_out_of_turn_drops_the_idle_connection(agent, endpoints) -> None:
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


def test_idle_connections_are_bounded_and_expire(agent, endpoints, clock) -> None:
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


def test_through_treq_and_the_event_poster(agent, endpoints) -> None:
    """The agent's answers go through treq's wrappers to the event poster;
    each layer adds its own headers once and nothing strips any."""
    poster = EventPoster(http_client_for(agent), URL.decode(), Clock())
    d = poster.post(Event("c1", 0, "open", b"{}", remote_addr="::1"))
    written = endpoints.transports[0].value()
    answer(endpoints.transports[0], OK)
    assert d.result is None  # delivered, no reply asked for
    head = written.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /ws/message HTTP/1.1"
    names = sorted(line.partition(b":")[0].lower() for line in head[1:])
    assert names == [
        b"accept-encoding",
        b"content-length",
        b"content-type",
        b"host",
        b"x-forwarded-for",
        b"x-wsgw-event-id",
    ]
    d = poster.post(Event("c1", 1, "close", b"{}"))
    answer(endpoints.transports[0], b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!")
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(AppRejected)


def test_bodies_must_be_in_memory(agent) -> None:
    from io import BytesIO

    from twisted.web.client import FileBodyProducer

    d = agent.request(b"POST", URL, Headers(), FileBodyProducer(BytesIO(b"x")))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(TypeError)


# The defects of issue 11, each pinned.


@pytest.mark.parametrize("step", [None, 1])
def test_answer_whose_lines_end_in_a_bare_lf_is_read_at_once(agent, endpoints, step) -> None:
    """Twisted's own client reads such answers; this one hung until the
    attempt timed out."""
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", step)
    assert d.result.code == 200
    assert d.result.body == b"ok"
    post(agent)
    assert len(endpoints.transports) == 1


@pytest.mark.parametrize(
    "chunks",
    [
        b"2\r\nokXX0\r\n\r\n",  # no CRLF after the chunk's data
        b"2\r\nok0\r\n\r\n",
        b"2\r\nokk\r\n0\r\n\r\n",  # one byte more than announced
    ],
)
def test_the_crlf_after_each_chunk_is_checked(agent, endpoints, chunks) -> None:
    """A mis-framed chunked answer fails and drops its connection instead
    of leaving bytes that the next answer would be read from."""
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    assert transport.aborted


@pytest.mark.parametrize("value", [b"+1_0", b"1_0", b"+10", b" 1 0", b"0x0a", b"10, 11", b"-10"])
def test_content_length_is_decimal_digits_only(agent, endpoints, value) -> None:
    """int() reads '+1_0' as 10; the framing would then differ from what
    any other reader of the answer sees."""
    d = post(agent)
    transport = endpoints.transports[0]
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n0123456789")
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    assert transport.aborted


def test_content_length_with_leading_zeros_is_decimal(agent, endpoints) -> None:
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nContent-Length: 010\r\n\r\n0123456789")
    assert d.result.body == b"0123456789"


def test_head_answer_ends_with_its_head(agent, endpoints) -> None:
    """The answer to HEAD has no body whatever its Content-Length says;
    it hung waiting for one."""
    d = agent.request(b"HEAD", URL, Headers())
    transport = endpoints.transports[0]
    assert transport.value().startswith(b"HEAD /ws/message HTTP/1.1\r\n")
    assert b"Content-Length" not in transport.value()
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert d.result.code == 200
    assert d.result.body == b""
    assert d.result.headers.getRawHeaders(b"content-length") == [b"10"]


@pytest.mark.parametrize("method", [b"GET", b"DELETE", b"OPTIONS"])
def test_other_methods_are_framed_like_post(agent, endpoints, method) -> None:
    d = agent.request(method, URL, Headers())
    answer(endpoints.transports[0], OK)
    assert d.result.body == b"ok"


class RawHeaders(Headers):
    """Headers as an IAgent may be given them by anyone: unsanitised."""

    def __init__(self, pairs):
        super().__init__()
        self._pairs = pairs

    def getAllRawHeaders(self):
        return iter(self._pairs)


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"X-A", [b"a\r\nX-Injected: 1"])],
        [(b"X-A", [b"a\nb"])],
        [(b"X-A", [b"a\rb"])],
        [(b"X-A", [b"a\x00b"])],
        [(b"X A", [b"a"])],
        [(b"X-A:", [b"a"])],
        [(b"", [b"a"])],
    ],
)
def test_a_header_the_agent_cannot_write_is_refused_where_it_writes_requests(agent, endpoints, pairs) -> None:
    """Not left to Headers' sanitising one layer up: a value with CR, LF
    or NUL, or a name that is not a token, fails the request unsent."""
    d = agent.request(b"POST", URL, RawHeaders(pairs), BytesBody(b"{}"))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ValueError)
    assert endpoints.transports == []


def test_a_nul_through_twisted_headers_is_refused_too(agent, endpoints) -> None:
    d = post(agent, headers={b"X-A": [b"a\x00b"]})
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ValueError)
    assert endpoints.transports == []


def test_a_bad_method_is_refused(agent, endpoints) -> None:
    d = agent.request(b"PO ST", URL, Headers())
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ValueError)


@pytest.mark.parametrize("lost", [ConnectionDone(), ConnectionLost()], ids=["closed", "reset"])
def test_stale_pooled_connection_is_retried_at_once_on_a_new_one(agent, endpoints, lost) -> None:
    """The app closed the idle keep-alive as the request went out: no byte
    of an answer came, so the request goes out again at once, not after the
    forwarder's back-off."""
    d = post(agent)
    answer(endpoints.transports[0], OK)
    assert d.result.code == 200
    d = post(agent, body=b'{"b":2}')
    stale = endpoints.transports[0]
    assert stale.value().endswith(b'{"b":2}')
    got = []
    d.addBoth(got.append)
    stale.protocol.connectionLost(Failure(lost))
    assert got == []
    assert len(endpoints.transports) == 2
    fresh = endpoints.transports[1]
    assert fresh.value().endswith(b'{"b":2}')
    answer(fresh, OK)
    assert got[0].code == 200


def test_a_fresh_connection_lost_before_any_answer_is_not_retried(agent, endpoints) -> None:
    """Only a reused connection can be stale: on a new one the forwarder's
    back-off decides."""
    d = post(agent)
    endpoints.transports[0].protocol.connectionLost(Failure(ConnectionLost()))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseNeverReceived)
    assert len(endpoints.transports) == 1


def test_stale_retry_happens_once(agent, endpoints) -> None:
    d = post(agent)
    answer(endpoints.transports[0], OK)
    d = post(agent)
    endpoints.transports[0].protocol.connectionLost(Failure(ConnectionLost()))
    endpoints.transports[1].protocol.connectionLost(Failure(ConnectionLost()))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseNeverReceived)
    assert len(endpoints.transports) == 2


def test_no_retry_once_part_of_the_answer_arrived(agent, endpoints) -> None:
    d = post(agent)
    answer(endpoints.transports[0], OK)
    d = post(agent)
    endpoints.transports[0].protocol.dataReceived(b"HTTP/1.1 2")
    endpoints.transports[0].protocol.connectionLost(Failure(ConnectionLost()))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)
    assert len(endpoints.transports) == 1


def test_cancel_during_the_stale_retry_aborts_the_new_connection(agent, endpoints) -> None:
    post(agent)
    answer(endpoints.transports[0], OK)
    d = post(agent)
    endpoints.transports[0].protocol.connectionLost(Failure(ConnectionLost()))
    d.cancel()
    d.addErrback(lambda f: None)
    assert endpoints.transports[1].aborted


@pytest.mark.parametrize(
    "hint, kept",
    [
        (b"timeout=5", 4.5),
        (b"timeout=5, max=1000", 4.5),
        (b"max=100, timeout=2", 1.5),
        (b"timeout=300", 120),  # never longer than the pool's own bound
    ],
)
def test_keep_alive_timeout_bounds_the_pooled_connection(agent, endpoints, clock, hint, kept) -> None:
    """Keep-Alive: timeout=N: the connection leaves the pool KEEP_ALIVE_MARGIN
    (0.5 s) before the app would close it."""
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: " + hint + b"\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 200
    clock.advance(kept - 0.01)
    assert not endpoints.transports[0].disconnecting
    clock.advance(0.02)
    assert endpoints.transports[0].disconnecting
    post(agent)
    assert len(endpoints.transports) == 2


@pytest.mark.parametrize("hint", [b"timeout=0", b"timeout=0, max=5"])
def test_keep_alive_timeout_too_short_to_reuse(agent, endpoints, hint) -> None:
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: " + hint + b"\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 200
    assert endpoints.transports[0].disconnecting
    post(agent)
    assert len(endpoints.transports) == 2


@pytest.mark.parametrize("hint", [b"timeout=abc", b"timeouts=1", b"max=1"])
def test_keep_alive_without_a_timeout_keeps_the_pools_bound(agent, endpoints, clock, hint) -> None:
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: " + hint + b"\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 200
    clock.advance(119)
    assert not endpoints.transports[0].disconnecting


def test_status_101_is_not_an_answer_to_a_post(agent, endpoints) -> None:
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ResponseFailed)


def test_app_connections_turn_nagle_off() -> None:
    """A request larger than a segment would have its last segment wait
    for the app's delayed ACK with Nagle on."""
    from twisted.internet.interfaces import ITCPTransport
    from twisted.internet.protocol import Protocol
    from zope.interface import implementer

    from wsgw.appagent import _NoDelayEndpoint

    @implementer(ITCPTransport)
    class TCPTransport(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    class Endpoint:
        def connect(self, factory):
            protocol = Protocol()
            protocol.makeConnection(TCPTransport())
            return succeed(protocol)

    protocol = _NoDelayEndpoint(Endpoint()).connect(None).result
    assert protocol.transport.no_delay is True


def test_endpoints_are_built_once_per_app_address() -> None:
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import URI

    from wsgw.appagent import AppEndpoints

    endpoints = AppEndpoints(MemoryReactorClock())
    first = endpoints.endpointForURI(URI.fromBytes(URL))
    assert endpoints.endpointForURI(URI.fromBytes(URL)) is first
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8889/")) is not first


def test_how_much_of_a_body_is_kept_is_the_agents_choice(clock, endpoints) -> None:
    agent = AppAgent(clock, endpoints, AppPool(clock), max_kept_body=10)
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert d.result.body == b"x" * 10


def test_an_inline_reply_through_treq_and_the_agent(agent, endpoints) -> None:
    poster = EventPoster(http_client_for(agent), URL.decode(), Clock())
    d = poster.post(Event("c1", 0, "message", b"{}"))
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nX-Wsgw-Reply: 1\r\nContent-Length: 5\r\n\r\nhello")
    assert d.result == b"hello"


def test_the_pool_keeps_one_timer_however_many_connections_idle(agent, endpoints, clock) -> None:
    """A connection goes back to the pool after every answer: one timer
    serves them all, running when the earliest must leave."""
    waiting = [post(agent), post(agent)]
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n")
    answer(endpoints.transports[1], OK)
    assert [d.result.code for d in waiting] == [200, 200]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.51)
    assert [t.disconnecting for t in endpoints.transports] == [True, False]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(120)
    assert [t.disconnecting for t in endpoints.transports] == [True, True]
    assert clock.getDelayedCalls() == []


def test_a_shorter_keep_alive_brings_the_timer_forward(agent, endpoints, clock) -> None:
    d = post(agent)
    answer(endpoints.transports[0], OK)  # kept 120 s
    assert d.result.code == 200
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 200
    clock.advance(1.51)
    assert endpoints.transports[0].disconnecting


def test_a_connection_past_its_time_is_not_taken_when_the_timer_is_late(agent, endpoints, clock) -> None:
    """A busy reactor may run the pool's timer late: a connection whose
    time is up is closed when met, never used."""
    d = post(agent)
    answer(endpoints.transports[0], b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2\r\nContent-Length: 0\r\n\r\n")
    assert d.result.code == 200
    clock.rightNow += 1.6  # time passes, the timer has not run yet
    post(agent)
    assert endpoints.transports[0].disconnecting
    assert len(endpoints.transports) == 2


def app_connection_over_tcp():
    """An AppConnection on Twisted's TCP client transport over a socket pair; the peer's end."""
    from wsgw.appagent import AppConnection

    transport, peer, _reactor = tcp_pair(client=True)
    connection = AppConnection(AppPool(Clock()), ("app",))
    connection.makeConnection(transport)
    return connection, transport, peer


def test_a_request_goes_out_at_once_over_tcp() -> None:
    """Over plain TCP the request is sent in the call, not on the
    reactor's next turn."""
    connection, transport, peer = app_connection_over_tcp()
    connection.send(b"request one")
    assert peer.recv(100) == b"request one"
    assert not transport.dataBuffer and not transport._tempDataBuffer
    transport.socket.close()
    peer.close()


def test_a_request_behind_buffered_bytes_waits_behind_them() -> None:
    """Once anything waits in Twisted's buffer, a request goes behind it:
    bytes never overtake each other."""
    connection, transport, peer = app_connection_over_tcp()
    transport.write(b"earlier;")  # buffered until the reactor's next turn
    connection.send(b"request one")
    assert transport._tempDataBuffer == [b"earlier;", b"request one"]
    transport.doWrite()
    assert peer.recv(100) == b"earlier;request one"
    transport.socket.close()
    peer.close()


def test_a_closing_transport_is_written_as_twisted_writes() -> None:
    connection, transport, peer = app_connection_over_tcp()
    transport.disconnecting = True
    connection.send(b"late")
    assert transport._tempDataBuffer == [b"late"]
    transport.socket.close()
    peer.close()
