"""
The HTTP side: the resource tree (C{/ws} and C{/tapr/ws/conn/...}) and the
C{Site} that serves it with the gateway's limits.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any, Dict, List, Optional, Union, cast

import attr
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from .access import ApiAccess, OriginPolicy, PeerRateLimiter, peer_host
from .admission import HandshakePolicy
from .api import JsonTree, conn_api
from .apiserver import ApiChannel
from .config import Config, trusted_networks
from .health import Health, Readiness
from .jsonio import error_response
from .metrics import MetricsPage
from .websocket import GatewayFactory

if TYPE_CHECKING:
    from .service import Node

log = Logger()


class WebSocketEntry(Resource):
    """
    C{/ws} in a resource tree: WebSocket upgrades go to Autobahn (whose
    protocol checks the origin, the user and the limits); anything else is
    told, in JSON, to upgrade (426).

    The daemon's listeners hand upgrades to Autobahn before twisted.web
    sees them (L{wsgw.router}); this serves an embedding application's
    C{Site}, and requests that upgrade on a kept-alive API connection.
    """

    isLeaf = True

    def __init__(self, factory: GatewayFactory):
        super().__init__()
        self._websocket = WebSocketResource(factory)

    def render(self, request: Request) -> Union[bytes, int]:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"Upgrade", b"websocket")
            return error_response(request, 426, "this path takes WebSocket connections only; send Upgrade: websocket")
        # The connection leaves twisted.web for good (the HTTP channel
        # already stopped its idle timer for this request): let the
        # WebSocket protocol be the transport's producer in its place.
        channel = request.channel
        if channel.transport is not None:
            cast(Any, channel.transport).unregisterProducer()
        result: Union[bytes, int] = self._websocket.render(request)
        return result


class GuardedApi(Resource):
    """
    The API behind its door (L{ApiAccess}): a refused caller gets 401 or
    403 in JSON whatever path below it asked for.
    """

    def __init__(self, api: Resource, access: ApiAccess):
        super().__init__()
        self._api = api
        self._access = access

    def getChildWithDefault(self, name, request):
        refused = self.refused(request)
        if refused is not None:
            return refused
        return self._api.getChildWithDefault(name, request)

    def refused(self, request: Any) -> Optional[Refusal]:
        """The answer to a caller at this door who may not pass, or L{None}."""
        refusal = self._access.refusal(request)
        return None if refusal is None else Refusal(*refusal)

    def render(self, request):
        refused = self.refused(request)
        if refused is not None:
            return refused.render(request)
        return self._api.render(request)


class Refusal(Resource):
    isLeaf = True

    def __init__(self, status: int, message: str):
        super().__init__()
        self.status = status
        self.message = message

    def render(self, request):
        log.info(
            "refused {method} {path} from {peer}: {message}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            peer=str(request.getClientAddress()),
            message=self.message,
        )
        if self.status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="wsgw"')
        if self.status == 429:
            request.setHeader(b"Retry-After", b"1")  # as the router's handshake refusals say
        return error_response(request, self.status, self.message)


@attr.s(frozen=True, slots=True)
class Route:
    """
    Where a walk of the tree ends for one path, when every step of it is a
    lookup among a resource's put children: the leaf, and the API's door
    (L{GuardedApi}) when the last step goes through it.
    """

    segments: List[bytes] = attr.ib()
    leaf: Resource = attr.ib()
    door: Optional[GuardedApi] = attr.ib()


def _put_child(resource: Resource, name: bytes) -> Optional[Resource]:
    """C{resource}'s child C{name} when C{getChildWithDefault} finds it among the put ones, for any request."""
    if type(resource).getChildWithDefault is not Resource.getChildWithDefault:
        return None
    child: Optional[Resource] = resource.children.get(name)
    return child


def static_route(root: Resource, segments: List[bytes]) -> Optional[Route]:
    """
    The L{Route} of C{segments} below C{root}, or L{None} when walking them
    could take another turn for some request (a child made by C{getChild},
    a resource with its own C{getChildWithDefault}, a leaf before the last
    segment, a door before the last step): then only the walk itself says.
    The walk's calls have no effect of their own but the door's question.
    """
    resource, door = root, None
    for name in segments:
        # The walk stops at a leaf; a refusal at a door is a leaf too, so
        # the door must take the last step for a refused walk to end where
        # a passed one does.
        if resource.isLeaf or door is not None:
            return None
        if type(resource) is GuardedApi:
            door, resource = resource, resource._api
        child = _put_child(resource, name)
        if child is None:
            return None
        resource = child
    return Route(list(segments), resource, door)


def websocket_factory(node: Node, *, behind_web: bool = True) -> GatewayFactory:
    """
    The WebSocket factory for a node's C{/ws}.

    Behind twisted.web (C{behind_web}) the upgrade request reaches Autobahn
    whole and is answered in the same call, and the site's first-request
    deadline already bounds the handshake: Autobahn's own timer would be
    set and cancelled on every connection for nothing (6% of a handshake).
    """
    config = node.config
    policy = HandshakePolicy(
        node.gateway.registry,
        OriginPolicy(config.allowed_origins),
        user_header=config.user_header,
        require_user=config.require_user,
        max_connections=config.max_connections,
        max_connections_per_user=config.max_connections_per_user,
        max_waiting=config.connect_max_waiting if node.connect_hook is not None else 0,
    )
    return GatewayFactory(
        node.gateway,
        reactor=node.reactor,
        policy=policy,
        connect_hook=node.connect_hook,
        trusted_proxies=trusted_networks(config.trusted_proxies) if config.trusted_proxies else None,
        user_header=config.user_header,
        max_message_size=config.max_message_size,
        max_outgoing=config.max_outgoing,
        handshake_timeout=0 if behind_web else config.handshake_timeout,
    )


_UNKNOWN: Any = object()


def make_resource(
    node: Node, *, websocket: bool = True, api: bool = True, factory: Optional[GatewayFactory] = None
) -> Resource:
    """
    A resource serving C{ws} (the WebSocket), C{tapr/ws/conn/...} and
    C{metrics} (the API and its metrics, guarded as the node's config says),
    and C{healthz}/C{readyz} below wherever it is mounted; the WebSocket or
    the API can be left out, to serve them on separate listeners.
    C{factory}: the WebSocket factory of C{ws}, when the caller has one.
    """
    config, gateway = node.config, node.gateway
    root = JsonTree()
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Readiness(gateway, node.cluster))
    if websocket:
        root.putChild(b"ws", WebSocketEntry(factory or websocket_factory(node)))
    if api:
        tapr = JsonTree()
        ws = JsonTree()
        tapr.putChild(b"ws", ws)
        access = ApiAccess(config.admin_token, config.admin_allow_remote)
        ws.putChild(b"conn", GuardedApi(conn_api(node.connections, config.max_api_body), access))
        root.putChild(b"tapr", tapr)
        metrics = MetricsPage(gateway, node.cluster, node.connect_hook, node.tls)
        root.putChild(b"metrics", GuardedApi(metrics, access))
    return root


class BoundedRequest(Request):
    """
    A request that stops storing its body past the site's C{max_body}: the
    API answers 413 without the gateway holding an oversized body.
    """

    channel: GatewayChannel
    too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.channel.site.max_body:
            self.too_large = True
        super().gotLength(None if self.too_large else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            content = cast(IO[bytes], self.content)  # made by gotLength
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)


class GatewayChannel(HTTPChannel):
    """
    An HTTP connection that must send its first complete request (a
    WebSocket handshake or an API call) within the site's
    C{handshake_timeout}, however slowly it trickles in.
    """

    site: GatewaySite
    transport: Any  # a TCP (or TLS) transport: it can abort
    _first_request_deadline: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._first_request_deadline = self.callLater(self.site.handshake_timeout, self._no_request_in_time)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._first_request_deadline is not None:
            if self._first_request_deadline.active():
                self._first_request_deadline.cancel()
            self._first_request_deadline = None

    def _no_request_in_time(self) -> None:
        self._first_request_deadline = None
        log.info(
            "no complete request within {timeout}s from {peer}; dropping it",
            timeout=self.site.handshake_timeout,
            peer=str(self.transport.getPeer()),
        )
        self.transport.abortConnection()


class GatewaySite(Site):
    """
    The daemon's C{Site}: bounded bodies, a deadline for the first request,
    API connections idle at most a minute, and no access-log line per
    request (at thousands of API calls a second it costs more than the call).

    Bodies are not parsed as HTML forms: the API reads JSON, and curl's
    C{-d} labels it a form, which twisted.web would otherwise parse (its
    content-type parsing, through the C{email} package, was a fifth of the
    CPU of a C{send}).
    """

    protocol = GatewayChannel  # type: ignore[assignment]  # Twisted types it as a plain callable
    requestFactory = BoundedRequest
    noisy = False  # start-up says where it serves (wsgw.tap); no "Starting factory" lines

    def __init__(self, resource: Resource, config: Config, reactor: Any = None):
        super().__init__(resource, timeout=60, reactor=reactor, parsePOSTFormSubmission=False)
        self.max_body = config.max_api_body
        self.handshake_timeout = config.handshake_timeout
        self.rate_limiter = PeerRateLimiter(self.reactor, config.rate_limit) if config.rate_limit else None
        #: L{static_route} by request path, for the API's endpoints, worked
        #: out on a path's first request (the tree is complete by then).
        self._routes: Dict[bytes, Optional[Route]] = {}

    def getResourceFor(self, request):
        if self.rate_limiter is not None:
            host = peer_host(request.getClientAddress())
            if host is not None and not self.rate_limiter.allow(host):
                return Refusal(429, "too many requests from this address; slow down")
        # What Site.getResourceFor and twisted.web.resource.getChildForRequest
        # do, in one frame: two calls and a copy.copy fewer per request.
        request.site = self
        prepath, postpath = request.prepath, request.postpath
        request.sitepath = prepath[:]
        path = request.path
        route = self._routes.get(path, _UNKNOWN)
        if route is _UNKNOWN:
            route = self._route(path, postpath)
        if route is not None and postpath == route.segments:
            # The walk's outcome without the walk: the same prepath and
            # postpath after it, and the door asked, as its last step does.
            prepath += postpath
            postpath.clear()
            door = route.door
            if door is not None:
                refused = door.refused(request)
                if refused is not None:
                    return refused
            return route.leaf
        resource = self.resource
        while postpath and not resource.isLeaf:
            element = postpath.pop(0)
            prepath.append(element)
            resource = resource.getChildWithDefault(element, request)
        return resource

    def _route(self, path: bytes, postpath: List[bytes]) -> Optional[Route]:
        """The route of an API path (L{None} for any other), remembered."""
        route = static_route(self.resource, postpath) if path.startswith(b"/tapr/") and b"%" not in path else None
        if len(self._routes) < 64:
            self._routes[path] = route
        return route

    def api_channel(self, addr: Any) -> ApiChannel:
        """
        The daemon's listeners' channel for a connection that is not a
        WebSocket upgrade: API calls served without twisted.web's channel,
        everything else by this site's own (L{wsgw.apiserver}).
        """
        return ApiChannel(self, addr)

    def log(self, request):
        pass


#: What a TLS listener agrees to speak when a client offers ALPN (browsers
#: do, for wss:// too): HTTP/1.1, which carries the WebSocket upgrade.
#: A listener's factory must say so: Twisted answers an offer to a factory
#: that names no protocol with a failed handshake.
ALPN_PROTOCOLS = (b"http/1.1",)


@implementer(IProtocolNegotiationFactory)
class ApiListenerFactory(Factory):
    """
    The factory of an API-only listener (C{--admin-listen}): every
    connection starts on the lean API channel of C{site}, as the API calls
    on the main listeners do.
    """

    noisy = False

    def __init__(self, site: GatewaySite):
        self.site = site

    def acceptableProtocols(self) -> List[bytes]:
        return list(ALPN_PROTOCOLS)

    def buildProtocol(self, addr: Any) -> ApiChannel:
        return self.site.api_channel(addr)
