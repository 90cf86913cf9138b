"""
The client side: Autobahn's WebSocket protocol and factory for C{/ws}.

The protocol stays thin: it turns Autobahn's callbacks into calls on the
L{Gateway} and offers the gateway a small channel to send, close and pause.
It also bounds what waits in memory for a client that does not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Optional, Tuple, Union

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from . import internals
from .admission import HandshakePolicy, Refusal
from .config import Networks
from .gateway import CLOSE_TOO_SLOW, Gateway
from .identity import identify
from .interfaces import IChannel
from .jsonio import to_json
from .registry import Connection

if TYPE_CHECKING:
    from .connect import ConnectHook, Verdict

_log = Logger()

#: Frames as the gateway prepares them, once for every recipient.
prepare_frame = internals.prepare_frame


@implementer(IPushProducer, IChannel)
class GatewayProtocol(WebSocketServerProtocol):
    """
    One client connection at C{/ws}.

    It registers itself as the producer of its transport, so the transport
    tells it when its write buffer is full (the client is not reading).
    From then until the buffer drains, frames still sent are counted; past
    the factory's C{max_outgoing} bytes the connection is aborted rather
    than buffering without limit.
    """

    factory: GatewayFactory
    conn: Optional[Connection] = None
    #: Bytes written while the transport said its buffer was full.
    _backlog_bytes: Optional[int] = None
    #: (code, reason) when the gateway closed this connection.
    _closed_by_gateway: Optional[Tuple[int, str]] = None
    _aborted = False
    #: Why the handshake was refused, when it was.
    _refused: Optional[Refusal] = None
    #: The app's decision on this handshake, while it is awaited.
    _deciding: Optional[Deferred[Verdict]] = None

    #: One of the settings (L{internals.with_settings}).
    logOctets: bool

    #: A TCP (or TLS) transport: a consumer this protocol produces for, and
    #: a producer whose reading it pauses.
    transport: Any

    #: The settings are class attributes of the factory's subclass
    #: (L{internals.with_settings}): nothing is copied per connection.
    CONFIG_ATTRS = ()  # type: ignore[assignment]  # Autobahn only iterates it

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.transport is not None:
            self.transport.registerProducer(self, True)

    def onConnect(  # type: ignore[override]  # Autobahn takes a Deferred too
        self, request: ConnectionRequest
    ) -> Union[Optional[str], Deferred[Optional[str]]]:
        headers = request.headers
        try:
            conn = identify(headers, _peer(request.peer), self.factory.user_header, self.factory.trusted_proxies)
        except Exception:
            _log.failure("could not read the identity of a new connection")
            raise
        policy = self.factory.policy
        refusal = policy.refusal(
            headers.get("origin"), [headers.get("host", ""), headers.get("x-forwarded-host", "")], conn.user_name
        )
        if refusal is not None:
            self._refuse(refusal, headers.get("origin"))
        hook = self.factory.connect_hook
        if hook is None:
            return self._admitted(conn, request)
        # The app decides; meanwhile the handshake holds a place under the
        # connection limits.
        waiting = policy.waiting
        waiting.add(conn.user_name)
        self._deciding = decision = hook.admit(conn)

        def decided(result: Any) -> Any:
            waiting.discard(conn.user_name)
            self._deciding = None
            return result

        def verdict(verdict: Verdict) -> Optional[str]:
            if verdict.refusal is not None:
                self._refuse(verdict.refusal)
            return self._admitted(conn, request)

        def hung_up(failure: Failure) -> None:
            failure.trap(CancelledError)
            raise ConnectionDeny(400, "the client went away while the app decided")

        return decision.addBoth(decided).addCallbacks(verdict, hung_up)

    def _admitted(self, conn: Connection, request: ConnectionRequest) -> Optional[str]:
        conn.channel = self
        self.conn = conn
        # Select one of the offered subprotocols: echoing the whole list,
        # as the original does, makes browsers fail the handshake.
        return request.protocols[0] if request.protocols else None

    def _refuse(self, refusal: Refusal, origin: Optional[str] = None) -> NoReturn:
        self._refused = refusal
        stats = self.factory.gateway.stats
        stats.count(stats.refused, refusal.label)
        if refusal.label == "origin":
            # Which page was refused, so that the log alone says what to allow.
            _log.info(
                "handshake refused: {message}; Origin: {origin}", message=refusal.message, origin=(origin or "")[:200]
            )
        else:
            _log.info("handshake refused: {message}", message=refusal.message)
        raise ConnectionDeny(refusal.status, refusal.message)

    def processHandshake(self) -> None:
        """
        An opening handshake that passes every check of Autobahn's is read
        in one pass (L{internals.read_handshake}); anything else, Autobahn
        reads and answers itself.
        """
        if not internals.read_handshake(self):
            super().processHandshake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deciding is not None:
            self._deciding.cancel()  # nobody is there for the app's answer
        super().connectionLost(reason)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """
        A refused handshake is answered as every other error of the
        gateway's: in JSON, saying what was wrong (Autobahn's own answer has
        no body), and with C{Retry-After} when a limit was reached.
        """
        refused = self._refused
        body = (
            refused.body if refused is not None and refused.body else to_json({"code": code, "message": reason}) + b"\n"
        )
        head = [
            b"HTTP/1.1 %d %s" % (code, RESPONSES.get(code, b"Error")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        retry_after = refused.retry_after if refused is not None else None
        if retry_after is not None:
            head.append(b"Retry-After: %d" % retry_after)
        for name, value in responseHeaders or ():
            head.append(f"{name}: {value}".encode("latin-1", "replace"))
        self.sendData(b"\r\n".join(head) + b"\r\n\r\n" + body)

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """
        Everything Autobahn sends (the 101, pongs, close frames) goes to the
        socket at once when nothing waits before it (L{internals.send_now}).
        """
        if sync or chopsize or self.logOctets or not internals.send_now(self, data):
            super().sendData(data, sync, chopsize)
            return
        state = self.state
        if state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == self.STATE_CONNECTING or state == self.STATE_PROXY_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def onOpen(self) -> None:
        assert self.conn is not None
        internals.drop_handshake_leftovers(self)
        self.factory.gateway.opened(self.conn)

    def dataReceived(self, data: bytes) -> None:
        """
        Whole messages in one small frame each, on an open connection, are
        read in one pass (L{internals.read_frames}); anything else, Autobahn
        reads itself.
        """
        if not internals.read_frames(self, data, self._message_end):
            super().dataReceived(data)

    def onMessageFrameEnd(self) -> None:
        """
        Autobahn's, without its two hops (C{_onMessageFrame},
        C{onMessageFrame}) per frame: this protocol adds nothing there.
        """
        if not self.failedByMe:
            self.message_data.extend(self.frame_data)
        self.frame_data = None  # type: ignore[assignment]  # as Autobahn resets it

    def onMessageEnd(self) -> None:
        """
        Autobahn's, calling L{onMessage} directly, and firing its C{message}
        signal only when someone listens: with no listener (wsgw adds none)
        firing builds a fired Deferred and a callback per message for
        nothing.  C{_listeners} is Autobahn's (C{ObservableMixin}); should a
        release drop it, the signal is fired as before.
        """
        if not self.failedByMe:
            payload = b"".join(self.message_data)
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._message_end(payload, self.message_is_binary)
        self.message_data = None  # type: ignore[assignment]  # as Autobahn resets it

    def _message_end(self, payload: bytes, is_binary: bool) -> None:
        self.onMessage(payload, is_binary)
        if getattr(self, "_listeners", True) is not None:
            fired = self.fire("message", payload, is_binary=is_binary)
            fired.addErrback(self._message_signal_failed)

    def _message_signal_failed(self, failure: Failure) -> None:
        # As Autobahn logs it: a listener's error is the listener's.
        self.log.error("Firing signal 'message' failed: {fail}", fail=failure)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.conn is not None
        self.factory.gateway.received(self.conn, payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        # A WebSocket-level ping (Node's ws.ping()) is a sign of life too.
        super().onPing(payload)
        if self.conn is not None:
            self.factory.gateway.heard_from(self.conn)

    def onPong(self, payload: bytes) -> None:
        # So is a pong: the answer to the gateway's own ping, or one the
        # client sends unasked (a browser's keep-alive).
        super().onPong(payload)
        if self.conn is not None:
            self.factory.gateway.heard_from(self.conn)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
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

    def pauseProducing(self) -> None:
        if self._backlog_bytes is None:
            self._backlog_bytes = 0

    def resumeProducing(self) -> None:
        self._backlog_bytes = None

    def stopProducing(self) -> None:
        self._backlog_bytes = None

    # -- IChannel: what the gateway drives -----------------------------------

    def deliver(self, frame: Any) -> None:  # a PreparedMessage from prepare_frame
        # The open state as a module constant: read through the instance,
        # Autobahn's class attribute is a look-up the interpreter does not
        # specialise, once per recipient of every send.
        if self.state != _STATE_OPEN or self._aborted:
            return
        data = internals.frame_bytes(frame)
        if self._backlog_bytes is not None:
            self._backlog_bytes += len(data)
            if self._backlog_bytes > self.factory.max_outgoing:
                self._abort_too_slow()
                return
        # What sendPreparedMessage does for an uncompressed frame with nothing
        # queued before it, minus the debug line it formats on every send.
        if internals.send_now(self, data):
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        else:
            self.sendPreparedMessage(frame)

    def _abort_too_slow(self) -> None:
        _log.info(
            "{conn_id} does not read: over {limit} bytes waiting; closing",
            conn_id=self.conn.conn_id if self.conn else None,
            limit=self.factory.max_outgoing,
        )
        self._closed_by_gateway = CLOSE_TOO_SLOW
        self._aborted = True
        # A close frame would wait behind everything the client does not
        # read; drop what is buffered and the connection with it.
        if self.conn is not None:
            self.factory.gateway.forget(self.conn)
        self.transport.abortConnection()

    def ping(self) -> None:
        if self.state == self.STATE_OPEN and not self._aborted:
            self.sendPing()

    def close_with(self, code: int, reason: str) -> None:
        if self._closed_by_gateway is None:
            self._closed_by_gateway = (code, reason)
        internals.send_close_frame(self, code, reason)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()


_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN


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
    Builds L{GatewayProtocol}s that report to C{gateway}.

    C{handshake_timeout} is Autobahn's own deadline for the opening
    handshake; 0 turns it off, for a factory whose handshakes arrive whole
    from twisted.web (see L{wsgw.web.make_resource}).

    Its C{protocol} is a subclass holding the protocol settings as class
    attributes, made again by each C{setProtocolOptions} (setting an
    option attribute on the factory directly does not reach it).
    """

    protocol = GatewayProtocol  # type: ignore[assignment]  # its factory is a GatewayFactory
    noisy = False  # no "Starting factory" line at start-up and stop

    def __init__(
        self,
        gateway: Gateway,
        *,
        reactor: Any,
        policy: Optional[HandshakePolicy] = None,
        connect_hook: Optional[ConnectHook] = None,
        trusted_proxies: Optional[Networks] = None,
        user_header: str = "X-Bfl-User",
        max_message_size: int = 1024 * 1024,
        max_outgoing: int = 1024 * 1024,
        handshake_timeout: float = 10.0,
    ):
        internals.defer_debug_arguments()
        super().__init__(reactor=reactor)
        self.gateway = gateway
        #: What a handshake must pass: by default, anything.
        self.policy = policy or HandshakePolicy(gateway.registry)
        #: Asks the app before answering a handshake (--connect-url).
        self.connect_hook = connect_hook
        #: Peers whose forwarding headers are believed; None: any peer's.
        self.trusted_proxies = trusted_proxies
        self.user_header = user_header
        self.max_outgoing = max_outgoing
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

    def setProtocolOptions(self, **options: Any) -> None:  # type: ignore[override]  # the same keywords
        super().setProtocolOptions(**options)
        self.protocol = internals.with_settings(type(self).protocol, self)
