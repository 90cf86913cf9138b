"""
Wiring: a gateway node from a L{Config}, the web resource that serves it,
and the Twisted service that listens, runs the heartbeat and shuts down
cleanly.

These three functions are the embedding API: L{make_node} builds the
node; an application with its own C{Site} mounts L{wsgw.web.make_resource}
of it; one with its own C{MultiService} adds L{make_service}.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .config import Config
from .connect import ConnectHook
from .eventpost import EventPoster, build_http_client
from .forwarder import AppForwarder, AppHealth
from .gateway import Gateway, NoMembership
from .interfaces import IConnections, IOnlineUsers
from .online import OnlineUsers, PresenceEvents
from .registry import LiveConnections, Registry
from .router import RouterFactory
from .tls import ServerTLS, TLSListenerFactory
from .web import ApiListenerFactory, GatewaySite, make_resource, websocket_factory
from .websocket import prepare_frame

if TYPE_CHECKING:
    from .cluster import Cluster, ClusterOnline, Presence

log = Logger()


@attr.s(frozen=True, eq=False, auto_attribs=True)
class Node:
    """
    One gateway process, built by L{make_node}: the connections it holds
    (C{gateway}), the surface the API acts on (C{connections}: the gateway
    itself, or with the Redis engine the C{cluster}, which reaches every
    node), and the settings it was made from.
    """

    config: Config
    reactor: Any
    gateway: Gateway
    connections: IConnections
    #: The node's part in a cluster (a service to run), with the Redis engine.
    cluster: Optional[Cluster] = None
    #: Asks the app before each handshake is answered (--connect-url).
    connect_hook: Optional[ConnectHook] = None
    #: The certificate the listeners serve (--tls-cert), reloadable.
    tls: Optional[ServerTLS] = None


def make_node(config: Config, reactor: Any = None, http_client: Any = None) -> Node:
    """
    A L{Node} that forwards to C{config.app_url} through C{http_client} (a
    treq C{HTTPClient}; by default one with a persistent pool).
    """
    if reactor is None:
        from twisted.internet import reactor
    sink = None
    if config.app_url:
        if http_client is None:
            http_client = build_http_client(reactor, config.max_in_flight, config.max_message_size)
        sink = EventPoster(http_client, config.app_url, reactor, config.app_timeout)
    live = LiveConnections(reactor, prepare_frame, max_reply=config.max_message_size)
    forwarder = AppForwarder(
        clock=reactor,
        sink=sink,
        throttle=live,
        replies=live,
        batch=config.app_batch,
        max_in_flight=config.max_in_flight,
        max_backlog=config.max_backlog,
        max_backlog_bytes=config.max_backlog_bytes,
        retry_window=config.retry_window,
        health=AppHealth(down_after=config.app_down_after),
    )
    registry = Registry()
    presence: Optional[Presence] = None
    cluster_online: Optional[ClusterOnline] = None
    online: Optional[IOnlineUsers] = None
    if config.engine == "redis":
        from .cluster import make_online, make_presence  # needs the optional txredisapi

        presence = make_presence(config, registry)
        if config.presence_events:
            online = cluster_online = make_online(config, presence, forwarder, reactor)
    elif config.presence_events:
        online = OnlineUsers(reactor, PresenceEvents(forwarder).in_stream, config.presence_grace)
    gateway = Gateway(
        clock=reactor,
        forwarder=forwarder,
        live=live,
        registry=registry,
        ping_timeout=config.ping_timeout,
        log_connections=config.log_connections,
        online=online,
        membership=presence or NoMembership(),
        prepare=prepare_frame,
    )
    hook = None
    if config.connect_url:
        # A pool of its own: a backlog of events must not delay handshakes.
        hook = ConnectHook(
            build_http_client(reactor, config.max_in_flight), config.connect_url, reactor, config.connect_timeout
        )
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = ServerTLS(config.tls_cert, config.tls_key)
    if presence is None:
        return Node(config, reactor, gateway, gateway, connect_hook=hook, tls=tls)
    from .cluster import make_cluster

    cluster = make_cluster(config, gateway, presence, reactor, online=cluster_online)
    return Node(config, reactor, gateway, cluster, cluster, connect_hook=hook, tls=tls)


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> Tuple[int, int]:
    """Linux's ephemeral port range, or its default when it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            low, high = (int(n) for n in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def cannot_listen_advice(error: BaseException) -> str:
    """
    Why a listener cannot listen and what to do, for the port asked for:
    who holds it and, only for a port in the ephemeral range, how to keep
    the system's own outgoing connections off it.
    """
    port = getattr(error, "port", None)
    cause = getattr(error, "socketError", None)
    if not isinstance(error, CannotListenError) or not isinstance(port, int) or not isinstance(cause, OSError):
        return str(error).rstrip(".") + "."
    if cause.errno == errno.EADDRINUSE:
        text = (
            f"port {port} is in use ({cause.strerror}): another process holds it;"
            f" find it with: ss -ltnp 'sport = :{port}'."
        )
        low, high = ephemeral_ports()
        if low <= port <= high:
            text += (
                f" Port {port} is in Linux's ephemeral range ({low}-{high}), where the system's own outgoing"
                f" connections can take it first: reserve it (sysctl -w net.ipv4.ip_local_reserved_ports={port})"
                " or use socket activation (systemd/wsgw.socket)."
            )
        return text
    if cause.errno == errno.EACCES and 0 < port < 1024:
        return (
            f"port {port} needs privileges ({cause.strerror}): use a port from 1024 up,"
            " or socket activation (systemd/wsgw.socket)."
        )
    return f"port {port}: {cause.strerror}."


#: Connections the kernel may queue for a TCP listener before accept().
#: Twisted's default of 50 drops the SYNs of a reconnect storm (every client
#: of a restarted gateway at once), and each dropped one waits out TCP's
#: 1, 3, 7 s retransmissions: 5,000 clients took 28 s to be back, not 3.
#: Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096


def with_backlog(description: str) -> str:
    """
    A C{tcp:}/C{tcp6:} endpoint string with L{LISTEN_BACKLOG} unless it
    names a backlog itself; any other endpoint as it is.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


@attr.s(eq=False)
class ListenerService(Service):
    """
    Listens on one endpoint while running.  C{ready} fires with the
    listening port, so callers (tests, readiness notification) can learn
    the address of a C{tcp:0} listener.  Failing to listen fails the start,
    so `twist wsgw` exits instead of running deaf.
    """

    description: str = attr.ib()
    factory = attr.ib()
    reactor = attr.ib()
    ready: Deferred = attr.ib(factory=Deferred, init=False)
    port = attr.ib(default=None, init=False)
    _failure = attr.ib(default=None, init=False)

    def startService(self):
        super().startService()
        endpoint = serverFromString(self.reactor, with_backlog(self.description))
        endpoint.listen(self.factory).addCallbacks(self._listening, self._failed)
        if self._failure is not None:
            self._failure.raiseException()

    def _listening(self, port):
        self.port = port
        self.ready.callback(port)

    def _failed(self, failure):
        self._failure = failure
        log.critical(
            "cannot listen on {endpoint}: {error}",
            endpoint=self.description,
            error=cannot_listen_advice(failure.value),
        )
        self.ready.errback(failure)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


@attr.s(eq=False)
class GatewayService(Service):
    """
    Runs the heartbeat sweep (and, with C{ping_interval}, the gateway's own
    WebSocket pings) and, on stop, closes every client with 1001 and waits
    (bounded) for their C{close} events to reach the app.
    """

    gateway: Gateway = attr.ib()
    check_interval: float = attr.ib()
    drain_timeout: float = attr.ib()
    clock: Any = attr.ib()
    #: Seconds between pings to every client; 0 sends none.
    ping_interval: float = attr.ib(default=0.0)
    _loops: List[LoopingCall] = attr.ib(factory=list, init=False)

    def startService(self) -> None:
        super().startService()
        self._loops = [self._every(self.check_interval, self.gateway.expire_silent)]
        if self.ping_interval > 0:
            self._loops.append(self._every(self.ping_interval, self.gateway.ping_all))

    def _every(self, interval: float, work: Any) -> LoopingCall:
        loop = LoopingCall(work)
        loop.clock = self.clock
        loop.start(interval, now=False)
        return loop

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        return self.gateway.shut_down(self.drain_timeout)


@attr.s(eq=False)
class TLSWatchService(Service):
    """
    Looks at the TLS certificate and key files every C{interval} seconds
    and reads them again when either changed, so that a renewal (certbot
    replacing them, Kubernetes updating a mounted secret) is served without
    a SIGHUP or a restart.  Two C{stat} calls a look.
    """

    tls: ServerTLS = attr.ib()
    interval: float = attr.ib()
    clock: Any = attr.ib()
    _loop: Optional[LoopingCall] = attr.ib(default=None, init=False)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._look)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def _look(self) -> None:
        # A surprise from the files must not end the looks for good.
        try:
            self.tls.reload_if_changed()
        except Exception:
            log.failure("cannot reload the TLS certificate; looking again in {interval} s", interval=self.interval)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class NodeService(MultiService):
    """
    Everything one node runs: its cluster link (with the Redis engine), the
    heartbeat and drain, and its listeners.  C{listening} fires with the
    listening ports once all are up.
    """

    def __init__(self, node: Node, listeners: List[ListenerService]):
        super().__init__()
        self.node = node
        if node.cluster is not None:
            # First in, last out: the node leaves the cluster after the
            # gateway has begun closing its clients.
            node.cluster.setServiceParent(self)
        config = node.config
        GatewayService(
            node.gateway,
            config.ping_check_interval,
            config.drain_timeout,
            node.reactor,
            ping_interval=config.ws_ping_interval,
        ).setServiceParent(self)
        if node.tls is not None and config.tls_watch_interval > 0:
            TLSWatchService(node.tls, config.tls_watch_interval, node.reactor).setServiceParent(self)
        # Listeners come after the gateway: MultiService stops children in
        # reverse order, so they stop accepting before clients are closed.
        for listener in listeners:
            listener.setServiceParent(self)
        self.listening: Deferred[List[IListeningPort]] = DeferredList(
            [listener.ready for listener in listeners], fireOnOneErrback=True, consumeErrors=True
        ).addCallback(self._all_listening)

    @property
    def gateway(self) -> Gateway:
        return self.node.gateway

    def _all_listening(self, results: List[Any]) -> List[IListeningPort]:
        self.node.gateway.accepting = True
        return [port for _ok, port in results]


def make_service(config: Config, reactor: Any = None, node: Optional[Node] = None) -> NodeService:
    """
    A service that listens on every C{config.listen} (and
    C{config.admin_listen}) endpoint and runs the node (by default a new
    one); stopping it stops accepting, then drains.
    """
    if reactor is None:
        from twisted.internet import reactor
    if node is None:
        node = make_node(config, reactor)
    # With --admin-listen the API is served there alone and /ws elsewhere.
    separate_api = bool(config.admin_listen)
    websocket = websocket_factory(node)
    site = GatewaySite(make_resource(node, api=not separate_api, factory=websocket), config, reactor=reactor)
    # Upgrades of /ws go straight to Autobahn; everything else to the site.
    front: IProtocolFactory = RouterFactory(site, websocket, reactor, config.handshake_timeout, site.rate_limiter)
    if node.tls is not None:
        # Around the listener's factory, so any endpoint serves TLS.
        front = TLSListenerFactory(node.tls, False, front)
    listeners = [ListenerService(description, front, reactor) for description in config.listen]
    if separate_api:
        admin_site = GatewaySite(make_resource(node, websocket=False), config, reactor=reactor)
        admin = ApiListenerFactory(admin_site)
        listeners += [ListenerService(description, admin, reactor) for description in config.admin_listen]
    return NodeService(node, listeners)
