"""
The gateway's settings, gathered in one immutable record.

Everything that builds a gateway (the ``twist`` plugin, an embedding
application, the tests) passes a L{Config}; nothing reads the environment
or the command line below this module.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

import attr

DEFAULT_LISTEN = "tcp:40010"


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
    #: A connection that sends nothing for this long is closed.
    ping_timeout: float = attr.ib(default=45.0)
    #: How often the heartbeat sweep looks for silent connections.
    ping_check_interval: float = attr.ib(default=5.0)
    #: Give up one attempt at POSTing an event after this long.
    app_timeout: float = attr.ib(default=10.0)
    #: Keep retrying a failed event (5xx, 429, connection errors) this long.
    retry_window: float = attr.ib(default=60.0)
    #: At most this many event POSTs are in flight at once (all connections).
    max_in_flight: int = attr.ib(default=64)
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

    def __attrs_post_init__(self):
        if self.admin_allow_remote and not self.admin_token:
            raise ValueError("admin_allow_remote needs an admin_token: the API would be open to anyone")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ, **overrides) -> "Config":
        """
        A config whose app URL falls back to the Olares C{WS_PORT}/C{WS_URL}
        variables when no explicit one is given.
        """
        if overrides.get("app_url") is None:
            overrides["app_url"] = app_url_from_olares_env(environ)
        return cls(**overrides)
