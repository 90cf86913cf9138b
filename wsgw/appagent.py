"""
The HTTP/1.1 client that carries event POSTs to the app: an C{IAgent}
(L{AppAgent}) over persistent connections (L{AppConnection}) kept in a
pool (L{AppPool}).  treq sits on top of it (see L{wsgw.eventpost}).

Twisted's C{Agent} and its pool cost more CPU per event than everything
else the gateway does for it: a request object, a body-producer dance, a
line-by-line response parser.  The gateway's requests are all alike (small
bodies already in memory, one app, answers it only judges by their
status), so this agent writes each request in one call and hands treq the
whole answer at once.

Answers are read by llhttp (Node's HTTP parser, through C{httptools}):
strict where RFC 9112 asks a client to be (C{Content-Length} is decimal
digits, the CRLF after each chunk is checked, a field value with CR, LF or
NUL is refused, C{Transfer-Encoding} with C{Content-Length} is refused),
lenient where Twisted's own client is (lines may end in a bare LF).
C{tests/test_appagent_differential.py} holds it to Twisted's verdicts.
Framing: C{Content-Length}, chunked, or the end of the connection; interim
1xx answers skipped; no body after C{HEAD}, 204 or 304; C{Connection:
close} and HTTP/1.0 honoured.  A connection carries one request at a time
(no pipelining).  Anything unreadable drops the connection and fails the
request, which the forwarder then retries.

A connection taken from the pool may have been closed by the app just as
the request went out (Node closes idle keep-alives after 5 s): when it is
lost before a byte of the answer arrived, the request goes out once more at
once on a new connection.  An answer's C{Keep-Alive: timeout=N} bounds how
long its connection stays in the pool: it is dropped half a second before
the app would drop it (L{KEEP_ALIVE_MARGIN}).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Set, Tuple, cast

import attr
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser
from hyperlink import EncodedURL
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from .internals import write_now

#: An answer's head (status line and headers) may not be longer.
MAX_HEAD = 64 * 1024
#: Of an answer's body only this much is kept by default (see
#: L{AppAgent.max_kept_body}); the rest is read and dropped, so an app that
#: answers with megabytes costs no memory.
MAX_KEPT_BODY = 64 * 1024
#: A connection whose answer said C{Keep-Alive: timeout=N} leaves the pool
#: this many seconds before N have passed: the app's clock started when it
#: wrote the answer, ours when it arrived, and a request written in the
#: last moments would cross the app's close.
KEEP_ALIVE_MARGIN = 0.5

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|,)\s*timeout\s*=\s*([0-9]{1,9})\s*(?:,|$)", re.IGNORECASE)


class BadResponse(Exception):
    """
    The app's answer is not HTTP/1.x as this client reads it.
    """


@implementer(IResponse)
@attr.s(eq=False)
class Answer:
    """
    The app's whole answer: its body has been read already.
    """

    version: Tuple[bytes, int, int] = attr.ib()
    code: int = attr.ib()
    phrase: bytes = attr.ib()
    headers: Headers = attr.ib()
    #: The body's first bytes (L{AppAgent.max_kept_body}), as sent (not decoded).
    body: bytes = attr.ib(default=b"")
    request = None
    previousResponse = None

    @property
    def length(self) -> int:
        return len(self.body)

    def deliverBody(self, protocol: Protocol) -> None:
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@implementer(IBodyProducer)
@attr.s(slots=True)
class BytesBody:
    """
    A request body already in memory, written in one call.  Given plain
    bytes, treq wraps them in a C{FileBodyProducer}, which feeds them
    through a cooperator task (a C{LoopingCall}) on every request; and
    L{AppAgent} sends only bodies it can write at once.
    """

    body: bytes = attr.ib()
    length: int = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self.length = len(self.body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _HeadAnswered(Exception):
    """Raised inside the parser: the answer to a HEAD ends with its head."""


class _OutOfTurn(Exception):
    """Raised inside the parser: bytes follow the answer nobody asked for."""


class AppConnection(Protocol):
    """
    One persistent connection to the app, one request at a time.
    """

    #: A TCP (or TLS) transport: it can abort.
    transport: Any

    def __init__(self, pool: AppPool, key: tuple, max_kept_body: int = MAX_KEPT_BODY) -> None:
        self._pool = pool
        self._key = key
        self._max_kept_body = max_kept_body
        self._parser = HttpResponseParser(self)
        self._lenient_lines(True)
        #: The parser is strict about line ends (reading chunks, see L{_lenient_lines}).
        self._strict = False
        self._waiting: Optional[Deferred[Answer]] = None
        #: How to send the request in flight again should this (reused)
        #: connection turn out stale (see L{AppAgent.request}).
        self._again: Optional[Tuple[AppAgent, _Target, bytes]] = None
        #: That second attempt, while it is under way.
        self._retrying: Optional[Deferred[IResponse]] = None
        self.lost = False
        self._reset(head_only=False)

    def _reset(self, head_only: bool) -> None:
        self._head_only = head_only
        self._received = 0
        self._phrase = b""
        #: The answer's header lines, by canonical name (see L{on_header}).
        self._raw: Dict[bytes, List[bytes]] = {}
        self._headers = _EMPTY_HEADERS
        self._code = 0
        self._version = _HTTP_1_1
        self._head_done = False
        #: The body runs to the end of the connection.
        self._until_close = False
        self._body: List[bytes] = []
        self._body_size = 0
        self._answer: Optional[Answer] = None
        self._keep_alive = False
        self._keep_for: Optional[float] = None

    def send(
        self, data: bytes, head_only: bool = False, again: Optional[Tuple[AppAgent, _Target, bytes]] = None
    ) -> Deferred[Answer]:
        """
        Write one whole request; the L{Deferred} fires with the L{Answer}.
        C{head_only}: the request was a C{HEAD}, whose answer has no body.
        C{again}: the agent, target and request to send once more on a new
        connection should this one be lost before a byte of the answer came
        (a connection from the pool the app closed as the request went out).
        """
        self._waiting = Deferred(self._cancel)
        self._again = again
        self._reset(head_only)
        write_now(self.transport, data)
        return self._waiting

    def _cancel(self, _d: Deferred[Answer]) -> None:
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()  # the second attempt's failure fires the first's Deferred
            return
        # The answer is no longer wanted (the attempt timed out): this
        # connection is mid-answer, so it cannot serve another request.
        self._waiting = None
        self.transport.abortConnection()

    def _lenient_lines(self, lenient: bool) -> None:
        # RFC 9112 2.2 lets a client read a bare LF as the end of the
        # status line and of a field line (Twisted's client does); chunks
        # and trailers end in CRLF (Twisted checks).  llhttp has one
        # leniency for both, so it is off while a chunked body is read, on
        # otherwise (a body framed by length or by the connection's end
        # has no lines to end).
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=lenient)
        self._strict = not lenient

    # llhttp's callbacks, called from within feed_data.

    def on_message_begin(self) -> None:
        if self._answer is not None:
            raise _OutOfTurn()

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        # What Headers.addRawHeader does, minus its per-value work: the name
        # is made canonical as Headers makes it (and refused as it refuses
        # it), once per name; llhttp has refused a value with CR, LF or
        # NUL already, which is all Headers would have changed.
        if not self._head_done:  # trailers are read and dropped
            canonical = canonical_name(name)
            raw = self._raw
            values = raw.get(canonical)
            if values is None:
                raw[canonical] = [value]
            else:
                values.append(value)

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200:
            return  # an interim answer; llhttp reads it as a message of its own
        self._head_done = True
        version = self._parser.get_http_version()
        if not version.startswith("1."):
            raise BadResponse(f"not HTTP/1.x: HTTP/{version}")
        self._code = code
        self._version = _HTTP_1_0 if version == "1.0" else _HTTP_1_1
        raw = self._raw
        self._headers = CheckedHeaders.adopt(raw)
        codings = raw.get(b"Transfer-Encoding")
        if codings is not None:
            self._lenient_lines(False)  # chunks and trailers end in CRLF
        no_body = self._head_only or code in (204, 304)
        if not no_body and codings is not None and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
            # Only chunked can be undone here; Twisted's client agrees.
            raise BadResponse(f"unsupported Transfer-Encoding: {b','.join(codings)[:40]!r}")
        self._until_close = not no_body and codings is None and b"Content-Length" not in raw
        if self._head_only:
            # llhttp cannot be told that no body follows: stop it here.
            raise _HeadAnswered()

    def on_body(self, data: bytes) -> None:
        room = self._max_kept_body - self._body_size
        if room > 0:
            self._body.append(data[:room])
        self._body_size += len(data)

    def on_message_complete(self) -> None:
        if not self._head_done:
            # The end of an interim answer: the real one follows.
            self._phrase = b""
            self._raw = {}
            return
        if self._strict:
            self._lenient_lines(True)
        self._answer = self._make_answer()
        self._keep_alive = self._parser.should_keep_alive()
        self._keep_for = _keep_alive_timeout(self._raw)

    def _make_answer(self) -> Answer:
        # Called once the head is read (on_headers_complete set these).
        body = self._body
        return Answer(
            self._version,
            self._code,
            self._phrase,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
        )

    def dataReceived(self, data: bytes) -> None:
        if self._waiting is None:
            # Nothing was asked: an app talking out of turn.
            self.transport.abortConnection()
            return
        self._received += len(data)
        extra = False
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HeadAnswered):
                # The parser stopped mid-stream: this connection is done.
                self._answer = self._make_answer()
                extra = True
            elif self._answer is not None:
                extra = True  # bytes after the answer (_OutOfTurn)
            else:
                self._bad(cause if isinstance(cause, BadResponse) else e)
                return
        except (HttpParserError, HttpParserUpgrade) as e:
            if self._answer is None:
                self._bad(e)
                return
            extra = True  # bytes after an answer that said Connection: close
        if self._answer is not None:
            self._finish(reusable=not extra and self._keep_alive)
        elif not self._head_done and self._received > MAX_HEAD:
            self._bad(BadResponse(f"answer head over {MAX_HEAD} bytes"))

    def _bad(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, None
        self.transport.abortConnection()
        if waiting is not None:
            waiting.errback(Failure(ResponseFailed([Failure(error)])))

    def _finish(self, reusable: bool) -> None:
        answer, waiting = self._answer, self._waiting
        self._waiting = None
        if reusable:
            self._pool.put(self._key, self, self._keep_for)
        else:
            self.transport.loseConnection()
        cast(Deferred, waiting).callback(answer)  # both set while a request is answered

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._pool.forget(self._key, self)
        waiting, self._waiting = self._waiting, None
        again, self._again = self._again, None
        if waiting is None:
            return
        if self._head_done and self._until_close:
            waiting.callback(self._make_answer())
        elif self._received == 0 and again is not None:
            # Nothing of an answer on a reused connection: the app closed
            # it as the request went out.  It goes out once more, now, on a
            # new connection; this request's Deferred fires with that one's
            # outcome, and cancelling it cancels that one.
            self._waiting = waiting
            agent, target, data = again
            retrying = self._retrying = agent._connect(target, data, self._head_only)
            retrying.addBoth(self._retried)
        elif self._received == 0:
            waiting.errback(Failure(ResponseNeverReceived([reason])))
        else:
            waiting.errback(Failure(ResponseFailed([reason])))

    def _retried(self, result: Any) -> None:
        waiting, self._waiting = self._waiting, None
        self._retrying = None
        if waiting is not None:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)


def _keep_alive_timeout(raw: Dict[bytes, List[bytes]]) -> Optional[float]:
    values = raw.get(b"Keep-Alive")
    if values is None:
        return None
    hint = values[0] if len(values) == 1 else b",".join(values)
    if hint in _HINTS_SEEN:
        return _HINTS_SEEN[hint]
    found = _KEEP_ALIVE_TIMEOUT.search(hint)
    timeout = None if found is None else float(int(found.group(1)))
    if len(_HINTS_SEEN) < 64:
        _HINTS_SEEN[hint] = timeout
    return timeout


#: Keep-Alive values read already: an app sends the same one every time.
_HINTS_SEEN: Dict[bytes, Optional[float]] = {}

_HTTP_1_0 = (b"HTTP", 1, 0)
_HTTP_1_1 = (b"HTTP", 1, 1)


class CheckedHeaders(Headers):
    """
    C{Headers} built from names already canonical and values already
    checked: C{Headers} would encode, capitalise and sanitise each of them
    again, once as it is built and once more in every copy the agents
    under treq make.  Its copies are of its own class, lists not shared;
    it is otherwise a C{Headers} in every respect.  (Twisted's C{Headers}
    keeps its lines in C{_rawHeaders}, by canonical name.)
    """

    __slots__ = ()

    def __init__(self, rawHeaders: Optional[Dict[bytes, List[bytes]]] = None) -> None:
        self._rawHeaders = {} if rawHeaders is None else {name: list(values) for name, values in rawHeaders.items()}

    @classmethod
    def adopt(cls, raw: Dict[bytes, List[bytes]]) -> CheckedHeaders:
        """Headers over C{raw} itself, which nothing else may change any more."""
        headers = cls.__new__(cls)
        headers._rawHeaders = raw
        return headers


_EMPTY_HEADERS = CheckedHeaders()

#: Header names as Headers writes them (C{content-length} →
#: C{Content-Length}), for the names seen (a handful: an app's answers, the
#: API's own).
_CANONICAL_NAMES: Dict[bytes, bytes] = {}


def canonical_name(name: bytes) -> bytes:
    """A header's name as C{Headers} writes it, worked out once per name."""
    found = _CANONICAL_NAMES.get(name)
    return _canonical_name(name) if found is None else found


def _canonical_name(name: bytes) -> bytes:
    """C{name} as C{Headers} keeps it; refused (C{InvalidHeaderName}) as it refuses it."""
    probe = Headers()
    probe.addRawHeader(name, b"")
    [(canonical, _)] = probe.getAllRawHeaders()
    if len(_CANONICAL_NAMES) < 256:
        _CANONICAL_NAMES[name] = canonical
    return canonical


@attr.s(eq=False)
class AppPool:
    """
    Idle connections per app address, the most recently used first; at
    most C{max_idle} kept per address, each for C{idle_timeout} seconds or
    less when the app said so (L{KEEP_ALIVE_MARGIN}).

    One timer serves the whole pool, not one per idle spell (a connection
    goes back to the pool after every answer, and a C{callLater} with its
    cancellation cost more than the rest of the pool's work): each idle
    connection carries its deadline, L{take} passes over one whose deadline
    has come, and the timer closes those due when the earliest is.
    """

    reactor: IReactorTime = attr.ib()
    max_idle: int = attr.ib(default=64)
    idle_timeout: float = attr.ib(default=120.0)
    _idle: Dict[tuple, List[AppConnection]] = attr.ib(factory=dict, init=False)
    #: Each idle connection's address and when it must leave the pool.
    _due: Dict[AppConnection, Tuple[tuple, float]] = attr.ib(factory=dict, init=False)
    _timer: Optional[IDelayedCall] = attr.ib(default=None, init=False)
    #: When C{_timer} runs.
    _timer_at: float = attr.ib(default=0.0, init=False)

    def take(self, key: tuple) -> Optional[AppConnection]:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self.reactor.seconds()
        while idle:
            connection = idle.pop()
            _, due = self._due.pop(connection)
            if connection.lost:
                continue
            if due - now <= _SLACK:
                connection.transport.loseConnection()  # its time is up: the timer is late
                continue
            return connection
        return None

    def put(self, key: tuple, connection: AppConnection, keep_for: Optional[float] = None) -> None:
        """
        Keep C{connection} for the next request to C{key}; C{keep_for}: the
        app's C{Keep-Alive} timeout, if it gave one.
        """
        lifetime = self.idle_timeout
        if keep_for is not None:
            lifetime = min(lifetime, keep_for - KEEP_ALIVE_MARGIN)
        idle = self._idle.setdefault(key, [])
        if lifetime <= 0 or len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        due = self.reactor.seconds() + lifetime
        self._due[connection] = (key, due)
        if self._timer is None:
            self._start_timer(due)
        elif due < self._timer_at:
            self._timer.cancel()
            self._start_timer(due)

    def forget(self, key: tuple, connection: AppConnection) -> None:
        if self._due.pop(connection, None) is not None:
            self._idle[key].remove(connection)

    def _start_timer(self, at: float) -> None:
        self._timer_at = at
        self._timer = self.reactor.callLater(max(0.0, at - self.reactor.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        due_now = [(c, key) for c, (key, due) in self._due.items() if due - now <= _SLACK]
        for connection, key in due_now:
            self.forget(key, connection)
            connection.transport.loseConnection()
        if self._due:
            self._start_timer(min(due for _, due in self._due.values()))


#: A deadline this close (seconds) counts as come.
_SLACK = 0.001


@attr.s(frozen=True)
class _NoDelayEndpoint:
    """
    Connects like C{inner} and turns Nagle's algorithm off: a request
    written in one call still goes out in several segments when it is
    larger than one, and with Nagle on the last would wait for the app's
    delayed ACK (40 ms on Linux).
    """

    inner: IStreamClientEndpoint = attr.ib()

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        def no_delay(protocol: Any) -> Any:
            if ITCPTransport.providedBy(protocol.transport):
                protocol.transport.setTcpNoDelay(True)
            return protocol

        return self.inner.connect(factory).addCallback(no_delay)


@implementer(IAgentEndpointFactory)
@attr.s(frozen=True)
class AppEndpoints:
    """
    One endpoint per app address, built on first use: the agent asks for
    one whenever it connects, and building it (IDNA-encoding the host, TLS
    options) cost more than the rest of the request's setup.
    """

    reactor: object = attr.ib()
    _built: Dict[tuple, _NoDelayEndpoint] = attr.ib(factory=dict, init=False)

    def endpointForURI(self, uri: URI) -> _NoDelayEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._built.get(key)
        if endpoint is None:
            inner: IStreamClientEndpoint = HostnameEndpoint(self.reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                inner = wrapClientTLS(optionsForClientTLS(uri.host.decode("idna")), inner)
            endpoint = self._built[key] = _NoDelayEndpoint(inner)
        return endpoint


@attr.s(frozen=True)
class _Target:
    """What a request URI means to the agent, worked out once per URI."""

    key: tuple = attr.ib()
    path: bytes = attr.ib()
    #: The C{Host} header: the host, and the port unless it is the default.
    host: bytes = attr.ib()
    uri: URI = attr.ib()


def _target(uri: bytes) -> _Target:
    parsed = URI.fromBytes(uri)
    if parsed.scheme not in (b"http", b"https"):
        raise ValueError(f"unsupported scheme in {uri!r}")
    default = 443 if parsed.scheme == b"https" else 80
    host = parsed.host if parsed.port == default else parsed.host + b":%d" % parsed.port
    return _Target((parsed.scheme, parsed.host, parsed.port), parsed.originForm, host, parsed)


#: Headers the agent writes itself, from the request's framing.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


#: Header names and methods found to be tokens (a handful in practice).
_TOKENS_SEEN: Set[bytes] = set()


def _check_token(token: bytes, what: str) -> None:
    if token not in _TOKENS_SEEN:
        if not _TOKEN.match(token):
            raise ValueError(f"bad {what} {token[:40]!r}")
        if len(_TOKENS_SEEN) < 256:
            _TOKENS_SEEN.add(token)


#: What each header name is to L{serialize}: one the agent writes itself
#: (L{_FRAMING}), C{Host}, or any other; for the names seen (a handful).
_NAME_KINDS: Dict[bytes, int] = {}
_PLAIN, _FRAMING_NAME, _HOST = 0, 1, 2


def _name_kind(name: bytes) -> int:
    lower = name.lower()
    if lower in _FRAMING:
        kind = _FRAMING_NAME  # never written as given, so never checked
    else:
        _check_token(name, "header name")
        kind = _HOST if lower == b"host" else _PLAIN
    if len(_NAME_KINDS) < 256:
        _NAME_KINDS[name] = kind
    return kind


def serialize(method: bytes, target: _Target, headers: Optional[Headers], body: bytes) -> bytes:
    """
    The request as it goes on the wire.  A method that is not a token, a
    header name that is not a token or a value with CR, LF or NUL is
    refused here, where the request is built (L{ValueError}).
    """
    if method not in _TOKENS_SEEN:
        _check_token(method, "method")
    lines = [method, b" ", target.path, b" HTTP/1.1\r\n"]
    count = 2  # the request line and the blank line that ends the head
    has_host = False
    if headers is not None:
        kinds = _NAME_KINDS
        for name, values in headers.getAllRawHeaders():
            kind = kinds.get(name)
            if kind is None:
                kind = _name_kind(name)
            if kind:
                if kind == _FRAMING_NAME:
                    continue
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
    # Each of the head's lines ends in the CRLF written here: any other CR
    # or LF, or a NUL, came in a header value (or the request's path).
    if head.count(b"\r") != count or head.count(b"\n") != count or b"\0" in head:
        raise ValueError("CR, LF or NUL in a header value or the path")
    return head + body


@implementer(IAgent)
@attr.s(eq=False)
class AppAgent:
    """
    An C{IAgent} over L{AppConnection}s, connecting through
    C{endpoint_factory} (an C{IAgentEndpointFactory}, L{AppEndpoints} in
    the daemon).

    It sends the headers it is given as given, adding C{Host} (unless
    given) and the framing headers.  Request bodies must be producers with
    the bytes at hand as C{.body} (L{BytesBody}).  The L{Deferred} fires
    once the whole answer has been read, with the connection back in the
    pool; of its body the first C{max_kept_body} bytes are kept.
    """

    reactor: IReactorTime = attr.ib()
    endpoint_factory: IAgentEndpointFactory = attr.ib()
    pool: AppPool = attr.ib()
    max_kept_body: int = attr.ib(default=MAX_KEPT_BODY)
    _targets: Dict[bytes, _Target] = attr.ib(factory=dict, init=False)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            try:
                target = _target(uri)
            except Exception:
                return fail()
            if len(self._targets) < 100:
                self._targets[uri] = target
        body: object
        if bodyProducer is None:
            body = b""
        else:
            body = getattr(bodyProducer, "body", None)
            if not isinstance(body, bytes) or bodyProducer.length is UNKNOWN_LENGTH:
                return fail(TypeError("AppAgent sends bodies already in memory only (BytesBody)"))
        try:
            data = serialize(method, target, headers, body)
        except ValueError:
            return fail()
        head_only = method == b"HEAD"
        connection = self.pool.take(target.key)
        if connection is None:
            return self._connect(target, data, head_only)
        # Should the app have closed this idle connection as the request
        # went out (nothing answered), the connection sends it once more,
        # now, on a new one (L{AppConnection.connectionLost}).
        return cast("Deferred[IResponse]", connection.send(data, head_only, (self, target, data)))

    def _connect(self, target: _Target, data: bytes, head_only: bool) -> Deferred[IResponse]:
        try:
            endpoint = self.endpoint_factory.endpointForURI(target.uri)
        except Exception:
            return fail()
        factory = Factory.forProtocol(lambda: AppConnection(self.pool, target.key, self.max_kept_body))
        factory.noisy = False  # no "Starting factory" line per app connection
        connecting = endpoint.connect(factory)

        def connected(protocol: AppConnection) -> Deferred[Answer]:
            return protocol.send(data, head_only)

        def not_connected(failure: Failure) -> Failure:
            if failure.check(CancelledError):
                return failure  # the attempt timed out while connecting
            raise ResponseFailed([failure])

        return connecting.addCallbacks(connected, not_connected)


class PreparedURL(EncodedURL):
    """
    A URL already in URI form, built from hyperlink's own C{to_uri()}:
    converting it again gives it back, so it does so at once.  treq
    converts the URL of every request; handed one of these, that costs
    nothing (about 66 µs per request otherwise).
    """

    _text: Optional[str] = None

    @classmethod
    def of(cls, text: str) -> EncodedURL:
        """C{text} as a URI; as hyperlink reads it when it cannot be one
        (treq then fails each request as it would)."""
        url = EncodedURL.from_text(text)
        try:
            uri = url.to_uri()
        except (ValueError, UnicodeError):
            return url
        return cls(**_fields(uri))

    def to_uri(self) -> EncodedURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(with_password)
        if self._text is None:
            self._text = super().to_text()
        return self._text

    def replace(self, **changes: Any) -> EncodedURL:  # type: ignore[override]
        # A changed URL may hold text that is not URI-safe: a plain URL.
        return EncodedURL(**_fields(self)).replace(**changes)


def _fields(url: EncodedURL) -> Dict[str, Any]:
    return {
        "scheme": url.scheme,
        "host": url.host,
        "path": url.path,
        "query": url.query,
        "fragment": url.fragment,
        "port": url.port,
        "rooted": url.rooted,
        "userinfo": url.userinfo,
        "uses_netloc": url.uses_netloc,
    }
