"""
The connection to Redis for the cluster engine: one connection for commands
(presence writes, publishes, the cluster-wide list) and one subscribed to the
cluster's channels, both kept up by Twisted's C{ClientService}.

The wire protocol is txredisapi's; connecting, reconnecting and knowing
whether Redis is reachable is done here, so that nothing ever waits on a
connection that is down: while it is down, callers are told so at once.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import attr
import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from ..config import RedisAddress
from ..internals import quiet_client_service

log = Logger()


class RedisDown(Exception):
    """Redis is not reachable right now."""


#: What a command fails with when Redis is, or just went, out of reach.
LINK_ERRORS = (RedisDown, txredisapi.ConnectionError)


def redis_endpoint(address: RedisAddress, reactor, timeout: float):
    if address.path:
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.tls:
        endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    return endpoint


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionLost(self, why):
        try:
            super().connectionLost(why)
        finally:
            self.factory.lost(self)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.on_message(channel, message)

    def connectionLost(self, why):
        try:
            super().connectionLost(why)
        finally:
            self.factory.lost(self)


#: Twisted's ClientService logs every reconnection attempt; while Redis is
#: down that is a line every few seconds.  The link says once that Redis is
#: gone and once that it is back; only warnings pass from ClientService.
_QuietClientService = quiet_client_service()


class _LinkFactory(Factory):
    """
    Builds txredisapi protocols for one of the link's connections.  The
    protocol calls C{stopTrying}/C{connectionError} when Redis refuses the
    password or the database; the link logs that and keeps retrying, since
    an operator can fix Redis without restarting every node.
    """

    isLazy = True
    noisy = False
    #: A txredisapi protocol class, called with its settings.
    protocol: Any

    def __init__(self, protocol, address: RedisAddress, reply_timeout: float, lost, on_message=None):
        self.protocol = protocol
        self.address = address
        self.reply_timeout = reply_timeout
        self.lost = lost
        self.on_message = on_message

    def buildProtocol(self, addr):
        protocol = self.protocol(
            charset="utf-8",
            errors="strict",
            replyTimeout=self.reply_timeout,
            password=self.address.password,
            dbid=self.address.db or None,
            convertNumbers=False,
            username=self.address.username,
        )
        protocol.factory = self
        return protocol

    def stopTrying(self):
        pass

    def connectionError(self, why):
        log.error("redis refused this node: {why}", why=why)


@attr.s(eq=False)
class RedisLink(Service):
    """
    Two connections to Redis: C{commands} for everything but subscribing,
    and a subscriber to C{channels} whose messages go to C{on_message}.

    C{up} is true while both are usable.  Going down and coming back are
    each logged once and reported to C{on_state}, never per command.
    """

    address: RedisAddress = attr.ib()
    channels: List[str] = attr.ib()
    on_message: Callable[[str, object], None] = attr.ib()
    on_state: Callable[[bool], None] = attr.ib()
    reactor = attr.ib()
    #: A command without an answer for this long drops the connection
    #: (Redis hung, or the network went away silently).
    reply_timeout: float = attr.ib(default=5.0)
    connect_timeout: float = attr.ib(default=5.0)

    up: bool = attr.ib(default=False, init=False)
    #: The connected command protocol, or L{None}.
    _commands: Optional[_CommandProtocol] = attr.ib(default=None, init=False)
    _subscriber: Optional[_SubscriberProtocol] = attr.ib(default=None, init=False)
    _services: List[ClientService] = attr.ib(factory=list, init=False)
    #: Whether the link was ever up (the first connection is not "back").
    _was_up: bool = attr.ib(default=False, init=False)
    _said_down: bool = attr.ib(default=False, init=False)
    _first_check = attr.ib(default=None, init=False)

    def startService(self):
        super().startService()
        retry = backoffPolicy(initialDelay=0.2, factor=2.0, maxDelay=3.0)
        endpoint = redis_endpoint(self.address, self.reactor, self.connect_timeout)
        commands = _LinkFactory(_CommandProtocol, self.address, self.reply_timeout, self._lost)
        subscriber = _LinkFactory(_SubscriberProtocol, self.address, self.reply_timeout, self._lost, self.on_message)
        self._services = [
            _QuietClientService(
                endpoint, commands, retryPolicy=retry, clock=self.reactor, prepareConnection=self._commands_ready
            ),
            _QuietClientService(
                endpoint, subscriber, retryPolicy=retry, clock=self.reactor, prepareConnection=self._subscriber_ready
            ),
        ]
        for service in self._services:
            service.startService()
        # Say so if Redis is not there at start, rather than stay silent.
        self._first_check = self.reactor.callLater(self.connect_timeout, self._check_started)

    def stopService(self):
        super().stopService()
        if self._first_check.active():
            self._first_check.cancel()
        return gatherResults([service.stopService() for service in self._services], consumeErrors=True)

    def command(self, *args) -> Deferred:
        """
        Run one Redis command; fails with L{RedisDown} at once when Redis is
        not reachable.
        """
        if self._commands is None:
            return fail(RedisDown("redis is not reachable"))
        try:
            return self._commands.execute_command(*args)
        except txredisapi.ConnectionError:
            return fail(RedisDown("redis is not reachable"))

    def eval(self, script: str, keys: List[str], args: List[object]) -> Deferred:
        if self._commands is None:
            return fail(RedisDown("redis is not reachable"))
        try:
            return self._commands.eval(script, keys, args)
        except txredisapi.ConnectionError:
            return fail(RedisDown("redis is not reachable"))

    # -- connection state -------------------------------------------------

    # ClientService hands these a proxy of the protocol; whenConnected
    # fires with the protocol itself, the one whose connectionLost reports.

    def _commands_ready(self, proxy):
        # A PING first: a Redis that is stopped (not gone) still completes
        # TCP handshakes, and must not count as back until it answers.
        def ping(protocol):
            return protocol.ping().addCallback(lambda _: protocol)

        def ready(protocol):
            self._commands = protocol
            self._update()

        return proxy.whenConnected().addCallback(ping).addCallback(ready)

    def _subscriber_ready(self, proxy):
        def subscribe(protocol):
            return protocol.subscribe(self.channels).addCallback(lambda _: protocol)

        def subscribed(protocol):
            self._subscriber = protocol
            self._update()

        return proxy.whenConnected().addCallback(subscribe).addCallback(subscribed)

    def _lost(self, protocol):
        if protocol is self._commands:
            self._commands = None
        elif protocol is self._subscriber:
            self._subscriber = None
        else:
            return
        self._update()

    def _update(self):
        up = self._commands is not None and self._subscriber is not None
        if up == self.up:
            return
        self.up = up
        if up:
            if self._was_up or self._said_down:
                log.info("redis at {redis} is reachable again", redis=self.address.shown())
            else:
                log.info("connected to redis at {redis}", redis=self.address.shown())
            self._was_up = True
            self._said_down = False
        elif self.running:
            self._say_down()
        self.on_state(up)

    def _check_started(self):
        if not self.up and not self._said_down:
            self._say_down()

    def _say_down(self):
        self._said_down = True
        log.warn(
            "redis at {redis} is unreachable; this node serves its own connections only "
            "(send, close and list do not reach other nodes) until it is back",
            redis=self.address.shown(),
        )
