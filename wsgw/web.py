"""
The HTTP side: the resource tree (C{/ws} and C{/tapr/ws/conn/...}) and the
C{Site} that serves it with the gateway's limits.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .api import JsonTree, conn_api, error_response
from .config import Config
from .gateway import Gateway

log = Logger()


class WebSocketEntry(Resource):
    """
    C{/ws}: WebSocket upgrades go to Autobahn, once the connection limits
    allow; anything else is told, in JSON, to upgrade (426).
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, config: Config):
        super().__init__()
        self._gateway = gateway
        self._websocket = WebSocketResource(gateway.factory)
        self._user_header = config.user_header.encode("ascii")
        self._max_total = config.max_connections
        self._max_per_user = config.max_connections_per_user

    def render(self, request):
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"Upgrade", b"websocket")
            return error_response(request, 426, "this path takes WebSocket connections only; send Upgrade: websocket")
        refusal = self._over_limit(request)
        if refusal is not None:
            status, message = refusal
            log.info("handshake refused: {message}", message=message)
            return error_response(request, status, message)
        # The connection leaves twisted.web for good: stop the HTTP
        # channel's idle timer (it would fire hours later on a channel that
        # no longer owns the socket) and let the WebSocket protocol be the
        # transport's producer in its place.
        channel = request.channel
        channel.setTimeout(None)
        if channel.transport is not None:
            channel.transport.unregisterProducer()
        return self._websocket.render(request)

    def _over_limit(self, request):
        registry = self._gateway.registry
        if self._max_total and len(registry) >= self._max_total:
            return 503, f"the gateway holds its limit of {self._max_total} connections; try again later"
        if self._max_per_user:
            user = (request.getHeader(self._user_header) or b"").decode("utf-8", "replace").strip()
            if registry.count_user(user) >= self._max_per_user:
                return 429, f"this user holds its limit of {self._max_per_user} connections"
        return None


def make_resource(gateway: Gateway, config: Config = Config()) -> Resource:
    """
    A resource serving C{ws} (the WebSocket) and C{tapr/ws/conn/...} (the
    API) below wherever it is mounted.
    """
    root = JsonTree()
    root.putChild(b"ws", WebSocketEntry(gateway, config))
    tapr = JsonTree()
    ws = JsonTree()
    tapr.putChild(b"ws", ws)
    ws.putChild(b"conn", conn_api(gateway, config.max_api_body))
    root.putChild(b"tapr", tapr)
    return root


class BoundedRequest(Request):
    """
    A request that stops storing its body past the site's C{max_body}: the
    API answers 413 without the gateway holding an oversized body.
    """

    too_large = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.channel.site.max_body:
            self.too_large = True
        super().gotLength(None if self.too_large else length)

    def handleContentChunk(self, data):
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class GatewayChannel(HTTPChannel):
    """
    An HTTP connection that must send its first complete request (a
    WebSocket handshake or an API call) within the site's
    C{handshake_timeout}, however slowly it trickles in.
    """

    _first_request_deadline = None

    def connectionMade(self):
        super().connectionMade()
        self._first_request_deadline = self.callLater(self.site.handshake_timeout, self._no_request_in_time)

    def allContentReceived(self):
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self):
        if self._first_request_deadline is not None:
            if self._first_request_deadline.active():
                self._first_request_deadline.cancel()
            self._first_request_deadline = None

    def _no_request_in_time(self):
        self._first_request_deadline = None
        log.info("no complete request within {timeout}s from {peer}; dropping it",
                 timeout=self.site.handshake_timeout, peer=str(self.transport.getPeer()))
        self.transport.abortConnection()


class GatewaySite(Site):
    """
    The daemon's C{Site}: bounded bodies, a deadline for the first request,
    API connections idle at most a minute, and no access-log line per
    request (at thousands of API calls a second it costs more than the call).
    """

    protocol = GatewayChannel
    requestFactory = BoundedRequest

    def __init__(self, resource, config: Config, reactor=None):
        super().__init__(resource, timeout=60, reactor=reactor)
        self.max_body = config.max_api_body
        self.handshake_timeout = config.handshake_timeout

    def log(self, request):
        pass
