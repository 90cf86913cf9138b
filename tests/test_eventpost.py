"""
One POST attempt per event: the request built from the record, how the
app's answers are judged, and what the treq layers under it add (nothing
another layer has to take away).
"""

import json

import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from wsgw.appagent import BytesBody
from wsgw.eventpost import BadEvent, EventPoster, NoCookieJar, http_client_for
from wsgw.events import Event
from wsgw.forwarder import AppRejected, AppUnavailable
from wsgw.interfaces import IEventSink

URL = "http://127.0.0.1:8888/ws/message"


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


def event(cookie="auth_token=a", seq=3, remote_addr="203.0.113.9"):
    return Event("c1", seq, "open", b'{"action":"open"}', cookie=cookie, remote_addr=remote_addr)


def attempt(status, record=None):
    app = App(status)
    stub = StubTreq(app)
    d = EventPoster(stub, URL, Clock()).post(record or event())
    stub.flush()
    return app, d


def test_provides_the_event_sink() -> None:
    assert verifyObject(IEventSink, EventPoster(StubTreq(App(200)), URL, Clock()))


def test_request_built_from_the_record() -> None:
    """Body, JSON type, the event's id, the client's address and cookie."""
    app, d = attempt(200)
    assert d.result is None  # delivered, no reply asked for
    [(path, headers, body)] = app.seen
    assert path == b"/ws/message"
    assert json.loads(body) == {"action": "open"}
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"x-wsgw-event-id") == [b"c1:3"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.9"]
    assert headers.getRawHeaders(b"cookie") == [b"auth_token=a"]


def test_no_cookie_header_without_a_cookie() -> None:
    app, d = attempt(200, event(cookie=""))
    assert d.result is None  # delivered, no reply asked for
    assert app.seen[0][1].getRawHeaders(b"cookie") is None


def test_header_text_is_utf8_with_errors_replaced() -> None:
    app, d = attempt(200, event(cookie="n=\u00e9", remote_addr="\ud800"))
    assert d.result is None  # delivered, no reply asked for
    headers = app.seen[0][1]
    assert headers.getRawHeaders(b"cookie") == ["n=\u00e9".encode()]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"?"]


@pytest.mark.parametrize(
    "record",
    [
        event(cookie="a=b\r\nX-Injected: 1"),
        event(cookie="a=b\nc"),
        event(cookie="a=\0"),
        event(remote_addr="1.2.3.4\r\n"),
        Event("c\r\n1", 0, "open", b"{}"),
    ],
)
def test_a_header_value_with_cr_lf_or_nul_is_refused_when_the_request_is_built(record) -> None:
    """Twisted's Headers would turn CR and LF into spaces without a word:
    the record is refused before any request exists, as a rejection (no
    retry can mend it)."""
    app, d = attempt(200, record)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(BadEvent)
    assert failure.check(AppRejected)
    assert app.seen == []


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
def test_failure_kinds(status, error) -> None:
    _, d = attempt(status)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(error)
    assert str(status) in failure.getErrorMessage()


@pytest.mark.parametrize("status", [301, 302, 303, 307])
def test_redirect_is_an_answer_not_followed(status) -> None:
    app, d = attempt(status)
    assert d.result is None  # delivered
    assert len(app.seen) == 1


class StalledClient:
    """An HTTP client whose app sent headers and then nothing more."""

    def __init__(self):
        self.requests = []
        self.deferreds = []

    def request(self, method, url, data, headers, **options):
        assert method == "POST"
        d = Deferred(lambda d: self.requests.append("cancelled"))
        self.requests.append(url)
        self.deferreds.append(d)
        return d


class Answered:
    """A 204 as treq hands over one of AppAgent's whole answers."""

    def __init__(self):
        from twisted.web.http_headers import Headers

        from wsgw.appagent import Answer

        self.original = Answer((b"HTTP", 1, 1), 204, b"No Content", Headers())
        self.code = 204
        self.headers = self.original.headers


def test_attempt_is_bounded_as_a_whole() -> None:
    clock = Clock()
    stalled = StalledClient()
    d = EventPoster(stalled, URL, clock, timeout=2).post(event())
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(Exception)
    assert stalled.requests[-1] == "cancelled"


def test_attempts_share_one_timer_each_bounded_from_its_own_start() -> None:
    """One timer for all attempts, not one each; every attempt still times
    out exactly when its own bound has passed, as a TimeoutError, and one
    answered in time is left alone."""
    from twisted.internet.error import TimeoutError

    clock = Clock()
    stalled = StalledClient()
    poster = EventPoster(stalled, URL, clock, timeout=2)
    first = poster.post(event(seq=1))
    clock.advance(0.5)
    second = poster.post(event(seq=2))
    answer = stalled.deferreds[-1]
    third = poster.post(event(seq=3))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.49)
    assert not first.called
    clock.advance(0.02)  # 2.01 s after the first began
    assert first.result.check(TimeoutError)
    first.addErrback(lambda f: None)
    assert not second.called
    answer.callback(Answered())  # in time
    assert second.result is None
    clock.advance(0.48)
    assert not third.called
    clock.advance(0.02)
    assert third.result.check(TimeoutError)
    third.addErrback(lambda f: None)
    assert stalled.requests.count("cancelled") == 2
    assert clock.getDelayedCalls() == []


def test_an_attempt_cancelled_by_its_caller_is_not_a_timeout() -> None:
    from twisted.internet.defer import CancelledError

    clock = Clock()
    d = EventPoster(StalledClient(), URL, clock, timeout=2).post(event())
    d.cancel()
    assert d.result.check(CancelledError)
    d.addErrback(lambda f: None)
    clock.advance(3)
    assert clock.getDelayedCalls() == []


def test_an_attempt_answered_at_once_takes_no_timer() -> None:
    """StubTreq answers within the call: nothing is left to bound."""
    clock = Clock()
    poster = EventPoster(StubTreq(App(200)), URL, clock)
    d = poster.post(event())
    assert d.result is None
    assert clock.getDelayedCalls() == []


def test_request_headers_are_headers_in_every_respect() -> None:
    """The poster's headers skip Headers' per-value work (names canonical,
    values checked already) but read, compare and copy as Headers do."""
    from twisted.web.http_headers import Headers

    from wsgw.eventpost import request_headers

    built = request_headers(event())
    plain = Headers(dict(built.getAllRawHeaders()))
    assert built == plain
    assert list(built.getAllRawHeaders()) == list(plain.getAllRawHeaders())  # names as Headers writes them
    copy = built.copy()
    assert type(copy) is type(built) and copy == built
    copy.addRawHeader(b"X-Wsgw-Event-Id", b"more")
    copy.addRawHeader(b"Accept-Encoding", b"gzip")
    assert built.getRawHeaders(b"x-wsgw-event-id") == [b"c1:3"]
    assert not built.hasHeader(b"accept-encoding")


def test_an_answer_not_read_whole_is_drained_before_the_verdict() -> None:
    """Over an agent that streams bodies, the poster reads the body out
    before it judges, so that agent's connection can be reused."""
    from twisted.internet.defer import succeed
    from twisted.internet.protocol import Protocol
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone
    from twisted.web.http_headers import Headers

    delivered = []

    class Streamed:
        code = 200
        phrase = b"OK"
        version = (b"HTTP", 1, 1)
        headers = Headers()
        length = 2
        request = previousResponse = None

        def deliverBody(self, protocol: Protocol) -> None:
            delivered.append(protocol)

    class Agent:
        def request(self, method, uri, headers=None, bodyProducer=None):
            return succeed(Streamed())

    verdicts = []
    EventPoster(http_client_for(Agent()), URL, Clock()).post(event()).addBoth(verdicts.append)
    [protocol] = delivered
    protocol.dataReceived(b"ok")
    assert verdicts == []  # still reading
    protocol.connectionLost(Failure(ResponseDone()))
    assert verdicts == [None]


class CookieSetter(App):
    def render_POST(self, request):
        request.addCookie(b"session", b"app-secret", path=b"/")
        return super().render_POST(request)


def test_cookies_the_app_sets_are_never_sent_with_later_events() -> None:
    """A Set-Cookie answered to one connection's event must not ride along
    with the events of connections that sent no cookie of their own."""
    app = CookieSetter(200)
    agent = RequestTraversalAgent(app)
    poster = EventPoster(http_client_for(agent), URL, Clock())
    first = poster.post(event())
    agent.flush()
    second = poster.post(event(cookie=""))
    agent.flush()
    assert (first.result, second.result) == (None, None)
    assert app.seen[0][1].getRawHeaders(b"cookie") == [b"auth_token=a"]
    assert app.seen[1][1].getRawHeaders(b"cookie") is None


def test_the_cookie_jar_keeps_nothing() -> None:
    from http.cookiejar import Cookie

    jar = NoCookieJar()
    jar.set_cookie(Cookie(0, "a", "b", None, False, "x", False, False, "/", False, False, None, False, None, None, {}))
    assert list(jar) == []
    assert len(jar) == 0


def test_the_treq_client_keeps_the_jar_it_is_given() -> None:
    """treq keeps the jar given (an empty jar is falsy: a treq that wrote
    `cookiejar or CookieJar()` would drop it)."""
    client = http_client_for(RequestTraversalAgent(App(200)))
    assert isinstance(client._cookiejar, NoCookieJar)


@pytest.mark.parametrize(
    "url, host",
    [
        ("http://127.0.0.1:8888/ws/message", b"127.0.0.1:8888"),
        ("http://app.example/ws/message", b"app.example"),
        ("https://app.example:443/ws", b"app.example"),
    ],
)
def test_host_header_names_the_app(url, host) -> None:
    """Host comes from the agent under treq (here treq's own test agent)."""
    app = App(200)
    agent = RequestTraversalAgent(app)
    d = EventPoster(http_client_for(agent), url, Clock()).post(event())
    agent.flush()
    assert d.result is None  # delivered, no reply asked for
    assert app.seen[0][1].getRawHeaders(b"host") == [host]


def test_body_goes_to_treq_as_bytes_written_in_one_call() -> None:
    """No cooperator task per request: treq turns the body into a
    BytesBody, which writes it at once with its length known."""
    from twisted.internet.testing import StringTransport

    client = http_client_for(RequestTraversalAgent(App(200)))
    body = client._data_to_body_producer(b'{"action":"open"}')
    assert isinstance(body, BytesBody)
    consumer = StringTransport()
    d = body.startProducing(consumer)
    assert body.length == 17
    assert consumer.value() == b'{"action":"open"}'
    assert d.called


@pytest.mark.parametrize(
    "url, sent",
    [
        ("http://127.0.0.1:8888/ws/message", b"http://127.0.0.1:8888/ws/message"),
        ("http://b\u00fccher.example/ws/\u00e9v?x=\u00e9", b"http://xn--bcher-kva.example/ws/%C3%A9v?x=%C3%A9"),
    ],
)
def test_the_url_becomes_a_uri_once(url, sent) -> None:
    """treq converts the URL it is given to a URI on every request (66 µs
    for the app's one URL); the poster hands it one that is a URI already,
    converted once by hyperlink itself, and treq sends the same bytes."""
    from wsgw.appagent import PreparedURL

    uri = PreparedURL.of(url)
    assert uri.to_uri() is uri
    assert uri.to_text().encode("ascii") == sent

    seen = []

    class Agent:
        def request(self, method, uri, headers=None, bodyProducer=None):
            seen.append(uri)
            return Deferred()

    EventPoster(http_client_for(Agent()), url, Clock()).post(event())
    assert seen == [sent]


def test_a_url_that_cannot_be_a_uri_fails_each_attempt_not_the_start() -> None:
    """hyperlink cannot IDNA-encode an IPv6 literal: treq fails each
    request to it, as it did; the poster is built all the same."""
    poster = EventPoster(StubTreq(App(200)), "http://[::1]:8080/ws", Clock())
    d = poster.post(event())
    failure = d.result
    d.addErrback(lambda f: None)
    assert not failure.check(AppRejected)


class Replier(App):
    """Answers with C{body}, and the reply header when C{reply}."""

    def __init__(self, status, body, reply="1"):
        super().__init__(status)
        self.body = body
        self.reply = reply

    def render_POST(self, request):
        super().render_POST(request)
        if self.reply is not None:
            request.setHeader(b"X-Wsgw-Reply", self.reply.encode())
        return self.body


@pytest.mark.parametrize(
    "status, reply, body, expected",
    [
        (200, "1", b'{"answer":42}', b'{"answer":42}'),
        (201, "1", b"", b""),
        (200, None, b"ignored", None),  # no header: the body means nothing
        (200, "0", b"ignored", None),
        (302, "1", b"ignored", None),  # only a 2xx answer replies
    ],
)
def test_inline_reply_is_the_answers_body_when_asked(status, reply, body, expected) -> None:
    app = Replier(status, body, reply)
    stub = StubTreq(app)
    d = EventPoster(stub, URL, Clock()).post(event())
    stub.flush()
    assert d.result == expected


def test_batch_is_one_post_of_a_json_array_with_event_ids() -> None:
    app = App(200)
    stub = StubTreq(app)
    events = [
        Event("c1", 0, "open", b'{"data":{},"action":"open"}'),
        Event("c2", 7, "message", b' { "data" : 1 } '),
        Event('c"3', 1, "close", b"{}"),
    ]
    d = EventPoster(stub, URL, Clock()).post_batch(events)
    stub.flush()
    assert d.result is None
    [(_path, headers, body)] = app.seen
    assert headers.getRawHeaders(b"x-wsgw-batch") == [b"3"]
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"x-wsgw-event-id") is None
    assert json.loads(body) == [
        {"event_id": "c1:0", "data": {}, "action": "open"},
        {"event_id": "c2:7", "data": 1},
        {"event_id": 'c"3:1'},
    ]


def test_a_batch_never_replies() -> None:
    app = Replier(200, b"hello")
    stub = StubTreq(app)
    d = EventPoster(stub, URL, Clock()).post_batch([event()])
    stub.flush()
    assert d.result is None


@pytest.mark.parametrize("status, error", [(503, AppUnavailable), (400, AppRejected)])
def test_a_batch_is_judged_as_one_event_is(status, error) -> None:
    stub = StubTreq(App(status))
    d = EventPoster(stub, URL, Clock()).post_batch([event(), event(seq=4)])
    stub.flush()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(error)


def test_the_agent_keeps_enough_of_an_answer_to_judge_a_reply() -> None:
    """A reply over --max-message-size arrives one byte longer than the
    limit (refused as too big), never cut short to a smaller one."""
    from wsgw.appagent import MAX_KEPT_BODY
    from wsgw.eventpost import build_http_client

    assert build_http_client(Clock(), 4)._agent.max_kept_body == MAX_KEPT_BODY
    assert build_http_client(Clock(), 4, max_reply=1024 * 1024)._agent.max_kept_body == 1024 * 1024 + 1
