"""
Each new connection of a listener is routed by its first request: a
WebSocket upgrade of C{/ws} goes straight to Autobahn's protocol, anything
else to twisted.web.

Behind twisted.web alone, an upgrade was parsed twice: by twisted.web into
a request, then again by Autobahn, to which C{WebSocketResource} replays it
(with a request object, a resource traversal and the replay in between, a
third of a handshake's CPU).  Here only the request line and the
C{Upgrade} header are looked at; Autobahn parses the head once and its
protocol checks the origin, the user and the limits (L{wsgw.admission}).
The resource tree still serves C{/ws}, for embedding applications and for
requests that upgrade on a kept-alive API connection.
"""

from __future__ import annotations

from typing import Any, List, Optional, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.server import Site
from zope.interface import implementer

from . import internals
from .access import PeerRateLimiter, peer_host
from .apiserver import drop_slow_peer
from .jsonio import to_json
from .web import ALPN_PROTOCOLS, GatewaySite
from .websocket import GatewayFactory

log = Logger()

#: The longest head an upgrade may have (twisted.web allows 16 KiB of headers).
MAX_HEAD = 16 * 1024
_UPGRADE = b"\r\nupgrade:"


def _is_upgrade_of_ws(head: bytes) -> bool:
    """
    C{head} (up to its blank line) is C{GET /ws} or C{GET /ws?...} asking
    to upgrade to WebSocket.
    """
    line_end = head.find(b"\r\n")
    method, _, rest = head[:line_end].partition(b" ")
    target = rest.partition(b" ")[0]
    if method != b"GET" or not (target == b"/ws" or target.startswith(b"/ws?")):
        return False
    lowered = head.lower()
    at = lowered.find(_UPGRADE)
    while at >= 0:
        value = lowered[at + len(_UPGRADE) : lowered.find(b"\r\n", at + 2)].strip()
        if b"websocket" in value.split(b","):
            return True
        at = lowered.find(_UPGRADE, at + 2)
    return False


def _could_be_ws(start: bytes) -> bool:
    """What has arrived of the request line may still be C{GET /ws...}."""
    prefix = b"GET /ws"
    if len(start) < len(prefix):
        return prefix.startswith(start)
    return start.startswith(prefix) and (len(start) == len(prefix) or start[len(prefix)] in b" ?")


class FirstRequestRouter(Protocol):
    """
    Reads a new connection's first request head just far enough to choose
    who serves the connection, then hands the transport, and the bytes read
    so far, to that protocol for good.
    """

    factory: RouterFactory
    #: A TCP (or TLS) transport: it is handed on, so typed loosely.
    transport: Any

    def __init__(self, addr: Optional[IAddress]):
        self._addr = addr
        self._buffer = b""
        self._deadline: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        self._deadline = self.factory.reactor.callLater(self.factory.handshake_timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        buffer = self._buffer
        if not _could_be_ws(buffer[:8]):
            self._hand_to(self._web())
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._answer(431, "the request head is over 16 KiB")
            return
        if not _is_upgrade_of_ws(buffer[: end + 2]):
            self._hand_to(self._web())
            return
        limiter = self.factory.rate_limiter
        if limiter is not None:
            host = peer_host(self._addr)
            if host is not None and not limiter.allow(host):
                self._answer(429, "too many requests from this address; slow down")
                return
        websocket = cast(Optional[Protocol], self.factory.websocket.buildProtocol(self._addr))
        self._hand_to(websocket)

    def _web(self) -> Optional[Protocol]:
        site = self.factory.site
        if isinstance(site, GatewaySite):  # API calls skip twisted.web's channel (wsgw.apiserver)
            return site.api_channel(self._addr)
        protocol: Optional[Protocol] = site.buildProtocol(self._addr)
        return protocol

    def _hand_to(self, protocol: Optional[Protocol]) -> None:
        self._cancel_deadline()
        transport, data = self.transport, self._buffer
        self._buffer = b""
        if protocol is None:  # the factory refused it
            transport.loseConnection()
            return
        internals.hand_over(transport, protocol)
        protocol.makeConnection(transport)
        protocol.dataReceived(data)

    def _answer(self, status: int, message: str) -> None:
        self._cancel_deadline()
        log.info("refused a connection from {peer}: {message}", peer=str(self._addr), message=message)
        body = to_json({"code": status, "message": message}) + b"\n"
        reason = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n%s\r\n"
            % (status, reason, len(body), b"Retry-After: 1\r\n" if status == 429 else b"")
            + body
        )
        self.transport.loseConnection()

    def _too_slow(self) -> None:
        self._deadline = None
        drop_slow_peer(log, self.transport, self.factory.handshake_timeout, self._addr)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_deadline()


@implementer(IProtocolNegotiationFactory)
class RouterFactory(Factory):
    """
    A listener's factory: every connection starts with a
    L{FirstRequestRouter} that hands it to C{websocket} or to C{site}.
    """

    protocol = FirstRequestRouter  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        site: Site,
        websocket: GatewayFactory,
        reactor: Any,
        handshake_timeout: float,
        rate_limiter: Optional[PeerRateLimiter] = None,
    ):
        self.site = site
        self.websocket = websocket
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.rate_limiter = rate_limiter

    def acceptableProtocols(self) -> List[bytes]:
        return list(ALPN_PROTOCOLS)

    def buildProtocol(self, addr: Optional[IAddress]) -> FirstRequestRouter:  # type: ignore[override]
        protocol = FirstRequestRouter(addr)
        protocol.factory = self
        return protocol

    def doStart(self) -> None:
        # The site and the WebSocket factory start and stop with the listener.
        self.site.doStart()
        self.websocket.doStart()

    def doStop(self) -> None:
        self.site.doStop()
        self.websocket.doStop()
