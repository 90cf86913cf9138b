"""
Wiring: a gateway from a L{Config}, the web resource that serves it, and
the Twisted service that listens, runs the heartbeat and shuts down cleanly.

These three functions are the embedding API: an application with its own
C{Site} mounts L{make_resource}; one with its own C{MultiService} adds
L{make_service}.
"""

from __future__ import annotations

from typing import Optional

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .appclient import AppClient, build_http_client
from .config import Config
from .forwarder import AppForwarder
from .gateway import Gateway
from .web import GatewaySite, make_resource
from .websocket import GatewayFactory

log = Logger()


def make_gateway(config: Config, reactor=None, http_client=None) -> Gateway:
    """
    A L{Gateway} (with its WebSocket factory as C{gateway.factory}) that
    forwards to C{config.app_url} through C{http_client} (a treq
    C{HTTPClient}; by default one with a persistent pool).

    With C{config.engine} C{"redis"}, C{gateway.cluster} is its
    L{wsgw.cluster.Cluster}, a service that L{make_service} runs.
    """
    if reactor is None:
        from twisted.internet import reactor
    factory = GatewayFactory(
        reactor=reactor,
        user_header=config.user_header,
        max_message_size=config.max_message_size,
        max_outgoing=config.max_outgoing,
        handshake_timeout=config.handshake_timeout,
    )
    post = None
    if config.app_url:
        if http_client is None:
            http_client = build_http_client(reactor, config.max_in_flight)
        post = AppClient(http_client, config.app_url, reactor, config.app_timeout)
    forwarder = AppForwarder(
        clock=reactor,
        post=post,
        max_in_flight=config.max_in_flight,
        max_backlog=config.max_backlog,
        max_backlog_bytes=config.max_backlog_bytes,
        retry_window=config.retry_window,
    )
    gateway = Gateway(
        clock=reactor,
        forwarder=forwarder,
        ping_timeout=config.ping_timeout,
        prepare=factory.prepare_text,
    )
    factory.gateway = gateway
    gateway.factory = factory
    if config.engine == "redis":
        from .cluster import make_cluster  # needs the optional txredisapi

        make_cluster(gateway, config, reactor)
    return gateway


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
        endpoint = serverFromString(self.reactor, self.description)
        endpoint.listen(self.factory).addCallbacks(self._listening, self._failed)
        if self._failure is not None:
            self._failure.raiseException()

    def _listening(self, port):
        self.port = port
        self.ready.callback(port)

    def _failed(self, failure):
        self._failure = failure
        hint = ""
        if "in use" in failure.getErrorMessage():
            hint = (
                " Another process holds the port. Ports from 32768 to 60999 (40010 among them) are"
                " Linux's ephemeral range, where the system's own outgoing connections can take a"
                " port first: reserve it (sysctl -w net.ipv4.ip_local_reserved_ports=40010) or use"
                " socket activation (systemd/wsgw.socket)."
            )
        log.critical(
            "cannot listen on {endpoint}: {error}.{hint}",
            endpoint=self.description,
            error=failure.getErrorMessage(),
            hint=hint,
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
    Runs the heartbeat sweep and, on stop, closes every client with 1001
    and waits (bounded) for their C{close} events to reach the app.
    """

    gateway: Gateway = attr.ib()
    check_interval: float = attr.ib()
    drain_timeout: float = attr.ib()
    clock = attr.ib()
    _sweep: Optional[LoopingCall] = attr.ib(default=None, init=False)

    def startService(self):
        super().startService()
        self._sweep = LoopingCall(self.gateway.expire_silent)
        self._sweep.clock = self.clock
        self._sweep.start(self.check_interval, now=False)

    def stopService(self):
        super().stopService()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        return self.gateway.shut_down(self.drain_timeout)


def make_service(config: Config, reactor=None, gateway: Optional[Gateway] = None) -> MultiService:
    """
    A service that listens on every C{config.listen} (and
    C{config.admin_listen}) endpoint and runs the gateway; stopping it stops
    accepting, then drains.

    Its C{gateway} attribute is the L{Gateway}; its C{listening} attribute
    a L{Deferred} that fires with the listening ports once all are up.
    """
    if reactor is None:
        from twisted.internet import reactor
    if gateway is None:
        gateway = make_gateway(config, reactor)
    top = MultiService()
    top.gateway = gateway
    if gateway.cluster is not None:
        # First in, last out: the node leaves the cluster after the gateway
        # has begun closing its clients.
        gateway.cluster.setServiceParent(top)
    GatewayService(gateway, config.ping_check_interval, config.drain_timeout, reactor).setServiceParent(top)
    # With --admin-listen the API is served there alone and /ws elsewhere.
    separate_api = bool(config.admin_listen)
    site = GatewaySite(make_resource(gateway, config, api=not separate_api), config, reactor=reactor)
    listeners = [ListenerService(description, site, reactor) for description in config.listen]
    if separate_api:
        admin_site = GatewaySite(make_resource(gateway, config, websocket=False), config, reactor=reactor)
        listeners += [ListenerService(description, admin_site, reactor) for description in config.admin_listen]
    # Listeners come after the gateway: MultiService stops children in
    # reverse order, so they stop accepting before clients are closed.
    for listener in listeners:
        listener.setServiceParent(top)
    top.listening = DeferredList([listener.ready for listener in listeners], fireOnOneErrback=True, consumeErrors=True)
    top.listening.addCallback(lambda results: [port for _ok, port in results])

    def accepting(ports):
        gateway.accepting = True
        return ports

    top.listening.addCallback(accepting)
    return top
