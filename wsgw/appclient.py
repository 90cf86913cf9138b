"""
One attempt at POSTing an event to the app, over treq and a persistent
connection pool.
"""

from __future__ import annotations

from typing import Dict

import attr
import treq
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient


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


def build_http_client(reactor, max_connections: int) -> HTTPClient:
    """
    A treq client whose pool keeps up to C{max_connections} connections to
    the app open between events.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False  # the forwarder decides about retries
    return HTTPClient(Agent(reactor, pool=pool))


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

    def __call__(self, body: bytes, headers: Dict[bytes, bytes]) -> Deferred:
        d = self.client.post(self.url, data=body, headers=headers, allow_redirects=False)
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
