"""
The client side: Autobahn's WebSocket protocol and factory for C{/ws}.

The protocol stays thin: it turns Autobahn's callbacks into calls on the
L{Gateway} and offers the gateway a small channel to send, close and pause.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from .gateway import Gateway
from .identity import identify

_log = Logger()


class GatewayProtocol(WebSocketServerProtocol):
    """
    One client connection at C{/ws}.
    """

    conn = None

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

    def onClose(self, wasClean, code, reason):
        if self.conn is not None:
            self.factory.gateway.closed(self.conn, code, reason or "")

    # -- the channel the gateway uses ---------------------------------------

    def deliver(self, frame) -> None:
        if self.state == self.STATE_OPEN:
            self.sendPreparedMessage(frame)

    def close_with(self, code: int, reason: str) -> None:
        # sendClose() refuses 1001, which a server going away must send.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()


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

    def __init__(self, *, reactor, user_header: str = "X-Bfl-User",
                 max_message_size: int = 1024 * 1024, handshake_timeout: float = 10.0):
        super().__init__(reactor=reactor)
        self.user_header = user_header
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
