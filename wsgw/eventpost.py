"""
Events to the app: L{EventPoster} turns one L{wsgw.events.Event} (or a
batch of them) into one POST through treq, and the answer into a verdict
and, when the app asks, an inline reply (L{IEventSink}).

Three layers, each doing its job once and none undoing another's:

  1. L{EventPoster} builds the request from the record (body, the
     gateway's headers, the app's URL), follows no redirect, judges the
     answer by its status (and C{X-Wsgw-Reply}) and bounds the whole
     attempt.
  2. treq's C{HTTPClient} is the interface the event path calls (the
     design card).  Every treq from 22.1.0 to today puts Twisted's
     C{CookieAgent} and C{ContentDecoderAgent} over the agent it is given,
     on every request, with no option to leave them out; so they are
     configured, not undone:

       - the cookie jar is L{NoCookieJar}, which keeps nothing.  An event
         carries its own client's C{Cookie}; the app's C{Set-Cookie} to one
         client must never ride along with another client's events.
       - C{Accept-Encoding: gzip}, which the decoder adds, goes to the app
         as treq sends it.  The poster drains answers without keeping them,
         so a compressed answer is decoded (its first 64 KiB, all the agent
         keeps) only by an app that chose to compress.
       - bodies are L{wsgw.appagent.BytesBody}, written in one call
         (treq's C{data_to_body_producer} hook).
       - treq turns the URL it is given into a URI on every request: for
         the app's one URL, the same URI each time, at 66 µs per event in
         hyperlink and idna (as much as the rest of the POST).  The poster
         does that conversion once and hands treq its result, a URL that
         says it is a URI already (L{wsgw.appagent.PreparedURL}: C{to_uri()} is itself).

     The alternatives were worse: a subclass of C{HTTPClient} that skips
     the wrappers is treq in name only, and calling the agent directly
     leaves the design card.
  3. L{wsgw.appagent.AppAgent}, the C{IAgent} under treq, writes what it
     is given, adds C{Host} and the framing headers (the only place Host is
     computed), and hands over whole answers.
"""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar
from json.encoder import encode_basestring_ascii
from typing import Any, Dict, Iterator, Optional, Sequence, Set, Union, cast

import attr
import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from .appagent import MAX_KEPT_BODY, Answer, AppAgent, AppEndpoints, AppPool, BytesBody, CheckedHeaders, PreparedURL
from .events import Event
from .forwarder import AppRejected, AppUnavailable
from .interfaces import IEventSink

log = Logger()

_RETRY_STATUSES = frozenset({408, 429})
_JSON_TYPE = b"application/json"


class BadEvent(AppRejected):
    """
    The event cannot be written as a request (a header value of it holds
    CR, LF or NUL): retrying cannot change that, so it is given up as a
    rejected one is.
    """


class NoCookieJar(CookieJar):
    """
    The cookie jar of a client that keeps no cookies: treq's
    C{HTTPClient} always asks one, and this one stores nothing and adds
    nothing.  (A plain C{CookieJar}: treq takes any, and its
    C{IndexableCookieJar} is younger than the oldest treq wsgw supports.)
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def set_cookie_if_ok(self, cookie: Cookie, request: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Cookie]:
        return iter(())


def _body_producer(data: object) -> IBodyProducer:
    return BytesBody(data) if isinstance(data, bytes) else IBodyProducer(data)


def http_client_for(agent: IAgent) -> HTTPClient:
    """
    A treq client over C{agent} that keeps no cookies and writes bytes
    bodies in one call.
    """
    return HTTPClient(
        agent,
        cookiejar=NoCookieJar(),  # type: ignore[arg-type]  # treq takes any CookieJar
        data_to_body_producer=_body_producer,
    )


def build_http_client(reactor: Any, max_connections: int, max_reply: int = 0) -> HTTPClient:
    """
    A treq client over L{AppAgent}, whose pool keeps up to
    C{max_connections} connections to the app open between events.

    Of each answer's body it keeps 64 KiB, or C{max_reply + 1} bytes when
    that is more: a reply over C{max_reply} (C{--max-message-size}) then
    arrives long enough to be refused as too big, never cut short.
    """
    pool = AppPool(reactor, max_idle=max_connections, idle_timeout=120.0)
    kept = max(MAX_KEPT_BODY, max_reply + 1)
    return http_client_for(AppAgent(reactor, AppEndpoints(reactor), pool, max_kept_body=kept))


def _header_value(text: str) -> bytes:
    value = text.encode("utf-8", "replace")
    # find(), not `in`: a bytes `in` tries the operand as an integer
    # first, and costs twice as much.
    if value.find(b"\r") >= 0 or value.find(b"\n") >= 0 or value.find(b"\0") >= 0:
        raise BadEvent(f"header value with CR, LF or NUL: {value[:40]!r}")
    return value


def request_headers(event: Event) -> Headers:
    """
    The headers of C{event}'s POST (C{Host} is the agent's).

    @raise BadEvent: a value would hold CR, LF or NUL (C{Headers} would
        quietly turn CR and LF into spaces).
    """
    raw = {
        b"Content-Type": [_JSON_TYPE],
        b"X-Wsgw-Event-Id": [_header_value(event.event_id)],
        b"X-Forwarded-For": [_header_value(event.remote_addr)],
    }
    if event.cookie:
        raw[b"Cookie"] = [_header_value(event.cookie)]
    return CheckedHeaders.adopt(raw)


def _drain(_chunk: bytes) -> None:
    pass


@implementer(IEventSink)
@attr.s(eq=False)
class EventPoster:
    """
    Posts events to C{url} with C{client}, one attempt per call.

    C{timeout} bounds the whole attempt, the answer's body included: an
    app that sends headers and then stalls must not hold the event forever.
    Redirects are not followed: any 2xx or 3xx answer means delivered.

    The bound is kept by one timer for all attempts, not one per attempt
    (a C{callLater} and its cancellation cost as much as the verdict): the
    attempts under way wait in the order they began, all with the same
    bound, and the timer runs when the oldest is due.
    """

    client: HTTPClient = attr.ib()
    url: str = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=10.0)
    #: Parsed and made a URI once (see the module's docstring).
    _parsed_url: EncodedURL = attr.ib(init=False)
    #: Attempts under way and when each is due, oldest first.
    _due: Dict[Deferred[Any], float] = attr.ib(factory=dict, init=False)
    #: Attempts cancelled for being late (their CancelledError is a TimeoutError).
    _late: Set[Deferred[Any]] = attr.ib(factory=set, init=False)
    _timer: Optional[IDelayedCall] = attr.ib(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._parsed_url = PreparedURL.of(self.url)

    def post(self, event: Event) -> Deferred[Optional[bytes]]:
        """
        One attempt at delivering C{event}, alone in a request.  Fires with
        the answer's body when the app asked that it go back to the event's
        connection (a 2xx answer with C{X-Wsgw-Reply: 1}), else L{None}.
        """
        try:
            headers = request_headers(event)
        except BadEvent:
            return fail()
        return self.send(event.body, headers, replies=True)

    def post_batch(self, events: Sequence[Event]) -> Deferred[None]:
        """
        One attempt at delivering C{events} in one request: a JSON array of
        their bodies, each with its C{event_id}, and C{X-Wsgw-Batch: <count>}.
        The answer's body is ignored (no replies to a batch).
        """
        headers = CheckedHeaders({b"Content-Type": [_JSON_TYPE], b"X-Wsgw-Batch": [b"%d" % len(events)]})
        return cast("Deferred[None]", self.send(batch_body(events), headers, replies=False))  # no reply read

    def send(self, body: bytes, headers: Headers, replies: bool = False) -> Deferred[Optional[bytes]]:
        """
        One attempt at POSTing C{body} with C{headers}, judged as L{post}
        judges it; with C{replies}, an answer's reply is read.
        """
        try:
            d = self.client.request(  # what post() calls, one call and one keyword dict sooner
                "POST",
                self._parsed_url,
                data=body,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                # An empty jar of our own: else treq builds one per request.
                cookies=_NO_COOKIES,
                # Else treq imports the global reactor on every request;
                # it only uses it for its own timeout, which is not asked for.
                reactor=cast(Any, self.clock),
            )
        except Exception:  # treq converts the URL before any Deferred exists
            return fail()
        judged = cast("Deferred[Any]", d)  # the same Deferred, once judged
        if not d.called or d.paused:
            # The answer is to come (always, over a real agent): bounded,
            # then judged and settled in one callback.
            self._due[d] = self.clock.seconds() + self.timeout
            if self._timer is None:
                self._timer = self.clock.callLater(self.timeout, self._expire)
            return judged.addBoth(self._judged, d, replies)
        judged.addCallback(_verdict, replies)
        if judged.paused:
            self._bound(judged)
        return judged

    def _judged(self, result: object, d: Deferred[Any], replies: bool) -> object:
        """
        L{_verdict}, then L{_settled}, as one callback: an answer judged at
        once settles its attempt here; one whose body is still to be read
        stays bounded until it has been.
        """
        if isinstance(result, Failure):
            return self._settled(result, d)
        verdict = _verdict(cast(IResponse, result), replies)
        if not isinstance(verdict, Deferred):
            return self._settled(verdict, d)
        # Settled once the body is read: on the Deferred this callback
        # hands back, so before any callback the caller added.
        return verdict.addBoth(self._settled, d)

    def _bound(self, d: Deferred[Any]) -> None:
        self._due[d] = self.clock.seconds() + self.timeout
        d.addBoth(self._settled, d)
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._expire)

    def _settled(self, result: object, d: Deferred[Any]) -> object:
        self._due.pop(d, None)
        if d in self._late:
            self._late.discard(d)
            if isinstance(result, Failure) and result.check(CancelledError):
                return Failure(TimeoutError(self.timeout, "no whole answer from the app"))
        return result

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._due:
            d, due = next(iter(self._due.items()))
            if due - now > _SLACK:
                self._timer = self.clock.callLater(due - now, self._expire)
                return
            del self._due[d]
            self._late.add(d)
            d.cancel()


#: An empty cookie jar for every request (see L{EventPoster.send}).
_NO_COOKIES = NoCookieJar()
#: An attempt due within this many seconds when the timer runs is late.
_SLACK = 0.001


def batch_body(events: Sequence[Event]) -> bytes:
    """
    C{[{"event_id": "<conn_id>:<seq>", ...event...}, ...]}: each event's
    JSON object as it is, its id spliced in first.
    """
    if not events:
        return b"[]"
    pieces = [b"["]
    for event in events:
        body = event.body
        if body[:2] == b'{"':  # every body the gateway makes: a member follows the id
            comma, rest = b",", body[1:]
        else:
            rest = body.strip()[1:].lstrip()
            comma = b"" if rest[:1] == b"}" else b","
        pieces += (b'{"event_id":', _json_text(event.event_id), comma, rest, b",")
    pieces[-1] = b"]"  # for the last comma
    return b"".join(pieces)


def _json_text(text: str) -> bytes:
    # What json.dumps(text) writes, without its call and encoder dispatch.
    return encode_basestring_ascii(text).encode("ascii")


def _wants_reply(headers: Headers) -> bool:
    values = headers.getRawHeaders(b"x-wsgw-reply")
    return values is not None and values[-1].strip() == b"1"


def _nothing(_: object) -> None:
    return None


def _verdict(response: IResponse, replies: bool) -> Union[bytes, Deferred[Optional[bytes]], None]:
    """
    What the app's answer means: L{None} (delivered), the reply to send
    back (delivered, with a reply), or a L{Deferred} of either once the
    body has been read; failing with L{AppUnavailable} or L{AppRejected}.
    """
    original = getattr(response, "original", None)
    # An L{Answer} as L{AppAgent} hands it over, wrapped by treq alone (no
    # decoder between), was read whole with its connection back in the
    # pool: judged on itself, nothing to drain, no Deferred.
    read = type(original) is Answer
    answer: Any = original if read else response
    status = answer.code
    if 200 <= status < 400:
        wants = status < 300 and replies and _wants_reply(answer.headers)
        if read:
            return answer.body if wants else None
        if wants:
            return treq.content(response).addErrback(_unreadable_reply, status)
        # Drained, not kept: over an agent that streams answers, the
        # connection goes back to its pool only once the body was read.
        return treq.collect(response, _drain).addCallback(_nothing)
    d = treq.collect(response, _drain)
    if status >= 500 or status in _RETRY_STATUSES:
        error: Exception = AppUnavailable(f"app answered HTTP {status}")
    else:
        error = AppRejected(f"app answered HTTP {status}")

    def fail_with(_: object) -> None:
        raise error

    return d.addBoth(fail_with)


def _unreadable_reply(failure: Failure, status: int) -> None:
    # The event was delivered (2xx); only its reply is lost, e.g. a gzip
    # body cut short at the agent's bound.  Retrying would post it again.
    log.warn("the app's reply (HTTP {status}) could not be read: {why}", status=status, why=failure.getErrorMessage())
    return None
