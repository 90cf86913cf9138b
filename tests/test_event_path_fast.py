"""
The cheaper per-event path (issue 12) does what the general path did:
the request head as the agent wrote it before, an answer's headers as
Twisted's C{Headers} keeps them, a reply as treq would read it, the same
bound on every attempt, and Autobahn's message signal for whoever listens.
"""

from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.response import _Response
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import TimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from wsgw import appagent, eventpost
from wsgw.appagent import Answer, AppConnection, AppPool, CheckedHeaders, serialize
from wsgw.eventpost import BadEvent, EventPoster, http_client_for
from wsgw.events import Event

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:8888/ws/message"
TARGET = appagent._target(URL.encode())


# -- the request head -------------------------------------------------------------


def reference_serialize(method: bytes, target: Any, headers: Optional[Headers], body: bytes) -> bytes:
    """The agent's serialize as it was before its per-name cache."""
    appagent._check_token(method, "method")
    lines = [method, b" ", target.path, b" HTTP/1.1\r\n"]
    count = 2
    has_host = False
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower in appagent._FRAMING:
                continue
            appagent._check_token(name, "header name")
            if lower == b"host":
                has_host = True
            for value in values:
                lines += (name, b": ", value, b"\r\n")
                count += 1
    if not has_host:
        lines += (b"Host: ", target.host, b"\r\n")
        count += 1
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
        count += 1
    lines.append(b"\r\n")
    head = b"".join(lines)
    if head.count(b"\r") != count or head.count(b"\n") != count or b"\0" in head:
        raise ValueError("CR, LF or NUL in a header value or the path")
    return head + body


NAMES = st.sampled_from(
    [b"Content-Type", b"X-Wsgw-Event-Id", b"Host", b"Content-Length", b"Connection", b"Transfer-Encoding"]
    + [b"Cookie", b"X-Odd", b"Bad Name", b"Bad:Name", b"", b"x\x00y"]
) | st.binary(min_size=0, max_size=6)
VALUES = st.sampled_from([b"a", b"application/json", b"c1:3", b"x\r\ny", b"x\ny", b"x\0y", b""]) | st.binary(max_size=8)


def _outcome(call: Any) -> Tuple[str, Any]:
    try:
        return ("ok", call())
    except ValueError as e:
        return ("refused", type(e))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from([b"POST", b"GET", b"HEAD", b"PO ST", b"PUT"]),
    lines=st.lists(st.tuples(NAMES, st.lists(VALUES, min_size=1, max_size=2)), max_size=5),
    body=st.sampled_from([b"", b"{}", b'{"a":1}']),
)
def test_serialize_writes_and_refuses_what_it_did_before(method, lines, body) -> None:
    headers = Headers()
    raw: Dict[bytes, List[bytes]] = {}
    for name, values in lines:
        raw.setdefault(name, []).extend(values)
    headers._rawHeaders = raw  # names as given, unchecked: what serialize must check
    assert _outcome(lambda: serialize(method, TARGET, headers, body)) == _outcome(
        lambda: reference_serialize(method, TARGET, headers, body)
    )
    # Twice: what the caches remember changes nothing.
    assert _outcome(lambda: serialize(method, TARGET, headers, body)) == _outcome(
        lambda: reference_serialize(method, TARGET, headers, body)
    )


# -- the answer's headers -----------------------------------------------------------

TOKEN_NAMES = st.sampled_from(
    [b"content-type", b"Content-Type", b"CONTENT-TYPE", b"x-wsgw-reply", b"X-WSGW-Reply", b"www-authenticate"]
    + [b"content-md5", b"te", b"x-xss-protection", b"dnt", b"set-cookie", b"etag", b"x-a", b"keep-alive"]
)
FIELD_VALUES = st.sampled_from([b"1", b"1 2", b"a, b", b"timeout=5", b"", b"\xe9t\xe9"])


def read_answer(head_lines: List[Tuple[bytes, bytes]]) -> Answer:
    pool = AppPool(Clock())
    connection = AppConnection(pool, ("app",))
    connection.makeConnection(StringTransport())
    got: List[Any] = []
    connection.send(b"request").addBoth(got.append)
    head = b"".join(name + b": " + value + b"\r\n" for name, value in head_lines)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\nok")
    [answer] = got
    assert isinstance(answer, Answer), answer
    return answer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TOKEN_NAMES, FIELD_VALUES), max_size=8))
def test_an_answers_headers_are_what_headers_would_hold(head_lines) -> None:
    """Names made canonical as Headers makes them, values in order, and
    every read and comparison as on a Headers built line by line."""
    answer = read_answer(head_lines)
    built = Headers()
    for name, value in head_lines + [(b"Content-Length", b"2")]:
        built.addRawHeader(name, value)
    headers = answer.headers
    assert list(headers.getAllRawHeaders()) == list(built.getAllRawHeaders())
    assert headers == built
    for name, _ in head_lines:
        assert headers.getRawHeaders(name) == built.getRawHeaders(name)
        assert headers.hasHeader(name.lower())
    copy = headers.copy()
    copy.addRawHeader(b"x-more", b"1")
    assert not headers.hasHeader(b"x-more")


def test_a_header_name_headers_refuses_fails_the_answer() -> None:
    from twisted.web.http_headers import InvalidHeaderName

    with pytest.raises(InvalidHeaderName):
        appagent._canonical_name(b"bad name")
    assert b"bad name" not in appagent._CANONICAL_NAMES


# -- the reply ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    status=st.sampled_from([200, 201, 204, 299, 300, 302]),
    reply=st.sampled_from([None, b"1", b" 1", b"0", b"yes"]),
    body=st.binary(max_size=40),
)
def test_a_reply_is_read_as_treq_reads_it(status, reply, body) -> None:
    """The reply taken from an answer read whole is what treq.content
    gives for it, for every status and header value."""
    import treq

    headers = Headers()
    if reply is not None:
        headers.addRawHeader(b"X-Wsgw-Reply", reply)
    answer = Answer((b"HTTP", 1, 1), status, b"OK", headers, body)
    verdict = eventpost._verdict(_Response(answer, None), True)
    assert not isinstance(verdict, Deferred)
    wants = 200 <= status < 300 and reply is not None and reply.strip() == b"1"
    if wants:
        read: List[bytes] = []
        treq.content(_Response(answer, None)).addCallback(read.append)
        assert verdict == read[0]
    else:
        assert verdict is None


# -- the header values -------------------------------------------------------------


def test_an_event_with_a_header_value_it_cannot_send_is_refused_every_time() -> None:
    poster = EventPoster(http_client_for(None), URL, Clock())  # type: ignore[arg-type]
    bad = Event("c1", 0, "message", b"{}", cookie="a=b\r\nX-Evil: 1", remote_addr="127.0.0.1")
    for _ in range(2):
        d = poster.post(bad)
        failure = d.result
        d.addErrback(lambda f: None)
        assert failure.check(BadEvent)


@pytest.mark.parametrize("bad", ["a=b\r\nX-Evil: 1", "a=b\nc", "a=\x00"])
def test_a_header_value_with_cr_lf_or_nul_is_refused(bad) -> None:
    with pytest.raises(BadEvent):
        eventpost._header_value(bad)
    assert eventpost._header_value("a=b; c=d\t") == b"a=b; c=d\t"


def test_request_headers_are_built_once_not_copied() -> None:
    headers = eventpost.request_headers(Event("c1", 3, "open", b"{}", cookie="a=b", remote_addr="10.0.0.1"))
    assert type(headers) is CheckedHeaders
    assert headers == Headers(
        {
            b"Content-Type": [b"application/json"],
            b"X-Wsgw-Event-Id": [b"c1:3"],
            b"X-Forwarded-For": [b"10.0.0.1"],
            b"Cookie": [b"a=b"],
        }
    )


# -- the attempt -------------------------------------------------------------------


class RecordingClient:
    def __init__(self) -> None:
        self.options: List[Dict[str, Any]] = []
        self.pending: List[Deferred[Any]] = []

    def request(self, method: str, url: Any, **options: Any) -> Deferred[Any]:
        self.options.append(dict(options, method=method))
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


def test_treq_is_given_the_posters_clock_not_the_global_reactor() -> None:
    """treq would import the global reactor on every request (for a
    timeout it is not asked for)."""
    clock = Clock()
    client = RecordingClient()
    EventPoster(client, URL, clock).post(Event("c1", 0, "message", b"{}"))  # type: ignore[arg-type]
    assert client.options[0]["reactor"] is clock
    assert client.options[0]["method"] == "POST"
    assert "timeout" not in client.options[0]


class Streamed:
    """An answer over an agent that streams its body."""

    code = 200
    phrase = b"OK"
    version = (b"HTTP", 1, 1)
    length = 2
    request = previousResponse = None

    def __init__(self) -> None:
        self.headers = Headers()
        self.protocols: List[Any] = []

    def deliverBody(self, protocol: Any) -> None:
        self.protocols.append(protocol)


class LaterAgent:
    """Answers when told to, as a real agent does."""

    def __init__(self) -> None:
        self.pending: List[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


def test_an_answer_whose_body_stalls_is_still_bounded() -> None:
    """The head came in time, the body does not: the attempt times out at
    its bound, as a TimeoutError."""
    clock = Clock()
    agent = LaterAgent()
    got: List[Any] = []
    EventPoster(http_client_for(agent), URL, clock, timeout=2).post(Event("c1", 0, "message", b"{}")).addBoth(
        got.append
    )
    clock.advance(1)
    streamed = Streamed()
    agent.pending[0].callback(streamed)
    [protocol] = streamed.protocols
    protocol.dataReceived(b"o")
    assert got == []
    clock.advance(1.01)
    [failure] = got
    assert failure.check(TimeoutError)
    assert clock.getDelayedCalls() == []


def test_an_answer_drained_in_time_is_delivered_and_leaves_no_timer() -> None:
    clock = Clock()
    agent = LaterAgent()
    got: List[Any] = []
    EventPoster(http_client_for(agent), URL, clock, timeout=2).post(Event("c1", 0, "message", b"{}")).addBoth(
        got.append
    )
    streamed = Streamed()
    agent.pending[0].callback(streamed)
    [protocol] = streamed.protocols
    protocol.dataReceived(b"ok")
    assert got == []
    protocol.connectionLost(Failure(ResponseDone()))
    assert got == [None]
    clock.advance(5)  # the one timer runs, finds nothing due, and is not set again
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("status, error", [(503, "AppUnavailable"), (404, "AppRejected")])
def test_an_answer_to_come_is_judged_as_one_at_once(status, error) -> None:
    clock = Clock()
    agent = LaterAgent()
    d = EventPoster(http_client_for(agent), URL, clock).post(Event("c1", 0, "message", b"{}"))
    agent.pending[0].callback(Answer((b"HTTP", 1, 1), status, b"", Headers(), b"x"))
    failure = d.result
    d.addErrback(lambda f: None)
    assert type(failure.value).__name__ == error
    clock.advance(10)
    assert clock.getDelayedCalls() == []


def test_an_answer_with_a_reply_to_come_fires_with_the_reply() -> None:
    clock = Clock()
    agent = LaterAgent()
    d = EventPoster(http_client_for(agent), URL, clock).post(Event("c1", 0, "message", b"{}"))
    agent.pending[0].callback(Answer((b"HTTP", 1, 1), 200, b"", Headers({b"X-Wsgw-Reply": [b"1"]}), b'{"r":1}'))
    assert d.result == b'{"r":1}'
    clock.advance(10)
    assert clock.getDelayedCalls() == []


# -- Autobahn's message signal ------------------------------------------------------


def test_autobahn_keeps_no_listeners_until_one_is_added() -> None:
    """The assumption GatewayProtocol.onMessageEnd relies on."""
    from autobahn.util import ObservableMixin

    observable = ObservableMixin()
    assert observable._listeners is None
    observable.on("message", lambda *a, **k: None)
    assert observable._listeners is not None


def _pair() -> Any:
    from test_protocol_unit import Setup

    setup = Setup()
    server, client, pump = setup.pair()
    return setup, server, client, pump


def test_a_message_reaches_the_app_and_any_listener(monkeypatch) -> None:
    setup, server, client, pump = _pair()
    heard: List[Tuple[bytes, bool]] = []
    server.on("message", lambda payload, is_binary: heard.append((payload, is_binary)))
    client.sendMessage(b'{"n":1}')
    client.sendMessage(b"\x00\x01", isBinary=True)
    # One message in three fragments.
    client.beginMessage()
    for part in (b'{"n"', b":", b"2}"):
        client.sendMessageFrame(part)
    client.endMessage()
    pump.flush()
    assert heard == [(b'{"n":1}', False), (b"\x00\x01", True), (b'{"n":2}', False)]
    setup.app.answer_all()
    messages = [event["data"] for event, _, _ in setup.app.attempts if event["action"] == "message"]
    assert messages == [{"n": 1}, "AAE=", {"n": 2}]
    assert server.message_data is None and server.frame_data is None


def test_a_listener_that_fails_is_logged_as_autobahn_logs_it() -> None:
    from twisted.logger import globalLogPublisher

    setup, server, client, pump = _pair()
    seen: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:

        def broken(payload: bytes, is_binary: bool) -> None:
            raise RuntimeError("listener broke")

        server.on("message", broken)
        client.sendMessage(b'{"n":1}')
        pump.flush()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any("Firing signal 'message' failed" in e.get("log_format", "") for e in seen)
    setup.app.answer_all()
    assert [event["data"] for event, _, _ in setup.app.attempts if event["action"] == "message"] == [{"n": 1}]


def test_no_listener_no_signal() -> None:
    _setup, server, client, pump = _pair()
    fired: List[Any] = []
    server.fire = lambda *a, **k: fired.append(a) or succeed([])
    client.sendMessage(b'{"n":1}')
    pump.flush()
    assert fired == []
    assert server._listeners is None


# -- line ends, answer after answer ----------------------------------------------------


def _answers(raws: List[bytes]) -> List[Any]:
    pool = AppPool(Clock())
    connection = AppConnection(pool, ("app",))
    connection.makeConnection(StringTransport())
    got: List[Any] = []
    for raw in raws:
        if connection.lost or connection.transport.disconnecting:
            break
        connection.send(b"request").addBoth(got.append)
        connection.dataReceived(raw)
    return got


BARE_LF_HEAD = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
CHUNKED_BARE_LF_HEAD = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\r\nok\r\n0\r\n\r\n"
CHUNK_BARE_LF = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "raws, verdicts",
    [
        ([CHUNKED, BARE_LF_HEAD, BARE_LF_HEAD], ["ok", "ok", "ok"]),
        ([BARE_LF_HEAD, CHUNKED_BARE_LF_HEAD, BARE_LF_HEAD], ["ok", "ok", "ok"]),
        ([BARE_LF_HEAD, CHUNK_BARE_LF], ["ok", "failed"]),
        ([CHUNKED, CHUNK_BARE_LF], ["ok", "failed"]),
    ],
)
def test_a_bare_lf_ends_head_lines_of_every_answer_never_a_chunk_line(raws, verdicts) -> None:
    """The parser is lenient about line ends in heads and strict in chunked
    bodies, whatever the connection's earlier answers were framed by."""
    got = _answers(raws)
    assert ["ok" if isinstance(r, Answer) and r.body == b"ok" else "failed" for r in got] == verdicts
    for r in got:
        if isinstance(r, Failure):
            r.trap(Exception)


# -- a batch's event ids ----------------------------------------------------------------


@given(given_id=st.text())
def test_a_batch_names_each_event_as_json_dumps_writes_its_id(given_id):
    import json

    event = Event("c1", 7, "message", b' { "data":1}', given_id=given_id)
    body = eventpost.batch_body([event, Event("c2", 0, "message", b"{}")])
    assert body == b'[{"event_id":' + json.dumps(event.event_id).encode("ascii") + b',"data":1},{"event_id":"c2:0"}]'
    assert json.loads(body) == [{"event_id": event.event_id, "data": 1}, {"event_id": "c2:0"}]


_MEMBERS = st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=4), st.none()), max_size=3)


@given(
    objects=st.lists(
        st.tuples(_MEMBERS, st.sampled_from([(",", ":"), (", ", ": ")]), st.sampled_from(["", " ", "\n "])),
        max_size=4,
    )
)
def test_a_batch_is_its_events_objects_each_with_its_id_first(objects):
    """Whatever each body's spacing, the batch reads back as its events'
    objects in order, each with its id as the first member."""
    import json

    events = [
        Event(f"c{i}", i, "message", (pad + json.dumps(obj, separators=seps) + pad).encode())
        for i, (obj, seps, pad) in enumerate(objects)
    ]
    read = json.loads(eventpost.batch_body(events))
    assert read == [{"event_id": e.event_id, **obj} for e, (obj, _, _) in zip(events, objects)]
    assert [next(iter(entry)) for entry in read] == ["event_id"] * len(events)
