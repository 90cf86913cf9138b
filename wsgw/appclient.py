"""
One attempt at POSTing an event to the app, over treq and a persistent
connection pool.

Every event costs a request, so the per-request work is cut to what treq
itself does: the body goes in as a producer that writes it at once, the
headers arrive as a ready C{Headers} with C{Host}, the URL is parsed once,
and endpoints are built once per app address.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Dict, List, Optional

import attr
import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from .apphttp import AppAgent, AppPool
from .events import Event
from .forwarder import AppRejected, AppUnavailable

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
    """
    One endpoint per app address, built on first use: the agent asks for
    one on every request, and building it (IDNA-encoding the host, TLS
    options) cost more than the rest of the request's setup.
    """

    reactor = attr.ib()
    _built: Dict[tuple, _NoDelayEndpoint] = attr.ib(factory=dict, init=False)

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._built.get(key)
        if endpoint is None:
            inner = HostnameEndpoint(self.reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                inner = wrapClientTLS(optionsForClientTLS(uri.host.decode("idna")), inner)
            endpoint = self._built[key] = _NoDelayEndpoint(inner)
        return endpoint


class _NoCookies(DefaultCookiePolicy):
    """
    The app's C{Set-Cookie} answers are not kept: treq's cookie jar would
    otherwise add them to later events of connections that sent no cookie
    of their own, i.e. to other users' events.
    """

    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


def _body_producer(data) -> IBodyProducer:
    return BytesBody(data) if isinstance(data, bytes) else IBodyProducer(data)


def http_client_for(agent) -> HTTPClient:
    """
    A treq client over C{agent} that never stores cookies and sends bytes
    bodies in one write.
    """
    return HTTPClient(agent, cookiejar=IndexableCookieJar(policy=_NoCookies()), data_to_body_producer=_body_producer)


def build_http_client(reactor, max_connections: int) -> HTTPClient:
    """
    A treq client whose pool keeps up to C{max_connections} connections to
    the app open between events, with Nagle's algorithm off, over the lean
    L{AppAgent} (Twisted's C{Agent} cost more CPU per event than the rest of
    the gateway's work for it).
    """
    pool = AppPool(reactor, max_idle=max_connections, idle_timeout=120.0)
    return http_client_for(AppAgent(reactor, _AppEndpoints(reactor), pool))


@implementer(IBodyProducer)
@attr.s(slots=True)
class BytesBody:
    """
    A request body already in memory, written in one call.  Given plain
    bytes, treq wraps them in a C{FileBodyProducer}, which feeds them
    through a cooperator task (a C{LoopingCall}) on every request.
    """

    body: bytes = attr.ib()
    length: int = attr.ib(init=False)

    def __attrs_post_init__(self):
        self.length = len(self.body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


_DEFAULT_PORTS = {"http": 80, "https": 443}


class _URI(EncodedURL):
    """
    A URL already in URI form that says so at once: treq converts the URL
    it is given to a URI and then to text on every request, and for the
    app's one URL that (IDNA-encoding the host each time) was a fifth of
    treq's work per event.
    """

    _text: Optional[str] = None

    def to_uri(self) -> _URI:
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(with_password)
        if self._text is None:
            self._text = super().to_text()
        return self._text

    def replace(self, **changes) -> EncodedURL:
        # A changed URL may hold text that is not URI-safe: a plain URL.
        return _plain(self).replace(**changes)


def _fields(url: EncodedURL) -> dict:
    return dict(
        scheme=url.scheme,
        host=url.host,
        path=url.path,
        query=url.query,
        fragment=url.fragment,
        port=url.port,
        rooted=url.rooted,
        userinfo=url.userinfo,
        uses_netloc=url.uses_netloc,
    )


def _plain(url: EncodedURL) -> EncodedURL:
    return EncodedURL(**_fields(url))


def _as_uri(url: EncodedURL) -> EncodedURL:
    """
    C{url} as a L{_URI}; as it is when it cannot be a URI (treq will then
    fail each request as it did).
    """
    try:
        uri = url.to_uri()
    except (ValueError, UnicodeError):
        return url
    return _URI(**_fields(uri))


def _host_header(url: EncodedURL) -> Optional[bytes]:
    """
    C{Host} for requests to C{url}: the host, and the port unless it is the
    scheme's default.  L{None} when treq could not send to C{url} anyway
    (it cannot IDNA-encode an IPv6 literal); the request then fails as
    before, per event, not at start-up.
    """
    try:
        uri = url.to_uri()
    except (ValueError, UnicodeError):
        return None
    host = uri.host
    if uri.port is None or uri.port == _DEFAULT_PORTS.get(uri.scheme):
        return host.encode("ascii")
    return f"{host}:{uri.port}".encode("ascii")


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
    #: The Host header as the agent would compute it; given, it spares the
    #: agent a copy of the headers on every request.
    _host: Optional[bytes] = attr.ib(init=False)

    def __attrs_post_init__(self):
        self._parsed_url = _as_uri(EncodedURL.from_text(self.url))
        self._host = _host_header(self._parsed_url)

    def post(self, event: Event) -> Deferred:
        headers = {
            b"Content-Type": [b"application/json"],
            b"X-Wsgw-Event-Id": [event.event_id.encode()],
            b"X-Forwarded-For": [event.remote_addr.encode("utf-8", "replace")],
        }
        if event.cookie:
            headers[b"Cookie"] = [event.cookie.encode("utf-8", "replace")]
        return self(event.body, headers)

    def __call__(self, body: bytes, headers: Dict[bytes, List[bytes]]) -> Deferred:
        request_headers = Headers(headers)
        if self._host is not None and not request_headers.hasHeader(b"Host"):
            request_headers.setRawHeaders(b"Host", [self._host])
        d = self.client.post(
            self._parsed_url, data=body, headers=request_headers, allow_redirects=False, unbuffered=True
        )
        d.addCallback(self._check)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _check(self, response):
        status = response.code
        # Read (and discard) the body so the connection returns to the pool.
        d = treq.content(response)
        if 200 <= status < 400:
            return d.addCallback(lambda _: None)
        if status >= 500 or status in _RETRY_STATUSES:
            error: Exception = AppUnavailable(f"app answered HTTP {status}")
        else:
            error = AppRejected(f"app answered HTTP {status}")

        def fail(_):
            raise error

        return d.addBoth(fail)
