"""
Every place wsgw relies on a private field of Twisted or Autobahn, each for
a measured gain or a behaviour their public API does not offer.

Kept here, together, so that an upgrade of either is checked in one place:
C{tests/test_internals.py} has a test per assumption that fails loudly when
a release changes what is relied on.  Where a field is missing at run time
the code takes the public path instead of failing.
"""

from __future__ import annotations

import re
import types
from inspect import iscoroutine
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, TypeVar
from urllib.parse import parse_qs

import txaio
import txaio.tx
from autobahn.twisted import websocket as autobahn_twisted_websocket
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application.internet import ClientService
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

# -- Autobahn: the settings, read from the protocol's class -------------------------

#: The settings Autobahn copies from the factory to each protocol as it
#: connects (29 of them, into every connection's own C{__dict__}).  It also
#: pretty-prints them all for a debug line that is then filtered out, a
#: fifth of a handshake's CPU.  A protocol class made by L{with_settings}
#: holds them once for all its connections, and declares C{CONFIG_ATTRS =
#: ()} so that Autobahn copies nothing.
PROTOCOL_SETTINGS: Tuple[str, ...] = tuple(WebSocketServerProtocol.CONFIG_ATTRS)


_P = TypeVar("_P", bound=WebSocketServerProtocol)


def with_settings(protocol_class: Type[_P], factory: Any) -> Type[_P]:
    """
    A subclass of C{protocol_class} whose class attributes are the
    factory's settings, as Autobahn would have copied them to each
    instance.  A function among them (C{perMessageCompressionAccept}) is
    kept as a plain function, not turned into a method.
    """
    settings: Dict[str, Any] = {}
    for name in PROTOCOL_SETTINGS:
        value = getattr(factory, name)
        settings[name] = staticmethod(value) if isinstance(value, types.FunctionType) else value
    settings["__module__"] = protocol_class.__module__
    settings["__qualname__"] = protocol_class.__qualname__
    subclass: Type[_P] = type(protocol_class.__name__, (protocol_class,), settings)
    return subclass


# -- Autobahn: debug-line arguments built only when a line is written -------------


class _Rendered:
    """
    A debug line's argument that costs nothing until the line is written:
    it calls C{render(*args)} when formatted.
    """

    __slots__ = ("_args", "_render")

    def __init__(self, render: Callable[..., str], args: Tuple[Any, ...]):
        self._render = render
        self._args = args

    def __str__(self) -> str:
        return self._render(*self._args)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(self._render(*self._args), spec)


def _rendered_later(render: Callable[..., str]) -> Callable[..., _Rendered]:
    def later(*args: Any) -> _Rendered:
        return _Rendered(render, args)

    later.__wrapped__ = render  # type: ignore[attr-defined]
    return later


#: The helpers Autobahn calls for the arguments of its debug lines, by
#: module; every call of theirs there is a keyword argument of a log call.
#: They run whether or not debug is on (colouring one qualified name is a
#: dozen calls into click), 16 times per handshake: a tenth of its CPU.
DEBUG_ARGUMENT_HELPERS: Dict[types.ModuleType, Tuple[str, ...]] = {
    autobahn_protocol: ("hltype", "hlval"),
    autobahn_twisted_websocket: ("hltype", "hlval"),
}


def defer_debug_arguments() -> None:
    """
    Have Autobahn's debug-line helpers return arguments that render when a
    line is written: the same text when debug is on, next to no work when
    it is off.  Idempotent.
    """
    for module, names in DEBUG_ARGUMENT_HELPERS.items():
        for name in names:
            helper = getattr(module, name)
            if getattr(helper, "__wrapped__", None) is None:
                setattr(module, name, _rendered_later(helper))
    printer = getattr(autobahn_protocol, "pformat", None)
    if printer is not None and getattr(printer, "__wrapped__", None) is None:
        autobahn_protocol.pformat = _empty_list_at_once(printer)


def _empty_list_at_once(pformat: Callable[..., str]) -> Callable[..., str]:
    """
    C{pformat} answering C{"[]"} for an empty list without building a
    C{PrettyPrinter}.  Autobahn pretty-prints the settings it copied into
    each new connection for a debug line, even with debug off; with
    L{with_settings} it copies none, and printing the empty list was still
    4 % of the in-memory handshake.  (Autobahn's other uses of C{pformat} return its
    text, so it cannot be deferred as the helpers above are.)
    """

    def printed(value: Any, *args: Any, **kwargs: Any) -> str:
        if type(value) is list and not value and not args and not kwargs:
            return "[]"
        return pformat(value, *args, **kwargs)

    printed.__wrapped__ = pformat  # type: ignore[attr-defined]
    return printed


# -- Autobahn: the opening handshake, read in one pass ---------------------------

#: A header block (its lines after the request line, each ending in CRLF)
#: that Autobahn's C{parseHttpHeader} accepts line for line: a token, a
#: colon, a value without control characters other than HTAB.
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
#: A request line Autobahn reads as C{GET}, an origin-form target with no
#: fragment and no C{;params} (which C{urlparse} would split off), HTTP/1.1.
_REQUEST_LINE = re.compile(r"GET (/(?!/)[\x21-\x22\x24-\x3a\x3c-\x7e]*) HTTP/1\.1")
_BASE64 = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
#: Headers Autobahn refuses to see twice; a request that repeats one is
#: left to Autobahn, which says so.
_ONCE = frozenset(("host", "sec-websocket-version", "sec-websocket-key", "sec-websocket-extensions", "origin"))
#: txaio sets its API up at run time (use_twisted), out of mypy's sight.
_txaio: Any = txaio
_no_op: Any = getattr(txaio.tx, "_no_op", None)
_url_to_origin: Any = getattr(autobahn_protocol, "_url_to_origin", None)
_is_same_origin: Any = getattr(autobahn_protocol, "_is_same_origin", None)


def debug_is_off(protocol: WebSocketServerProtocol) -> bool:
    """Autobahn's debug lines are filtered out (txaio made them no-ops)."""
    return _no_op is not None and protocol.log.debug is _no_op


def read_handshake(protocol: WebSocketServerProtocol) -> bool:
    """
    Do what Autobahn's C{processHandshake} does with an opening handshake
    that passes every one of its checks, in one pass over the head, and
    return C{True}; return C{False}, having changed nothing, for anything
    else (an incomplete head, a malformed or refused request, a repeated
    header, an older protocol version, the connection limit of
    Autobahn's own, debug logging on), which Autobahn then processes
    itself, with its own error answers and log lines.

    Autobahn reads the head line by line with two regular expressions a
    line, runs C{urlparse} on the target and builds a dozen debug-line
    arguments that are thrown away: an eighth of the in-memory handshake
    (router to 101, callgrind: 494,034 -> 432,243 instructions).  The
    state it leaves (the request's fields, the key, the remaining bytes)
    and the calls it makes (C{onConnect} through txaio, then
    C{succeedHandshake} or C{failHandshake}) are the same here;
    C{tests/test_handshake_fast.py} runs both on the same requests.
    """
    p: Any = protocol
    data: bytes = p.data
    end = data.find(b"\r\n\r\n")
    if end < 0 or _url_to_origin is None or _is_same_origin is None or not debug_is_off(protocol):
        return False
    if p.trustXForwardedFor or p.maxConnections > 0:
        return False
    text = data[:end].decode("iso-8859-1")
    line_end = text.find("\r\n")
    if line_end < 0:
        return False
    status_line = text[:line_end]
    start = _REQUEST_LINE.fullmatch(status_line)
    block = text[line_end + 2 :] + "\r\n"
    if start is None or _HEADER_BLOCK.fullmatch(block) is None:
        return False
    headers: Dict[str, str] = {}
    repeated: Set[str] = set()
    for line in block[:-2].split("\r\n"):
        name, _, value = line.partition(":")
        key = name.lower()
        value = value.strip(" \t")
        if value != value.strip():
            # Other whitespace at an edge (NBSP, NEL): Autobahn releases
            # before 26.11 strip it, later ones keep it.  Theirs to read.
            return False
        if key in headers:
            headers[key] += f", {value}"
            repeated.add(key)
        else:
            headers[key] = value
    if repeated & _ONCE:
        return False
    uri = start.group(1)
    path, _, query = uri.partition("?")
    if "host" not in headers:
        return False
    host = headers["host"].strip()
    if host.find(":") >= 0 and not host.endswith("]"):
        host, port_text = host.rsplit(":", 1)
        try:
            port = int(str(port_text.strip()))
        except ValueError:
            return False
        if p.factory.externalPort and port != p.factory.externalPort:
            return False
    if not _has_token(headers.get("upgrade"), "websocket") or not _has_token(headers.get("connection"), "upgrade"):
        return False
    if "sec-websocket-version" not in headers:
        return False
    try:
        version = int(headers["sec-websocket-version"])
    except ValueError:
        return False
    if version not in p.versions or version < 13:
        return False
    protocols: List[str] = []
    if "sec-websocket-protocol" in headers:
        protocols = [str(x.strip()) for x in headers["sec-websocket-protocol"].split(",")]
        if len(set(protocols)) != len(protocols):
            return False
    origin = ""
    if "origin" in headers:
        origin = headers["origin"].strip()
        try:
            origin_tuple = _url_to_origin(origin)
            if not (origin_tuple == "null" and p.factory.allowNullOrigin) and not _is_same_origin(
                origin_tuple,
                "https" if p.factory.isSecure else "http",
                p.factory.externalPort or p.factory.port,
                p.allowedOriginsPatterns,
            ):
                return False
        except Exception:
            return False
    key = headers.get("sec-websocket-key", "").strip()
    if len(key) != 24 or key[-2:] != "==" or not _BASE64.issuperset(key[:-2]):
        return False
    extensions: List[Any] = []
    if "sec-websocket-extensions" in headers:
        extensions = p._parseExtensionsHeader(headers["sec-websocket-extensions"])
    try:
        params = parse_qs(query) if query else {}
    except Exception:
        return False
    # Every check passed: leave what Autobahn leaves, in its order.
    p.http_request_data = data[: end + 4]
    p.http_status_line = status_line
    p.http_headers = headers
    p.http_request_uri = uri
    p.http_request_path = path
    p.http_request_params = params
    p.http_request_host = host
    p.websocket_version = version
    p.websocket_protocols = protocols
    p.websocket_origin = origin
    p.websocket_extensions = extensions
    p.data = data[end + 4 :]
    p._wskey = key
    request = ConnectionRequest(p.peer, headers, host, path, params, version, origin, protocols, extensions)
    _answer(p, request)
    return True


def _answer(p: Any, request: ConnectionRequest) -> None:
    """
    What Autobahn does with C{onConnect}'s answer, C{add_callbacks(
    as_future(onConnect, request), succeedHandshake, forward_error)},
    without the Deferred when C{onConnect} answers at once: C{succeedHandshake}
    with its answer, or the error path with its exception.  A failure of
    either (which Autobahn's Deferred would hold unhandled, and Twisted log
    when collected) is left in a Deferred likewise.
    """
    try:
        answer = p.onConnect(request)
    except BaseException:
        _then(_denied_by(p), Failure())
        return
    if isinstance(answer, (Deferred, Failure)) or iscoroutine(answer):  # as maybeDeferred tells them
        _txaio.add_callbacks(_txaio.as_future(lambda: answer), p.succeedHandshake, _denied_by(p))
        return
    _then(p.succeedHandshake, answer)


def _then(callback: Callable[[Any], Any], value: Any) -> None:
    try:
        callback(value)
    except BaseException:
        fail()  # an unhandled error in a Deferred, as Autobahn's would be


def _has_token(value: Optional[str], token: str) -> bool:
    """C{value}, a comma-separated header, holds C{token} (case-insensitive)."""
    return value is not None and any(item.strip().lower() == token for item in value.split(","))


def _denied_by(protocol: Any) -> Callable[[Any], None]:
    """What Autobahn's C{processHandshake} does when C{onConnect} fails."""

    def forward_error(err: Any) -> None:
        if isinstance(err.value, ConnectionDeny):
            protocol.failHandshake(err.value.reason, err.value.code)
        else:
            protocol.log.warn("Unexpected exception in onConnect ['{err.value}']", err=err)
            protocol.log.warn("{tb}", tb=_txaio.failure_format_traceback(err))
            protocol.failHandshake(f"Internal server error: {err.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)

    return forward_error


# -- Autobahn: whole data frames read in one pass --------------------------------

_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN
_STATE_CLOSING = WebSocketServerProtocol.STATE_CLOSING
#: FIN, no RSV bit, and opcode 1 (text) or 2 (binary): a message in one frame.
_WHOLE_TEXT = 0x81
_WHOLE_BINARY = 0x82


def read_frames(protocol: WebSocketServerProtocol, data: bytes, on_message: Callable[[bytes, bool], None]) -> bool:
    """
    Do what Autobahn's C{dataReceived} does with C{data} on an open
    connection, reading in one pass each whole message that comes in one
    masked, uncompressed text or binary frame within the size limits (and,
    for text, valid UTF-8), and calling C{on_message(payload, is_binary)}
    for it; return C{True}.  At the first frame it does not take (a
    control frame, a fragment, a frame cut by the end of C{data}, a
    protocol error, an oversized or invalid message), or once the
    connection is no longer open, it hands the rest to Autobahn's
    C{consumeData}, which goes on as it would have.  Return C{False},
    having changed nothing, when Autobahn must read all of C{data} itself:
    the connection is not open, a frame is under way or bytes wait before
    C{data}, or debug or frame logging is on.

    Autobahn's reading costs a masker object, a frame header object and
    eight calls per frame: about a tenth of a forwarded event.
    """
    p: Any = protocol
    try:
        if (
            p.state != _STATE_OPEN
            or p.data
            or p.current_frame is not None
            or p.inside_message
            or p.logOctets
            or p.logFrames
            or p.trackedTimings
            or not p.applyMask
            or not debug_is_off(p)
        ):
            return False
        stats = p.trafficStats
        validate = p.utf8validateIncoming
        max_frame = p.maxFramePayloadSize
        max_message = p.maxMessagePayloadSize
    except AttributeError:  # a release without these fields: Autobahn reads everything
        return False
    stats.incomingOctetsWireLevel += len(data)
    at, end = 0, len(data)
    while end - at >= 6:  # two bytes of header and a mask: an empty frame
        first, second = data[at], data[at + 1]
        if (first != _WHOLE_TEXT and first != _WHOLE_BINARY) or second < 0x80:  # not whole, or not masked
            break
        length = second & 0x7F
        if length < 126:
            start = at + 6
        elif length == 126 and end - at >= 8:
            length = (data[at + 2] << 8) | data[at + 3]
            if length < 126:  # not the shortest encoding: Autobahn's protocol error
                break
            start = at + 8
        else:
            break
        stop = start + length
        if stop > end or 0 < max_frame < length or 0 < max_message < length:
            break
        payload = _unmasked(data[start:stop], data[start - 4 : start]) if length else b""
        binary = first == _WHOLE_BINARY
        if validate and not binary:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        stats.incomingWebSocketFrames += 1
        stats.incomingWebSocketMessages += 1
        if p.autoPingTimeoutCall and p.autoPingRestartOnAnyTraffic:
            p._cancelAutoPingTimeoutCall()
        at = stop
        on_message(payload, binary)
        if p.state != _STATE_OPEN:
            break
    if at < end:
        p.data = data[at:] if at else data
        if p.state == _STATE_OPEN or p.state == _STATE_CLOSING:
            p.consumeData()
    return True


def _unmasked(payload: bytes, mask: bytes) -> bytes:
    """C{payload} XORed with C{mask} repeated, as one integer operation."""
    length = len(payload)
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


# -- Autobahn: what a handshake leaves behind -----------------------------------

#: What Autobahn's server keeps of an opening handshake for the life of the
#: connection (the request's bytes, its parsed headers, the 101's text),
#: read by nothing once the connection is open: 1.5 KiB or so per
#: connection, and a dozen objects the garbage collector walks.
HANDSHAKE_LEFTOVERS: Tuple[str, ...] = (
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_params",
    "http_response_data",
)


def drop_handshake_leftovers(protocol: WebSocketServerProtocol) -> None:
    """Let go of what the opening handshake left on an open connection."""
    fields = protocol.__dict__
    for name in HANDSHAKE_LEFTOVERS:
        if name in fields:
            fields[name] = None


# -- Autobahn: the close frame that allows 1001 ---------------------------------


def send_close_frame(protocol: WebSocketServerProtocol, code: int, reason: str) -> None:
    """
    Start a closing handshake with C{code}.  Autobahn's public
    C{sendClose()} refuses 1001 (Going Away), which a server that shuts
    down must send; the frame-level call it makes itself does not.
    """
    # A close frame's reason is at most 123 bytes, cut between characters:
    # a cut inside one would be invalid UTF-8, which the client refuses.
    reason_bytes = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    protocol.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)


# -- Autobahn and Twisted: the direct write path ----------------------------------


def prepare_frame(payload: bytes, binary: bool = False) -> PreparedMessage:
    """
    A server's text (or binary) frame, framed once for any number of
    recipients: what the factory's C{prepareMessage} does, without needing
    a factory.

    The fields are those C{PreparedMessage.__init__} sets for an unmasked,
    compressible frame, set here without its call, its join of five pieces
    and its C{struct} packing (a tenth of a C{send} to one connection).
    Should a release set other fields, its own constructor is used.
    """
    if not _FRAME_FIELDS_KNOWN:
        return PreparedMessage(payload, binary, False, False)
    frame: PreparedMessage = _new_frame(PreparedMessage)
    frame.payload = payload
    frame.binary = binary
    frame.doNotCompress = False
    size = len(payload)
    first = 0x82 if binary else 0x81
    if size <= 125:
        head = bytes((first, size))
    elif size <= 0xFFFF:
        head = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + size.to_bytes(8, "big")
    frame.payloadHybi = head + payload
    return frame


_new_frame = object.__new__
#: The fields Autobahn's C{PreparedMessage} sets for a frame to a client.
PREPARED_FRAME_FIELDS = ("payload", "binary", "doNotCompress", "payloadHybi")


def _frame_fields_known() -> bool:
    try:  # a release with slots, or another constructor, uses its own
        return sorted(vars(PreparedMessage(b"", False, False, False))) == sorted(PREPARED_FRAME_FIELDS)
    except Exception:
        return False


_FRAME_FIELDS_KNOWN = _frame_fields_known()


def frame_bytes(frame: PreparedMessage) -> bytes:
    """The bytes of an uncompressed prepared frame."""
    data: bytes = frame.payloadHybi
    return data


def send_now(protocol: WebSocketServerProtocol, data: bytes) -> bool:
    """
    Send C{data} to a client as Autobahn's C{sendData} would for a frame
    with nothing queued before it, minus its debug line (formatted eagerly
    on every send), through L{write_now}: C{False} when Autobahn must
    send it itself (compression was negotiated, or its own send queue
    holds frames).  These are private fields of Autobahn's: should a
    release rename one, every send takes the public path rather than
    failing.
    """
    try:
        if protocol._perMessageCompress is not None or protocol.send_queue:
            return False
    except AttributeError:
        return False
    write_now(protocol.transport, data)
    return True


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a peer, at once when the connection is plain TCP (a
    client's to the gateway, or the gateway's to the app) with nothing in
    the transport's buffers.

    Twisted's C{write()} always buffers: it has epoll watch the socket for
    writing, sends on the next turn of the reactor, then stops watching.
    For a fan-out to a thousand connections, an API answer or an event's
    POST, those two epoll calls and the dispatch cost more than the rest of
    the send.  Whatever the socket does not take at once (or an error) goes
    through C{write()}, behind nothing, so order, back-pressure and error
    handling are Twisted's as before.  TLS, and transports that are not
    Twisted's TCP connections, always use C{write()}.  The buffers are
    Twisted's private fields: should a release rename one, every write
    takes the ordinary path rather than failing.
    """
    if type(transport) in _TCP_CONNECTIONS:
        try:
            idle = (
                not transport.TLS
                and transport.connected
                and not transport.disconnecting
                and not transport._writeDisconnected
                and not transport._tempDataBuffer
                and transport.offset == len(transport.dataBuffer)
            )
            sock = transport.socket
        except AttributeError:
            idle = False
        if idle:
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error write() reports as it does
                sent = 0
            if sent == len(data):
                return
            if sent > 0:
                data = data[sent:]
    transport.write(data)


_TCP_CONNECTIONS = (tcp.Server, tcp.Client)


# -- Twisted: a ClientService that does not log every retry -----------------------


def quiet_client_service(level: LogLevel = LogLevel.warn) -> Type[ClientService]:
    """
    A C{ClientService} whose own log passes only C{level} and above:
    Twisted's logs every reconnection attempt, a line every few seconds
    while the peer is down.  It logs through its class's private C{_log}.
    """
    observer = FilteringLogObserver(globalLogPublisher, [LogLevelFilterPredicate(level)])
    return type("QuietClientService", (ClientService,), {"_log": Logger(observer=observer)})


# -- Twisted: a connection handed from one protocol to another --------------------


def hand_over(transport: Any, protocol: Any) -> None:
    """
    Make C{protocol} the receiver of C{transport}'s bytes from now on: the
    protocol a TCP transport calls is its C{protocol} attribute; under TLS
    the transport is the TLS protocol, which calls its C{wrappedProtocol}.
    (Twisted has no public call for this; Autobahn's C{WebSocketResource}
    relies on the same two fields.)
    """
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol


# -- Twisted: the twist command, run under another name ------------------------------


def run_twist(argv: Sequence[str], hint: str) -> None:
    """
    Run what C{python -m twisted} runs, with C{argv}; a usage error ends in
    its one line and C{hint}, without twist's synopsis (which names a
    plugin argument the C{wsgw} command does not take).  Twist's runner and
    options live in private modules.
    """
    from twisted.application.runner._exit import ExitStatus, exit
    from twisted.application.twist._options import TwistOptions
    from twisted.application.twist._twist import Twist
    from twisted.python import usage

    class Command(Twist):
        @staticmethod
        def options(argv: Sequence[str]) -> TwistOptions:
            options = TwistOptions()
            try:
                options.parseOptions(argv[1:])
            except usage.UsageError as e:
                exit(ExitStatus.EX_USAGE, f"Error: {e}\n{hint}")
            return options

    Command.main(list(argv))
