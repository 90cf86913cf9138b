"""
Every place wsgw relies on a private field of Twisted or Autobahn, each for
a measured gain or a behaviour their public API does not offer.

Kept here, together, so that an upgrade of either is checked in one place:
C{tests/test_internals.py} has a test per assumption that fails loudly when
a release changes what is relied on.  Where a field is missing at run time
the code takes the public path instead of failing.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple, Type

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.internet import ClientService
from twisted.internet import tcp
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper

# -- Autobahn: the settings copy -----------------------------------------------

#: The settings Autobahn copies from the factory to each protocol as it
#: connects.  It also pretty-prints them all for a debug line that is then
#: filtered out, a fifth of a handshake's CPU; L{copy_settings} does the
#: copy alone, and a protocol that uses it declares C{CONFIG_ATTRS = ()}.
PROTOCOL_SETTINGS: Tuple[str, ...] = tuple(WebSocketServerProtocol.CONFIG_ATTRS)


def copy_settings(protocol: WebSocketServerProtocol, factory: Any) -> None:
    """Copy the factory's settings a protocol has not set itself."""
    for name in PROTOCOL_SETTINGS:
        if not hasattr(protocol, name):
            setattr(protocol, name, getattr(factory, name))


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


def writes_directly(protocol: WebSocketServerProtocol) -> bool:
    """
    A prepared frame can go straight to the transport: no compression was
    negotiated and nothing waits in Autobahn's own send queue ahead of it.
    """
    try:
        return protocol._perMessageCompress is None and not protocol.send_queue
    except AttributeError:
        return False


def count_sent(protocol: WebSocketServerProtocol, size: int) -> None:
    """Keep Autobahn's traffic statistics as C{sendPreparedMessage} would."""
    stats = getattr(protocol, "trafficStats", None)
    if stats is not None:
        stats.outgoingOctetsWireLevel += size


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a client, sending it at once when the connection is
    plain TCP with nothing waiting in its buffer.

    Twisted's C{write()} always buffers: it has epoll watch the socket for
    writing, sends on the next turn of the reactor, then stops watching.
    For a fan-out to a thousand connections those two epoll calls and the
    dispatch per connection cost more than the rest of the send.  Whatever
    the socket does not take at once (or an error) goes through C{write()},
    behind nothing, so order, back-pressure and error handling are
    Twisted's as before.  TLS, and transports that are not Twisted's TCP
    connections, always use C{write()}.
    """
    if type(transport) is tcp.Server and transport_idle(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


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
