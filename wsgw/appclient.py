"""
One attempt at POSTing an event to the app, over treq and a persistent
connection pool.
"""

from __future__ import annotations

from typing import Dict

import attr
import treq
from hyperlink import EncodedURL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from treq.client import HTTPClient
from zope.interface import implementer


class AppRejected(Exception):
    """
    The app answered in a way that retrying will not change (a 4xx other
    than 408 and 429).
    """


class AppUnavailable(Exception):
    """
    The app answered with a status worth retrying (5xx, 408, 429).
    """


_RETRY_STATUSES = frozenset({408, 429})


@attr.s(frozen=True)
class _NoDelayEndpoint:
    """
    Connects like C{inner} and turns Nagle's algorithm off: a request's
    headers and body go out in separate writes, and with Nagle on, the body
    waits for the app's delayed ACK (40 ms on Linux) on every event.
    """

    inner = attr.ib()

    def connect(self, factory):
        def no_delay(protocol):
            if ITCPTransport.providedBy(protocol.transport):
                protocol.transport.setTcpNoDelay(True)
            return protocol

        return self.inner.connect(factory).addCallback(no_delay)


@implementer(IAgentEndpointFactory)
@attr.s(frozen=True)
class _AppEndpoints:
    reactor = attr.ib()

    def endpointForURI(self, uri):
        endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(uri.host.decode("idna")), endpoint)
        return _NoDelayEndpoint(endpoint)


def build_http_client(reactor, max_connections: int) -> HTTPClient:
    """
    A treq client whose pool keeps up to C{max_connections} connections to
    the app open between events, with Nagle's algorithm off.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False  # the forwarder decides about retries
    return HTTPClient(Agent.usingEndpointFactory(reactor, _AppEndpoints(reactor), pool=pool))


@attr.s(eq=False)
class AppClient:
    """
    Posts event bodies to C{url} with C{client}; see L{AppForwarder.post}.

    C{timeout} bounds the whole attempt, the response body included: an
    app that sends headers and then stalls must not hold the event forever.
    Redirects are not followed: any 2xx or 3xx answer means delivered.
    """

    client: HTTPClient = attr.ib()
    url: str = attr.ib()
    clock = attr.ib()
    timeout: float = attr.ib(default=10.0)
    # Parsed once: treq would otherwise parse the URL text on every event.
    _parsed_url: EncodedURL = attr.ib(init=False)

    def __attrs_post_init__(self):
        self._parsed_url = EncodedURL.from_text(self.url)

    def __call__(self, body: bytes, headers: Dict[bytes, bytes]) -> Deferred:
        d = self.client.post(self._parsed_url, data=body, headers=headers, allow_redirects=False)
        d.addCallback(self._check)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _check(self, response):
        status = response.code
        # Read (and discard) the body so the connection returns to the pool.
        d = treq.content(response)
        if 200 <= status < 400:
            return d.addCallback(lambda _: status)
        if status >= 500 or status in _RETRY_STATUSES:
            error: Exception = AppUnavailable(f"app answered HTTP {status}")
        else:
            error = AppRejected(f"app answered HTTP {status}")

        def fail(_):
            raise error

        return d.addBoth(fail)
