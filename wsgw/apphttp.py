"""
A lean HTTP/1.1 agent for the event POSTs, under treq.

Twisted's C{Agent} and its pool cost more CPU per event than everything
else the gateway does for it (~0.4 ms on a small machine): a request object,
a body-producer dance, a line-by-line response parser with a state machine
per response.  The gateway's requests are all alike (small bodies already
in memory, one app, answers it only reads the status of), so this agent
writes each request in one call and parses each answer from one buffer.

It speaks plain HTTP/1.1 with persistent connections: answers framed by
C{Content-Length}, chunked, or by the end of the connection; interim 1xx
answers skipped; C{Connection: close} honoured.  A connection carries one
request at a time (no pipelining).  The answer's body is read whole before
the answer is given to treq.  Anything it cannot make sense of drops the
connection and fails the request, which the forwarder then retries.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

log = Logger()

#: An answer's head (status line and headers) may not be longer.
MAX_HEAD = 64 * 1024
#: Of an answer's body (which the gateway ignores) only this much is kept;
#: the rest is read and dropped, so an app that answers with megabytes
#: costs no memory.
MAX_KEPT_BODY = 64 * 1024

_NO_BODY_STATUSES = frozenset({204, 304})


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
    body: bytes = attr.ib(default=b"")
    request = None
    previousResponse = None

    @property
    def length(self) -> int:
        return len(self.body)

    def deliverBody(self, protocol) -> None:
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response


@attr.s(eq=False)
class _Head:
    """What the status line and headers of an answer said."""

    answer: Answer = attr.ib()
    #: Bytes of body to read; None: chunked or until the end.
    length: Optional[int] = attr.ib()
    chunked: bool = attr.ib()
    keep_alive: bool = attr.ib()


def _parse_head(raw: bytes) -> _Head:
    lines = raw.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise BadResponse(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    try:
        minor = int(status_line[0][7:])
        code = int(status_line[1])
    except ValueError:
        raise BadResponse(f"bad status line: {lines[0][:80]!r}") from None
    headers = Headers()
    length: Optional[int] = None
    chunked = False
    close = minor == 0  # HTTP/1.0 answers end their connection
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadResponse(f"bad header line: {line[:80]!r}")
        value = value.strip()
        headers.addRawHeader(name, value)
        lower = name.lower()
        if lower == b"content-length":
            try:
                given = int(value)
            except ValueError:
                raise BadResponse(f"bad Content-Length: {value[:40]!r}") from None
            if given < 0 or (length is not None and length != given):
                raise BadResponse(f"bad Content-Length: {value[:40]!r}")
            length = given
        elif lower == b"transfer-encoding":
            chunked = value.lower().split(b",")[-1].strip() == b"chunked"
            if not chunked:
                raise BadResponse(f"unsupported Transfer-Encoding: {value[:40]!r}")
        elif lower == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens and minor == 0:
                close = False
    if chunked:
        length = None
    elif code in _NO_BODY_STATUSES or 100 <= code < 200:
        length = 0
    answer = Answer((b"HTTP", 1, minor), code, status_line[2] if len(status_line) > 2 else b"", headers)
    # Without a length or chunks the body runs to the end of the connection.
    keep_alive = not close and (chunked or length is not None)
    return _Head(answer, length, chunked, keep_alive)


class AppConnection(Protocol):
    """
    One persistent connection to the app, one request at a time.
    """

    def __init__(self, pool: AppPool, key):
        self._pool = pool
        self._key = key
        self._buffer = b""
        self._waiting: Optional[Deferred] = None
        self._head: Optional[_Head] = None
        self._body: List[bytes] = []
        self._body_size = 0
        #: Bytes left in the current chunk (and its CRLF), when chunked.
        self._chunk_left: Optional[int] = None
        self._in_trailers = False
        self.lost = False

    def send(self, data: bytes) -> Deferred:
        """
        Write one whole request; the L{Deferred} fires with the L{Answer}.
        """
        self._waiting = Deferred(self._cancel)
        self._buffer = b""
        self._head = None
        self._body = []
        self._body_size = 0
        self._chunk_left = None
        self._in_trailers = False
        self.transport.write(data)
        return self._waiting

    def _cancel(self, _d) -> None:
        # The answer is no longer wanted (the attempt timed out): this
        # connection is mid-answer, so it cannot serve another request.
        self._waiting = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._waiting is None:
            # Nothing was asked: an app talking out of turn.
            self.transport.abortConnection()
            return
        self._buffer += data
        try:
            self._parse()
        except BadResponse as e:
            self._fail(Failure(ResponseFailed([Failure(e)])))
            self.transport.abortConnection()

    def _parse(self) -> None:
        while self._waiting is not None:
            if self._head is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise BadResponse(f"answer head over {MAX_HEAD} bytes")
                    return
                head = _parse_head(self._buffer[:end])
                self._buffer = self._buffer[end + 4 :]
                if 100 <= head.answer.code < 200:
                    continue  # an interim answer; the real one follows
                self._head = head
                if head.chunked:
                    self._chunk_left = None
            head = self._head
            if head.chunked:
                if not self._parse_chunks():
                    return
            elif head.length is None:
                self._take_body(self._buffer)
                self._buffer = b""
                return  # the end of the connection ends the body
            else:
                need = head.length - self._body_size
                if len(self._buffer) < need:
                    self._take_body(self._buffer)
                    self._buffer = b""
                    return
                self._take_body(self._buffer[:need])
                self._buffer = self._buffer[need:]
            self._finish()

    def _take_body(self, data: bytes) -> None:
        if data:
            room = MAX_KEPT_BODY - self._body_size
            if room > 0:
                self._body.append(data[:room])
            self._body_size += len(data)

    def _parse_chunks(self) -> bool:
        """Consume chunked body from the buffer; True once it ended."""
        while True:
            if self._in_trailers:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return False
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line:
                    return True
                continue
            if self._chunk_left is None:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise BadResponse("chunk size line too long")
                    return False
                size_text = self._buffer[:end].split(b";", 1)[0].strip()
                self._buffer = self._buffer[end + 2 :]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise BadResponse(f"bad chunk size: {size_text[:20]!r}") from None
                if size < 0:
                    raise BadResponse(f"bad chunk size: {size_text[:20]!r}")
                if size == 0:
                    self._in_trailers = True
                    continue
                self._chunk_left = size + 2  # the data and its CRLF
            take = min(self._chunk_left, len(self._buffer))
            if take == 0:
                return False
            data, self._buffer = self._buffer[:take], self._buffer[take:]
            self._chunk_left -= take
            if self._chunk_left < 2:
                # Part of the CRLF was taken with the data.
                data = data[: len(data) - (2 - self._chunk_left)]
            self._take_body(data)
            if self._chunk_left == 0:
                self._chunk_left = None

    def _finish(self) -> None:
        head, waiting = self._head, self._waiting
        head.answer.body = b"".join(self._body)
        self._waiting = None
        self._head = None
        self._body = []
        leftover = self._buffer
        self._buffer = b""
        if head.keep_alive and not leftover:
            self._pool.put(self._key, self)
        else:
            self.transport.loseConnection()
        waiting.callback(head.answer)

    def _fail(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(failure)

    def connectionLost(self, reason) -> None:
        self.lost = True
        self._pool.forget(self._key, self)
        if self._waiting is None:
            return
        head = self._head
        if head is not None and head.length is None and not head.chunked:
            self._finish_at_close()
        else:
            self._fail(Failure(ResponseFailed([reason])))

    def _finish_at_close(self) -> None:
        head, waiting = self._head, self._waiting
        head.answer.body = b"".join(self._body)
        self._waiting = None
        waiting.callback(head.answer)


@attr.s(eq=False)
class AppPool:
    """
    Idle connections per app address, the most recently used first; at
    most C{max_idle} kept per address, each for C{idle_timeout} seconds.
    """

    reactor = attr.ib()
    max_idle: int = attr.ib(default=64)
    idle_timeout: float = attr.ib(default=120.0)
    _idle: Dict[tuple, List[AppConnection]] = attr.ib(factory=dict, init=False)
    _timers: Dict[AppConnection, object] = attr.ib(factory=dict, init=False)

    def take(self, key) -> Optional[AppConnection]:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            timer = self._timers.pop(connection, None)
            if timer is not None and timer.active():
                timer.cancel()
            if not connection.lost:
                return connection
        return None

    def put(self, key, connection: AppConnection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        self._timers[connection] = self.reactor.callLater(self.idle_timeout, self._expire, key, connection)

    def forget(self, key, connection: AppConnection) -> None:
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
        timer = self._timers.pop(connection, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, key, connection: AppConnection) -> None:
        self._timers.pop(connection, None)
        self.forget(key, connection)
        connection.transport.loseConnection()


@attr.s(frozen=True)
class _Target:
    """What a request URI means to the agent, worked out once per URI."""

    key: tuple = attr.ib()
    path: bytes = attr.ib()
    host: bytes = attr.ib()


@implementer(IAgent)
@attr.s(eq=False)
class AppAgent:
    """
    An C{IAgent} over L{AppConnection}s, connecting through
    C{endpoint_factory} (an C{IAgentEndpointFactory}).

    Request bodies must be producers with the bytes at hand as C{.body}
    (L{wsgw.appclient.BytesBody}); C{Accept-Encoding} is not sent, as the
    gateway never reads an answer's body.
    """

    reactor = attr.ib()
    endpoint_factory = attr.ib()
    pool: AppPool = attr.ib()
    _targets: Dict[bytes, _Target] = attr.ib(factory=dict, init=False)

    def _target(self, uri: bytes) -> Tuple[_Target, URI]:
        parsed = URI.fromBytes(uri)
        if parsed.scheme not in (b"http", b"https"):
            raise ValueError(f"unsupported scheme in {uri!r}")
        default = 443 if parsed.scheme == b"https" else 80
        host = parsed.host if parsed.port == default else parsed.host + b":%d" % parsed.port
        return _Target((parsed.scheme, parsed.host, parsed.port), parsed.originForm, host), parsed

    def request(self, method: bytes, uri: bytes, headers: Optional[Headers] = None, bodyProducer=None) -> Deferred:
        target = self._targets.get(uri)
        parsed = None
        if target is None:
            try:
                target, parsed = self._target(uri)
            except Exception:
                return fail()
            if len(self._targets) < 100:
                self._targets[uri] = target
        if bodyProducer is None:
            body = b""
        else:
            body = getattr(bodyProducer, "body", None)
            if not isinstance(body, bytes) or bodyProducer.length is UNKNOWN_LENGTH:
                return fail(TypeError("AppAgent sends bodies already in memory only (BytesBody)"))
        lines = [method, b" ", target.path, b" HTTP/1.1\r\n"]
        has_host = False
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                lower = name.lower()
                if lower in (b"content-length", b"accept-encoding", b"transfer-encoding", b"connection"):
                    continue
                if lower == b"host":
                    has_host = True
                for value in values:
                    lines += (name, b": ", value, b"\r\n")
        if not has_host:
            lines += (b"Host: ", target.host, b"\r\n")
        if body or method in (b"POST", b"PUT", b"PATCH"):
            lines += (b"Content-Length: %d\r\n" % len(body),)
        lines += (b"\r\n", body)
        data = b"".join(lines)
        connection = self.pool.take(target.key)
        if connection is not None:
            return connection.send(data)
        if parsed is None:
            parsed = URI.fromBytes(uri)
        try:
            endpoint = self.endpoint_factory.endpointForURI(parsed)
        except Exception:
            return fail()
        factory = Factory.forProtocol(lambda: AppConnection(self.pool, target.key))
        connecting = endpoint.connect(factory)

        def connected(protocol):
            return protocol.send(data)

        def not_connected(failure):
            if failure.check(CancelledError):
                return failure  # the attempt timed out while connecting
            raise ResponseFailed([failure])

        return connecting.addCallbacks(connected, not_connected)
