"""
A lean HTTP/1.1 server for the app's API calls on the daemon's listeners.

twisted.web's channel and C{Request} were most of a C{/send}: a line
receiver per header, a request object of some sixty attributes, header
objects both ways, the idle timer reset per read, and the answer buffered
for the next turn of the reactor.  L{ApiChannel} reads the plain API
requests (C{GET} and C{POST} under C{/tapr/}, framed by C{Content-Length})
itself and has the same resource tree answer them, through the site's own
C{getResourceFor} (its rate limit included), with a small request object
that offers what the tree uses.

Anything else (other paths and methods, chunked bodies, C{Expect},
C{Upgrade}, a body over the limit, anything malformed) hands the
connection, from that request on, to the site's own channel, which answers
as it always has: the lean path serves only what it serves identically.
"""

from __future__ import annotations

import functools
import re
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

import attr
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, version
from zope.interface import implementer

from . import internals
from .appagent import canonical_name
from .interfaces import IAnswerFirst

if TYPE_CHECKING:
    from .web import GatewaySite

log = Logger()

#: The longest head served here; longer ones go to twisted.web (which
#: allows 16 KiB of header lines).
MAX_HEAD = 8 * 1024
#: More header lines than this go to twisted.web.
MAX_HEADERS = 100
#: The paths served here: the API's.
PREFIX = b"/tapr/"
#: twisted.web's idle timeout of an HTTP connection (the site's C{timeout})
#: is applied by this channel too; a connection is dropped this long after a
#: timed-out close if it has not gone.
ABORT_TIMEOUT = 15

_LEAN_METHODS = (b"GET", b"POST")
#: Headers whose presence sends a request to twisted.web.
_NOT_HERE = (b"transfer-encoding", b"expect", b"upgrade")

#: A header name (RFC 9110's token).
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
#: A head served here: the request line (a target of visible characters
#: under the prefix), then header lines of a name, a colon and a value
#: without NUL, CR or LF.
_HEAD_SHAPE = re.compile(
    rb"(GET|POST) (" + re.escape(PREFIX) + rb"[\x21-\x7e]*) (HTTP/1\.[01])((?:\r\n" + _TOKEN + rb":[^\x00\r\n]*)*)\Z"
)
#: One header line of a head that matched L{_HEAD_SHAPE}.
_HEADER_LINE = re.compile(rb"\r\n(" + _TOKEN + rb"):([^\r]*)")


def drop_slow_peer(logger: Logger, transport: Any, timeout: float, peer: object) -> None:
    """
    A peer that sent no complete request within C{timeout} (the first
    reader's, or this channel's): said once under C{logger}, and dropped
    without an answer it would not read.
    """
    logger.info("no complete request within {timeout}s from {peer}; dropping it", timeout=timeout, peer=str(peer))
    transport.abortConnection()


_FAILED_PAGE = b"<html><head><title>Processing Failed</title></head><body><b>Processing Failed</b></body></html>"

Head = Tuple[bytes, bytes, bytes, Dict[bytes, List[bytes]], int]


def parse_head(head: bytes, max_body: int) -> Optional[Head]:
    """
    C{(method, target, version, headers, length)} of a request head (up to
    its blank line) this module serves, or L{None}: then twisted.web
    serves it, and answers whatever is wrong with it as it always has.
    Header names are lowered; values keep their order.
    """
    if len(head) > MAX_HEAD:
        return None
    # One match checks the request line and that every header line is a
    # token, a colon and a value without NUL, CR or LF (no folded line, no
    # bare CR or LF anywhere).
    shape = _HEAD_SHAPE.match(head)
    if shape is None:
        return None
    method, target, http_version, lines = shape.groups()
    if lines.count(b"\r\n") > MAX_HEADERS:
        return None
    headers: Dict[bytes, List[bytes]] = {}
    for name, value in _HEADER_LINE.findall(lines):
        name = name.lower()
        value = value.strip(b" \t")
        if name in headers:
            headers[name].append(value)
        else:
            headers[name] = [value]
    for name in _NOT_HERE:
        if name in headers:
            return None
    length = 0
    given = headers.get(b"content-length")
    if given is not None:
        if len(given) != 1 or not given[0].isdigit():
            return None
        length = int(given[0])
        if length > max_body:
            return None  # twisted.web reads and drops it, then answers 413
    return method, target, http_version, headers, length


def do_after_answer(work: List[Callable[[], None]]) -> None:
    """What was to follow an answer; a failure of one piece is logged and the rest done."""
    for piece in work:
        try:
            piece()
        except Exception:
            log.failure("after answering an API call")


#: Where a head's one Content-Length value is, found as L{parse_head} reads it.
_LENGTH_VALUE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*(?:\r\n|\Z)", re.IGNORECASE)


@attr.s(frozen=True, slots=True)
class KnownHead:
    """
    A head parsed once, to read the next one on its connection without
    parsing it: an app's client sends the same head call after call but
    for the length of the body, and parsing it was a fifth of a C{/send}.
    """

    raw: bytes = attr.ib()
    head: Head = attr.ib()
    #: The span of its C{Content-Length} value in C{raw}, (-1, -1) without one.
    value_at: Tuple[int, int] = attr.ib()

    @classmethod
    def of(cls, raw: bytes, head: Head) -> KnownHead:
        found = _LENGTH_VALUE.search(raw) if b"content-length" in head[3] else None
        return cls(raw, head, (-1, -1) if found is None else found.span(1))

    def again(self, raw: bytes, max_body: int) -> Optional[Head]:
        """
        What L{parse_head} makes of C{raw} when it is this head again, its
        length's digits aside; L{None} when it may not be (then it is parsed).
        """
        if raw == self.raw:
            return self.head
        start, end = self.value_at
        if start < 0 or len(raw) > MAX_HEAD:
            return None
        stop = raw.find(b"\r\n", start)
        if stop < 0:
            stop = len(raw)
        digits = raw[start:stop]
        # The same bytes before the value and after it, and in between
        # digits only (no spaces: parse_head would strip them), within the
        # limit: parse_head would read the same head with this length.
        if not digits.isdigit() or raw[stop:] != self.raw[end:] or raw[:start] != self.raw[:start]:
            return None
        length = int(digits)
        if length > max_body:
            return None
        method, target, version, headers, _ = self.head
        return method, target, version, {**headers, b"content-length": [digits]}, length


_date: List[Any] = [0, b""]


def _wants_default_type(code: int, out: Dict[bytes, bytes]) -> bool:
    """
    Whether an answer without a C{Content-Type} gets twisted.web's default:
    not a 204 or a 304, nor one whose C{Content-Length} is 0.
    """
    return code not in (204, 304) and out.get(b"Content-Length") != b"0"


def http_date() -> bytes:
    """The C{Date} header, made once a second rather than per answer."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, datetimeToString(now)
    value: bytes = _date[1]
    return value


@functools.lru_cache(maxsize=256)
def target_parts(uri: bytes) -> Tuple[bytes, Tuple[bytes, ...]]:
    """
    A request target's path and its segments (unquoted), as twisted.web's
    C{Request} splits them: worked out once per target, for an app calls
    the same few.
    """
    path = uri.split(b"?", 1)[0]
    segments = path[1:].split(b"/")
    return path, tuple(unquote_to_bytes(p) for p in segments) if b"%" in path else tuple(segments)


@functools.lru_cache(maxsize=64)
def asks_to_close(connection: bytes) -> bool:
    """Whether a C{Connection} header's value says C{close}, as twisted.web reads it (once per value)."""
    return b"close" in connection.lower().split(b" ")


@implementer(IAnswerFirst)
class LeanRequest:
    """
    What the API's resources use of a twisted.web C{Request}: its method,
    path, headers, body and peer; the answer's status and headers; and
    C{write}/C{finish} for answers given later (a cluster's).  Work that
    cannot change the answer may wait until it is written (L{IAnswerFirst}).
    """

    too_large = False
    site: Any = None
    #: What is to be done once the answer is written (L{after_answer}).
    _after: Optional[List[Callable[[], None]]] = None
    sitepath: List[bytes]
    code_message: bytes

    def __init__(
        self,
        channel: ApiChannel,
        method: bytes,
        uri: bytes,
        clientproto: bytes,
        headers: Dict[bytes, List[bytes]],
        body: bytes,
    ):
        self.channel: Optional[ApiChannel] = channel
        self.method = method
        self.uri = uri
        self.path, segments = target_parts(uri)
        self.clientproto = clientproto
        self._headers = headers
        self.content = BytesIO(body)
        self.prepath: List[bytes] = []
        self.postpath: List[bytes] = list(segments)  # the walk takes it apart
        self.code = 200
        self.code_message = b"OK"
        # Insertion ordered, as twisted.web writes them: canonical name -> value.
        self._out: Dict[bytes, bytes] = {}
        self._started = False
        self._chunked = False
        self._pieces: List[bytes] = []
        self.finished = False

    # -- what the request asked ------------------------------------------------

    def getHeader(self, key: bytes) -> Optional[bytes]:
        values = self._headers.get(key.lower())
        return values[-1] if values else None

    @property
    def requestHeaders(self) -> Headers:
        """The request's headers as twisted.web's object, made when asked for."""
        headers = Headers()
        for name, values in self._headers.items():
            headers.setRawHeaders(name, values)
        return headers

    def getClientAddress(self) -> IAddress:
        return self._peer

    getPeer = getClientAddress

    @property
    def _peer(self) -> IAddress:
        channel = self.channel
        assert channel is not None
        return channel.peer

    def isSecure(self) -> bool:
        channel = self.channel
        return channel is not None and bool(getattr(channel.transport, "TLS", False))

    # -- the answer ------------------------------------------------------------

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes, value: bytes) -> None:
        self._out[canonical_name(name)] = value

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if not self._started:
            self._started = True
            out = self._out
            if b"Content-Type" not in out and _wants_default_type(self.code, out):
                out[b"Content-Type"] = b"text/html"  # twisted.web's default
            if self.clientproto == b"HTTP/1.1" and b"Content-Length" not in out and self.code not in NO_BODY_CODES:
                out[b"Transfer-Encoding"] = b"chunked"
                self._chunked = True
            head = [b"%s %d %s\r\n" % (self.clientproto, self.code, self.code_message)]
            head.extend(b"%s: %s\r\n" % item for item in out.items())
            head.append(b"\r\n")
            self._pieces.append(b"".join(head))
            if self.code in NO_BODY_CODES:
                return
        if data and self.code not in NO_BODY_CODES:
            if self._chunked:
                self._pieces.append(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self._pieces.append(data)

    def finish(self) -> None:
        if self.finished:
            raise RuntimeError("Request.finish called on a request after its connection was lost")
        if not self._started:
            self.write(b"")
        if self._chunked:
            self._pieces.append(b"0\r\n\r\n")
        self.finished = True
        self._give_answer(b"".join(self._pieces))
        self._pieces = []

    def after_answer(self, work: Callable[[], None]) -> None:
        if self.finished:
            work()  # answered already
        elif self._after is None:
            self._after = [work]
        else:
            self._after.append(work)

    def _give_answer(self, data: bytes) -> None:
        """The whole answer to the channel, and what was to follow it."""
        after, self._after = self._after, None
        channel = self.channel
        if channel is not None:
            channel.answered(data, after)
        elif after is not None:
            do_after_answer(after)

    def processingFailed(self, reason: Failure) -> None:
        """As twisted.web answers a resource that raised: a 500 page."""
        log.failure("", failure=reason)
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", b"text/html")
        self.setHeader(b"Content-Length", b"%d" % (len(_FAILED_PAGE),))
        self.write(_FAILED_PAGE)
        self.finish()

    def process(self, site: GatewaySite) -> None:
        """Find the resource as the site would and have it answer."""
        out = self._out
        out[b"Server"] = version
        out[b"Date"] = http_date()
        try:
            resource = site.getResourceFor(self)
            body = resource.render(self)
            if body is NOT_DONE_YET:
                return
            if not isinstance(body, bytes):
                raise TypeError(f"{resource!r} rendered {body!r}, not bytes")
            out[b"Content-Length"] = b"%d" % (len(body),)
            if self._started or self.finished:
                self.write(body)  # as twisted.web: raises once finished
                self.finish()
                return
            # What write(body) and finish() do for a first write with the
            # length known (not chunked), in one piece.
            if b"Content-Type" not in out and _wants_default_type(self.code, out):
                out[b"Content-Type"] = b"text/html"  # twisted.web's default
            self._started = self.finished = True
            # The header lines joined in C (out holds Server and Date at
            # least), not formatted one by one.
            head = b"%s %d %s\r\n%s\r\n\r\n" % (
                self.clientproto,
                self.code,
                self.code_message,
                b"\r\n".join(map(b": ".join, out.items())),
            )
            self._give_answer(head if self.code in NO_BODY_CODES else head + body)
        except BaseException:
            if not self.finished:
                self.processingFailed(Failure())

    def connectionLost(self) -> None:
        self.channel = None


class ApiChannel(Protocol):
    """
    One connection from an app (or a monitor) that is not a WebSocket
    upgrade: the API calls it can are served here, in order, each answer
    written at once; the first one it cannot goes, with the rest of the
    connection, to the site's C{HTTPChannel}.

    As twisted.web's channel it drops a connection whose first request is
    not in within the site's C{handshake_timeout} and one idle for the
    site's C{timeout}; it closes after an answer to HTTP/1.0 or to
    C{Connection: close}; and it stops reading while the transport's
    buffer is full.
    """

    transport: Any

    def __init__(self, site: GatewaySite, addr: IAddress):
        self.site = site
        self.peer = addr
        self._buffer = b""
        self._head: Optional[Head] = None
        #: The last head parsed here (see L{KnownHead}).
        self._last_head: Optional[KnownHead] = None
        self._body_at = 0
        self._pending: Optional[LeanRequest] = None
        self._persistent = True
        self._waiting = False
        self._handed_over = False
        self._gone = False
        self._paused_by_transport = False
        self._first_deadline: Optional[IDelayedCall] = None
        self._idle_call: Optional[IDelayedCall] = None
        self._abort_call: Optional[IDelayedCall] = None
        self._last_read = 0.0
        self._network: Optional[IPushProducer] = None

    def connectionMade(self) -> None:
        reactor = self.site.reactor
        self._first_deadline = reactor.callLater(self.site.handshake_timeout, self._no_request_in_time)
        if self.site.timeOut:
            self._last_read = reactor.seconds()
            self._idle_call = reactor.callLater(self.site.timeOut, self._idle_check)
        # What stops reading: the TCP transport; under TLS (no such
        # producer) nothing, as for twisted.web's channel.
        self._network = IPushProducer(self.transport, None)
        self.transport.registerProducer(self, True)

    # -- reading ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._handed_over or not self._persistent:
            return  # after a closing answer twisted.web drops what follows too
        if self._idle_call is not None:
            self._last_read = self.site.reactor.seconds()
        self._buffer += data
        if self._pending is None:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        buffer = self._buffer
        while buffer and self._pending is None and self._persistent:
            head = self._head
            if head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD or not _may_be_lean(buffer):
                        self._hand_over(buffer)
                        return
                    break
                raw_head = buffer[:end]
                last = self._last_head
                found = None if last is None else last.again(raw_head, self.site.max_body)
                if found is None:
                    found = parse_head(raw_head, self.site.max_body)
                    if found is None:
                        self._hand_over(buffer)
                        return
                    self._last_head = KnownHead.of(raw_head, found)
                head = found
                self._head, self._body_at = head, end + 4
            body_end = self._body_at + head[4]
            if len(buffer) < body_end:
                break
            body = buffer[self._body_at : body_end]
            buffer = buffer[body_end:]
            self._head = None
            self._serve(head, body)
        self._buffer = buffer if self._persistent else b""

    def _serve(self, head: Head, body: bytes) -> None:
        method, target, http_version, headers, _length = head
        if self._first_deadline is not None:
            self._cancel_first_deadline()
        request = LeanRequest(self, method, target, http_version, headers, body)
        if http_version == b"HTTP/1.1":
            connection = headers.get(b"connection")
            if connection and asks_to_close(connection[0]):
                request.setHeader(b"Connection", b"close")
                self._persistent = False
        else:
            self._persistent = False  # as twisted.web: HTTP/1.0 connections are not kept
        self._pending = request
        request.process(self.site)
        if self._pending is request and not self._gone:
            # Answered later (a cluster's send): read no more meanwhile.
            self._waiting = True
            self._pause_reading()

    def answered(self, data: bytes, after: Optional[List[Callable[[], None]]] = None) -> None:
        """
        The pending request's whole answer: written at once, then the work
        that was to follow it, then what was pipelined behind it.
        """
        self._pending = None
        if not self._gone:
            internals.write_now(self.transport, data)
        if after is not None:
            do_after_answer(after)
        if self._gone:
            return
        if not self._persistent:
            self.transport.loseConnection()
            return
        if not self._waiting:
            return  # answered within _serve: its loop goes on
        self._waiting = False
        if self._idle_call is not None:
            self._last_read = self.site.reactor.seconds()  # idle from the answer on
        if self._buffer:
            self._serve_buffered()
        if self._pending is None and not self._handed_over and not self._paused_by_transport:
            self._resume_reading()

    # -- handing over ----------------------------------------------------------

    def _hand_over(self, data: bytes) -> None:
        """twisted.web serves this connection from C{data} on."""
        self._handed_over = True
        self._buffer = b""
        self._stop_timers()
        channel = self.site.buildProtocol(self.peer)
        transport = self.transport
        transport.unregisterProducer()
        if self._paused_by_transport or self._waiting:
            self._resume_reading()
        internals.hand_over(transport, channel)
        channel.makeConnection(transport)
        channel.dataReceived(data)

    # -- the transport's back-pressure -----------------------------------------

    def pauseProducing(self) -> None:
        self._paused_by_transport = True
        self._pause_reading()

    def resumeProducing(self) -> None:
        self._paused_by_transport = False
        if self._pending is None:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if self._network is not None:
            self._network.pauseProducing()

    def _resume_reading(self) -> None:
        if self._network is not None:
            self._network.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.loseConnection()

    # -- timers ----------------------------------------------------------------

    def _no_request_in_time(self) -> None:
        self._first_deadline = None
        drop_slow_peer(log, self.transport, self.site.handshake_timeout, self.peer)

    def _idle_check(self) -> None:
        """The idle timer, moved on from the last read rather than reset per read."""
        self._idle_call = None
        reactor = self.site.reactor
        if self._pending is not None:
            # Not idle while answering: count from the answer on.
            self._last_read = reactor.seconds()
        left = self._last_read + (self.site.timeOut or 0) - reactor.seconds()
        if left > 0:
            self._idle_call = reactor.callLater(left, self._idle_check)
            return
        log.info("Timing out client: {peer}", peer=str(self.peer))
        self._abort_call = reactor.callLater(ABORT_TIMEOUT, self._force_abort)
        self.transport.loseConnection()

    def _force_abort(self) -> None:
        self._abort_call = None
        log.info("Forcibly timing out client: {peer}", peer=str(self.peer))
        self.transport.abortConnection()

    def _cancel_first_deadline(self) -> None:
        if self._first_deadline is not None:
            if self._first_deadline.active():
                self._first_deadline.cancel()
            self._first_deadline = None

    def _stop_timers(self) -> None:
        self._cancel_first_deadline()
        for call in (self._idle_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._abort_call = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._stop_timers()
        if self._pending is not None:
            self._pending.connectionLost()
            self._pending = None


def _may_be_lean(start: bytes) -> bool:
    """What has come of a request line may still be one served here."""
    for method in _LEAN_METHODS:
        prefix = method + b" " + PREFIX
        n = min(len(start), len(prefix))
        if start[:n] == prefix[:n]:
            return True
    return False
