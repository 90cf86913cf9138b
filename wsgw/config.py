"""
The gateway's settings, gathered in one immutable record.

Everything that builds a gateway (the ``twist`` plugin, an embedding
application, the tests) passes a L{Config}; nothing reads the environment
or the command line below this module.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

import attr

DEFAULT_LISTEN = "tcp:40010"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENGINES = ("memory", "redis")
_NODE_ID = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces


Networks = Sequence[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]


def trusted_networks(cidrs: Sequence[str]) -> Networks:
    """C{--trusted-proxy} values as networks; raises L{ValueError} naming a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted proxy {cidr!r} is not an IP address or CIDR block (e.g. 10.0.0.0/8, ::1)"
            ) from None
    return networks


@attr.s(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is and how to sign in, from a C{redis://} URL."""

    host: str = attr.ib(default="127.0.0.1")
    port: int = attr.ib(default=6379)
    path: Optional[str] = attr.ib(default=None)
    tls: bool = attr.ib(default=False)
    db: int = attr.ib(default=0)
    username: Optional[str] = attr.ib(default=None)
    password: Optional[str] = attr.ib(default=None, repr=False)

    def shown(self) -> str:
        """The address for logs, without the password."""
        where = f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"
        return f"{'rediss' if self.tls else 'redis'}://{where}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """
    C{redis://[[user]:password@]host[:port][/db]}, C{rediss://} for TLS, or
    C{unix:///path/to/redis.sock[?db=N]}; raises L{ValueError} saying what
    is wrong.
    """
    parts = urlsplit(url)
    try:
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs a socket path")
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return RedisAddress(path=parts.path, db=db, username=username, password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("the scheme must be redis://, rediss:// or unix://")
        if not parts.hostname:
            raise ValueError("it names no host")
        db_text = parts.path.strip("/")
        return RedisAddress(
            host=parts.hostname,
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            db=int(db_text) if db_text else 0,
            username=username,
            password=password,
        )
    except ValueError as e:
        # urlsplit's own messages (a bad port) are clear; int()'s are not.
        message = str(e)
        if message.startswith("invalid literal"):
            message = "the database must be a number"
        raise ValueError(message) from None


def app_url_from_olares_env(environ: Mapping[str, str]) -> Optional[str]:
    """
    The app URL the Olares platform describes with C{WS_PORT} and C{WS_URL}
    (the manifest's C{options.websocket.port} and C{.url}), or L{None}.
    """
    port = environ.get("WS_PORT", "").strip()
    if not port:
        return None
    path = environ.get("WS_URL", "").strip() or "/"
    if not path.startswith("/"):
        path = "/" + path
    return f"http://127.0.0.1:{port}{path}"


@attr.s(frozen=True, slots=True, kw_only=True)
class Config:
    """
    How one gateway behaves.  Times are in seconds, sizes in bytes.
    """

    #: Twisted server endpoint strings; each serves C{/ws} and the API.
    listen: Tuple[str, ...] = attr.ib(default=(DEFAULT_LISTEN,), converter=tuple)
    #: Where lifecycle events are POSTed; L{None} forwards nothing.
    app_url: Optional[str] = attr.ib(default=None)
    #: Where the app decides, before each handshake is answered, whether
    #: the connection may open; L{None} admits every one.
    connect_url: Optional[str] = attr.ib(default=None)
    #: How long a handshake waits for that decision before a 503.
    connect_timeout: float = attr.ib(default=2.0)
    #: Handshakes that may wait for the decision at once (more: 503).
    connect_max_waiting: int = attr.ib(default=1000)
    #: A connection that sends nothing for this long is closed.
    ping_timeout: float = attr.ib(default=45.0)
    #: How often the heartbeat sweep looks for silent connections.
    ping_check_interval: float = attr.ib(default=5.0)
    #: Send every client a WebSocket ping this often (0: never), for
    #: clients that send no heartbeat of their own.
    ws_ping_interval: float = attr.ib(default=0.0)
    #: Give up one attempt at POSTing an event after this long.
    app_timeout: float = attr.ib(default=10.0)
    #: Keep retrying a failed event (5xx, 429, connection errors) this long.
    retry_window: float = attr.ib(default=60.0)
    #: C{/readyz} says the app is down (503) once its attempts have failed,
    #: with no success in between, for this long; one failure never does.
    app_down_after: float = attr.ib(default=10.0)
    #: At most this many event POSTs are in flight at once (all connections).
    max_in_flight: int = attr.ib(default=64)
    #: Events one POST may carry (a JSON array of them); 1 posts each alone.
    app_batch: int = attr.ib(default=1)
    #: Events waiting for the app, per connection, before the gateway
    #: stops reading from that client.
    max_backlog: int = attr.ib(default=1000)
    #: The same bound in bytes of event bodies.
    max_backlog_bytes: int = attr.ib(default=4 * 1024 * 1024)
    #: Bytes that may wait for a client that does not read, beyond the
    #: socket's own buffer, before the gateway drops the connection.
    max_outgoing: int = attr.ib(default=1024 * 1024)
    #: Open connections allowed in total and per user name (0: no limit).
    max_connections: int = attr.ib(default=50_000)
    max_connections_per_user: int = attr.ib(default=1_000)
    #: Largest WebSocket message accepted from a client.
    max_message_size: int = attr.ib(default=1024 * 1024)
    #: Largest body accepted by the HTTP API (the original allows 4 MiB).
    max_api_body: int = attr.ib(default=4 * 1024 * 1024)
    #: A client must finish the WebSocket handshake within this time.
    handshake_timeout: float = attr.ib(default=10.0)
    #: On shutdown, wait this long for close events to reach the app.
    drain_timeout: float = attr.ib(default=10.0)
    #: The request header that carries the signed-in user's name.
    user_header: str = attr.ib(default="X-Bfl-User")
    #: Post C{online}/C{offline} events per user to the app...
    presence_events: bool = attr.ib(default=False)
    #: ...once a user has had no connection for this long (offline), so
    #: that a reload or a blip does not flicker.
    presence_grace: float = attr.ib(default=5.0)
    #: Log each connection's open and close at info level.
    log_connections: bool = attr.ib(default=False)
    #: Peers (IP addresses or CIDR blocks) whose X-Original-Forwarded-For
    #: and X-Forwarded-For are believed; empty: any peer's, as the original.
    trusted_proxies: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    #: Refuse handshakes without the user header (401).
    require_user: bool = attr.ib(default=False)
    #: Origins allowed besides same-origin and none (fnmatch patterns such
    #: as C{https://*.example.com}).
    allowed_origins: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    #: Endpoints that serve the API alone; when set, C{listen} serves only C{/ws}.
    admin_listen: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    #: A bearer token the API requires, when set.
    admin_token: Optional[str] = attr.ib(default=None, repr=False)
    #: Let API callers other than loopback in (a token is then required).
    admin_allow_remote: bool = attr.ib(default=False)
    #: Requests (handshakes and API calls) per second allowed from one peer
    #: address, 0 for no limit; bursts up to twice that.
    rate_limit: float = attr.ib(default=0.0)
    #: C{memory}: one process is the whole gateway.  C{redis}: this process
    #: is one node of a gateway that shares its connections through Redis.
    engine: str = attr.ib(default="memory")
    redis_url: str = attr.ib(default=DEFAULT_REDIS_URL, repr=False)
    #: Prefix of every Redis key and channel: nodes with the same prefix
    #: (and Redis) form one gateway.
    redis_prefix: str = attr.ib(default="wsgw")
    #: This node's name in the cluster; by default the host name and the
    #: first listen endpoint.  It must be unique, and stable across restarts.
    node_id: Optional[str] = attr.ib(default=None)
    #: A node that stops refreshing its presence leaves C{/list} after this.
    presence_ttl: float = attr.ib(default=15.0)
    #: How long a cluster-wide send/close/list waits for the other nodes.
    cluster_timeout: float = attr.ib(default=2.0)

    def __attrs_post_init__(self):
        if self.admin_allow_remote and not self.admin_token:
            raise ValueError("admin_allow_remote needs an admin_token: the API would be open to anyone")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "redis":
            try:
                self.redis_address()
            except ValueError as e:
                raise ValueError(f"redis_url is not usable: {e}") from None
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise ValueError("node_id must be 1 to 200 printable ASCII characters without spaces")
        if self.presence_ttl < 1:
            raise ValueError("presence_ttl must be at least 1 second: a node refreshes its presence every third of it")
        trusted_networks(self.trusted_proxies)
        if self.presence_events and self.engine == "redis":
            raise ValueError(
                "presence_events work with the memory engine only so far: across a cluster, exactly one online "
                "and one offline per transition needs a coordination the redis engine does not do yet"
            )
        if not _NODE_ID.fullmatch(self.redis_prefix):
            raise ValueError("redis_prefix must be 1 to 200 printable ASCII characters without spaces")

    def redis_address(self) -> RedisAddress:
        return parse_redis_url(self.redis_url)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> Config:
        """
        A config whose app URL falls back to the Olares C{WS_PORT}/C{WS_URL}
        variables when no explicit one is given.
        """
        if overrides.get("app_url") is None:
            overrides["app_url"] = app_url_from_olares_env(environ)
        return cls(**overrides)
