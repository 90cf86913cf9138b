"""
Every place wsgw relies on a private field of Twisted or Autobahn, each for
a measured gain or a behaviour their public API does not offer.

Kept here, together, so that an upgrade of either is checked in one place:
C{tests/test_internals.py} has a test per assumption that fails loudly when
a release changes what is relied on.  Where a field is missing at run time
the code takes the public path instead of failing.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, Sequence, Tuple, Type, TypeVar

from autobahn.twisted import websocket as autobahn_twisted_websocket
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.internet import ClientService
from twisted.internet import tcp
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper

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
    """
    return PreparedMessage(payload, binary, False, False)


def frame_bytes(frame: PreparedMessage) -> bytes:
    """The bytes of an uncompressed prepared frame."""
    data: bytes = frame.payloadHybi
    return data


def send_now(protocol: WebSocketServerProtocol, data: bytes) -> bool:
    """
    Send C{data} to a client as Autobahn's C{sendData} would for a frame
    with nothing queued before it, minus its debug line (formatted eagerly
    on every send), through L{write_now}: C{False} when Autobahn must send
    it itself (compression was negotiated, or its own send queue holds
    frames).  These are private fields of Autobahn's: should a release
    rename one, every send takes the public path rather than failing.
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
    Write C{data} to a peer, at once when the connection is plain TCP with
    nothing in the transport's buffer.

    Twisted's C{write()} always buffers: it has epoll watch the socket for
    writing, sends on the next turn of the reactor, then stops watching.
    For a fan-out to a thousand connections (or an API answer) those two
    epoll calls and the dispatch cost more than the rest of the send.
    Whatever the socket does not take at once (or an error) goes through
    C{write()}, behind nothing, so order, back-pressure and error handling
    are Twisted's as before.  TLS, and transports that are not Twisted's
    TCP connections, always use C{write()}.
    """
    try:
        sock = transport.socket if type(transport) is _TCP_SERVER and transport_idle(transport) else None
    except AttributeError:
        sock = None
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:  # EAGAIN, or an error write() reports as it does
            sent = 0
        if sent == len(data):
            return
        if sent > 0:
            data = data[sent:]
    transport.write(data)


_TCP_SERVER = tcp.Server


def transport_idle(transport: Any) -> bool:
    """
    Nothing waits in C{transport}'s buffers.  These are Twisted's private
    fields: should a release rename them, every write takes the ordinary
    path rather than failing.
    """
    try:
        return bool(
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
        )
    except AttributeError:
        return False


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
