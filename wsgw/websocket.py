"""
The client side: Autobahn's WebSocket protocol and factory for C{/ws}.

The protocol stays thin: it turns Autobahn's callbacks into calls on the
L{Gateway} and offers the gateway a small channel to send, close and pause.
It also bounds what waits in memory for a client that does not read.
"""

from __future__ import annotations

from typing import Optional, Tuple

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .gateway import CLOSE_TOO_SLOW, Gateway
from .identity import identify

_log = Logger()

#: The settings each protocol copies from its factory (see
#: L{GatewayProtocol.connectionMade}).
_SETTINGS = tuple(WebSocketServerProtocol.CONFIG_ATTRS)


@implementer(IPushProducer)
class GatewayProtocol(WebSocketServerProtocol):
    """
    One client connection at C{/ws}.

    It registers itself as the producer of its transport, so the transport
    tells it when its write buffer is full (the client is not reading).
    From then until the buffer drains, frames still sent are counted; past
    the factory's C{max_outgoing} bytes the connection is aborted rather
    than buffering without limit.
    """

    conn = None
    #: Bytes written while the transport said its buffer was full.
    _backlog_bytes: Optional[int] = None
    #: (code, reason) when the gateway closed this connection.
    _closed_by_gateway: Optional[Tuple[int, str]] = None
    _aborted = False

    #: Autobahn copies these settings from the factory itself, and also
    #: pretty-prints them all for a debug line that is then filtered out:
    #: a fifth of a handshake's CPU.  The copy is done here instead.
    CONFIG_ATTRS = ()

    def connectionMade(self):
        factory = self.factory
        for name in _SETTINGS:
            if not hasattr(self, name):
                setattr(self, name, getattr(factory, name))
        super().connectionMade()
        if self.transport is not None:
            self.transport.registerProducer(self, True)

    def onConnect(self, request):
        try:
            self.conn = identify(request.headers, _peer(request.peer), self.factory.user_header)
            self.conn.channel = self
        except Exception:
            _log.failure("could not read the identity of a new connection")
            raise
        # Select one of the offered subprotocols: echoing the whole list,
        # as the original does, makes browsers fail the handshake.
        return request.protocols[0] if request.protocols else None

    def onOpen(self):
        self.factory.gateway.opened(self.conn)

    def onMessage(self, payload, isBinary):
        self.factory.gateway.received(self.conn, payload, isBinary)

    def onPing(self, payload):
        # A WebSocket-level ping (Node's ws.ping()) is a sign of life too.
        super().onPing(payload)
        if self.conn is not None:
            self.factory.gateway.heard_from(self.conn)

    def onClose(self, wasClean, code, reason):
        if self.conn is None:
            return
        # Report the code of whoever closed first: Autobahn passes the
        # peer's, which for a close we started is only its echo.
        if self._closed_by_gateway is not None:
            code, reason = self._closed_by_gateway
        elif self.closedByMe and self.localCloseCode is not None:
            code = self.localCloseCode
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
        elif code is None:
            # 1005: the client closed properly but gave no code;
            # 1006: the connection just ended.
            code = 1005 if wasClean else 1006
        self.factory.gateway.closed(self.conn, code, reason or "")

    # -- IPushProducer: the transport's word on its write buffer -------------

    def pauseProducing(self):
        if self._backlog_bytes is None:
            self._backlog_bytes = 0

    def resumeProducing(self):
        self._backlog_bytes = None

    def stopProducing(self):
        self._backlog_bytes = None

    # -- the channel the gateway uses ---------------------------------------

    def deliver(self, frame) -> None:
        if self.state != self.STATE_OPEN or self._aborted:
            return
        data = frame.payloadHybi
        if self._backlog_bytes is not None:
            self._backlog_bytes += len(data)
            if self._backlog_bytes > self.factory.max_outgoing:
                self._abort_too_slow()
                return
        if self._perMessageCompress is None and not self.send_queue:
            # What sendPreparedMessage does for an uncompressed frame with
            # nothing queued before it, minus the debug line it formats
            # (eagerly) on every send.
            _write_now(self.transport, data)
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        else:
            self.sendPreparedMessage(frame)

    def _abort_too_slow(self) -> None:
        code, reason = CLOSE_TOO_SLOW
        _log.info(
            "{conn_id} does not read: over {limit} bytes waiting; closing",
            conn_id=self.conn.conn_id if self.conn else None,
            limit=self.factory.max_outgoing,
        )
        self._closed_by_gateway = CLOSE_TOO_SLOW
        self._aborted = True
        # A close frame would wait behind everything the client does not
        # read; drop what is buffered and the connection with it.
        self.factory.gateway.forget(self.conn)
        self.transport.abortConnection()

    def close_with(self, code: int, reason: str) -> None:
        if self._closed_by_gateway is None:
            self._closed_by_gateway = (code, reason)
        # sendClose() refuses 1001, which a server going away must send.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()


def _write_now(transport, data: bytes) -> None:
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
    if type(transport) is tcp.Server and _idle(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def _idle(transport) -> bool:
    """
    Nothing waits in C{transport}'s buffers.  These are Twisted's private
    fields: should a Twisted release rename them, every write takes the
    ordinary path rather than failing.
    """
    try:
        return (
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
        )
    except AttributeError:
        return False


def _peer(peer: str) -> str:
    """
    C{"tcp:127.0.0.1:5555"} → C{"127.0.0.1"}; other forms stay as they are.
    """
    kind, _, rest = peer.partition(":")
    if kind in ("tcp", "tcp4", "tcp6") and rest:
        host, _, _port = rest.rpartition(":")
        return host or rest
    return peer


class GatewayFactory(WebSocketServerFactory):
    """
    Builds L{GatewayProtocol}s that report to one L{Gateway}.
    """

    protocol = GatewayProtocol

    def __init__(
        self,
        *,
        reactor,
        user_header: str = "X-Bfl-User",
        max_message_size: int = 1024 * 1024,
        max_outgoing: int = 1024 * 1024,
        handshake_timeout: float = 10.0,
    ):
        super().__init__(reactor=reactor)
        self.user_header = user_header
        self.max_outgoing = max_outgoing
        self.gateway: Gateway = None  # set by whoever wires the gateway
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=2.0,
            autoPingInterval=0,
            # Tell a misbehaving client why (1009 too big, 1007 bad UTF-8,
            # 1002 protocol error) instead of silently dropping it.
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
        )

    def prepare_text(self, payload: bytes):
        """
        Encode a text frame once for any number of recipients.
        """
        return self.prepareMessage(payload, isBinary=False)
