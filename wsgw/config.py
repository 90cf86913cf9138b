"""
The gateway's settings, gathered in one immutable record.

Everything that builds a gateway (the ``twist`` plugin, an embedding
application, the tests) passes a L{Config}; nothing reads the environment
or the command line below this module.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

import attr

DEFAULT_LISTEN = "tcp:40010"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENGINES = ("memory", "redis")
_NODE_ID = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces


def read_token_file(path: str) -> str:
    """
    The token in C{path} (whitespace around it dropped); raises
    L{ValueError} saying why it cannot be had.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    if not token:
        raise ValueError("the file is empty")
    return token


def is_ssl_endpoint(description: str) -> bool:
    """Whether a Twisted server endpoint string is an C{ssl:} one (TLS already)."""
    return description.split(":", 1)[0].strip().lower() == "ssl"


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


def parse_http_url(url: str, example: str = "http://127.0.0.1:8888/ws/message") -> str:
    """
    C{url} when it is an absolute C{http://} or C{https://} URL with a host
    and a usable port; raises L{ValueError} saying what is wrong, with
    C{example} of a good one.  The gateway would otherwise start and then
    retry every event for the whole retry window, as if the app were down.
    """
    example = f"e.g. {example}"
    if not isinstance(url, str):
        raise ValueError(f"must be a URL string, {example}")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"must not contain spaces or control characters, {example}")
    if "://" not in url:
        guess = (
            f"http://{url.lstrip('/')}"
            if re.match(r"[\w.-]+(:\d+)?(/|$)", url) and ("/" in url or ":" in url)
            else None
        )
        raise ValueError(f"has no scheme: give the whole URL, e.g. {guess or example[5:]}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be http:// or https://, not {parts.scheme}://, {example}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has a port that is not a number from 1 to 65535, {example}") from None
    if port == 0:
        raise ValueError(f"has port 0; give a port from 1 to 65535, {example}")
    if not parts.hostname:
        raise ValueError(f"names no host, {example}")
    return url


class ConfigError(ValueError):
    """
    A L{Config} value that cannot work; C{field} names it, so that the
    command line can report it under the option or variable it came from.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _field_error(attribute: attr.Attribute[Any], message: str) -> ConfigError:
    return ConfigError(attribute.name, f"{attribute.name} {message}")


Validator = Callable[[Any, Any, Any], None]


def _number(*, integer: bool, zero: bool) -> Validator:
    """A finite number (an L{int} when C{integer}), above 0 or, with C{zero}, 0 or more."""
    kind = "an integer" if integer else "a number"
    bound = "0 or more" if zero else "greater than 0"

    def check(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
        types = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, types):
            raise _field_error(attribute, f"must be {kind}, not {value!r}")
        if not math.isfinite(value):
            raise _field_error(attribute, f"must be a finite number, not {value!r}")
        if value < 0 or (value == 0 and not zero):
            raise _field_error(attribute, f"must be {bound}, not {value!r}")

    return check


_positive_int = _number(integer=True, zero=False)
_non_negative_int = _number(integer=True, zero=True)
_positive = _number(integer=False, zero=False)
_non_negative = _number(integer=False, zero=True)


def _text(*, optional: bool = False) -> Validator:
    def check(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            raise _field_error(attribute, f"must be a non-empty string, not {value!r}")

    return check


def _flag(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise _field_error(attribute, f"must be True or False, not {value!r}")


def _as_tuple(value: Any) -> Any:
    # A lone string would otherwise become a tuple of its characters.
    if isinstance(value, (str, bytes)) or value is None:
        return value
    try:
        return tuple(value)
    except TypeError:
        return value


def _strings(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(item, str) and item for item in value):
        raise _field_error(attribute, f"must be a sequence of non-empty strings, not {value!r}")


def _http_url(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    try:
        parse_http_url(value)
    except ValueError as e:
        raise _field_error(attribute, f"{value!r} {e}") from None


@attr.s(frozen=True, slots=True, kw_only=True)
class Config:
    """
    How one gateway behaves.  Times are in seconds, sizes in bytes.
    """

    #: Twisted server endpoint strings; each serves C{/ws} and the API.
    listen: Tuple[str, ...] = attr.ib(default=(DEFAULT_LISTEN,), converter=_as_tuple, validator=_strings)
    #: A PEM certificate chain (the server's own first) and its private
    #: key: every C{listen} endpoint then serves TLS, whatever its kind.
    tls_cert: Optional[str] = attr.ib(default=None, validator=_text(optional=True))
    tls_key: Optional[str] = attr.ib(default=None, validator=_text(optional=True))
    #: Look at those two files this often and read them again when either
    #: changed (0: only on SIGHUP).
    tls_watch_interval: float = attr.ib(default=60.0, validator=_non_negative)
    #: Where lifecycle events are POSTed; L{None} forwards nothing.
    app_url: Optional[str] = attr.ib(default=None, validator=_http_url)
    #: Where the app decides, before each handshake is answered, whether
    #: the connection may open; L{None} admits every one.
    connect_url: Optional[str] = attr.ib(default=None, validator=_http_url)
    #: How long a handshake waits for that decision before a 503.
    connect_timeout: float = attr.ib(default=2.0, validator=_positive)
    #: Handshakes that may wait for the decision at once (more: 503).
    connect_max_waiting: int = attr.ib(default=1000, validator=_positive_int)
    #: A connection that sends nothing for this long is closed.
    ping_timeout: float = attr.ib(default=45.0, validator=_positive)
    #: How often the heartbeat sweep looks for silent connections.
    ping_check_interval: float = attr.ib(default=5.0, validator=_positive)
    #: Send every client a WebSocket ping this often (0: never), for
    #: clients that send no heartbeat of their own.
    ws_ping_interval: float = attr.ib(default=0.0, validator=_non_negative)
    #: Give up one attempt at POSTing an event after this long.
    app_timeout: float = attr.ib(default=10.0, validator=_positive)
    #: Keep retrying a failed event (5xx, 429, connection errors) this long.
    retry_window: float = attr.ib(default=60.0, validator=_positive)
    #: C{/readyz} says the app is down (503) once its attempts have failed,
    #: with no success in between, for this long; one failure never does.
    app_down_after: float = attr.ib(default=10.0, validator=_positive)
    #: At most this many event POSTs are in flight at once (all connections).
    max_in_flight: int = attr.ib(default=64, validator=_positive_int)
    #: Events one POST may carry (a JSON array of them); 1 posts each alone.
    app_batch: int = attr.ib(default=1, validator=_positive_int)
    #: Events waiting for the app, per connection, before the gateway
    #: stops reading from that client.
    max_backlog: int = attr.ib(default=1000, validator=_positive_int)
    #: The same bound in bytes of event bodies.
    max_backlog_bytes: int = attr.ib(default=4 * 1024 * 1024, validator=_positive_int)
    #: Bytes that may wait for a client that does not read, beyond the
    #: socket's own buffer, before the gateway drops the connection.
    max_outgoing: int = attr.ib(default=1024 * 1024, validator=_positive_int)
    #: Open connections allowed in total and per user name (0: no limit).
    max_connections: int = attr.ib(default=50_000, validator=_non_negative_int)
    max_connections_per_user: int = attr.ib(default=1_000, validator=_non_negative_int)
    #: Largest WebSocket message accepted from a client.
    max_message_size: int = attr.ib(default=1024 * 1024, validator=_positive_int)
    #: Largest body accepted by the HTTP API (the original allows 4 MiB).
    max_api_body: int = attr.ib(default=4 * 1024 * 1024, validator=_positive_int)
    #: A client must finish the WebSocket handshake within this time.
    handshake_timeout: float = attr.ib(default=10.0, validator=_positive)
    #: On shutdown, wait this long for close events to reach the app.
    drain_timeout: float = attr.ib(default=10.0, validator=_positive)
    #: The request header that carries the signed-in user's name.
    user_header: str = attr.ib(default="X-Bfl-User", validator=_text())
    #: Post C{online}/C{offline} events per user to the app...
    presence_events: bool = attr.ib(default=False, validator=_flag)
    #: ...once a user has had no connection for this long (offline), so
    #: that a reload or a blip does not flicker.
    presence_grace: float = attr.ib(default=5.0, validator=_non_negative)
    #: Log each connection's open and close at info level.
    log_connections: bool = attr.ib(default=False, validator=_flag)
    #: Peers (IP addresses or CIDR blocks) whose X-Original-Forwarded-For
    #: and X-Forwarded-For are believed; empty: any peer's, as the original.
    trusted_proxies: Tuple[str, ...] = attr.ib(default=(), converter=_as_tuple, validator=_strings)
    #: Refuse handshakes without the user header (401).
    require_user: bool = attr.ib(default=False, validator=_flag)
    #: Origins allowed besides same-origin and none (fnmatch patterns such
    #: as C{https://*.example.com}).
    allowed_origins: Tuple[str, ...] = attr.ib(default=(), converter=_as_tuple, validator=_strings)
    #: Endpoints that serve the API alone; when set, C{listen} serves only C{/ws}.
    admin_listen: Tuple[str, ...] = attr.ib(default=(), converter=_as_tuple, validator=_strings)
    #: A bearer token the API requires, when set.
    admin_token: Optional[str] = attr.ib(default=None, repr=False, validator=_text(optional=True))
    #: Let API callers other than loopback in (a token is then required).
    admin_allow_remote: bool = attr.ib(default=False, validator=_flag)
    #: Requests (handshakes and API calls) per second allowed from one peer
    #: address, 0 for no limit; bursts up to twice that.
    rate_limit: float = attr.ib(default=0.0, validator=_non_negative)
    #: C{memory}: one process is the whole gateway.  C{redis}: this process
    #: is one node of a gateway that shares its connections through Redis.
    engine: str = attr.ib(default="memory", validator=_text())
    redis_url: str = attr.ib(default=DEFAULT_REDIS_URL, repr=False, validator=_text())
    #: Prefix of every Redis key and channel: nodes with the same prefix
    #: (and Redis) form one gateway.
    redis_prefix: str = attr.ib(default="wsgw", validator=_text())
    #: This node's name in the cluster; by default the host name and the
    #: first listen endpoint.  It must be unique, and stable across restarts.
    node_id: Optional[str] = attr.ib(default=None, validator=_text(optional=True))
    #: A node that stops refreshing its presence leaves C{/list} after this.
    presence_ttl: float = attr.ib(default=15.0, validator=_positive)
    #: How long a cluster-wide send/close/list waits for the other nodes.
    cluster_timeout: float = attr.ib(default=2.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.admin_allow_remote and not self.admin_token:
            raise ConfigError(
                "admin_allow_remote", "admin_allow_remote needs an admin_token: the API would be open to anyone"
            )
        self._check_tls()
        if self.engine not in ENGINES:
            raise ConfigError("engine", f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "redis":
            try:
                self.redis_address()
            except ValueError as e:
                raise ConfigError("redis_url", f"redis_url is not usable: {e}") from None
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise ConfigError("node_id", "node_id must be 1 to 200 printable ASCII characters without spaces")
        if self.presence_ttl < 1:
            raise ConfigError(
                "presence_ttl",
                "presence_ttl must be at least 1 second: a node refreshes its presence every third of it",
            )
        try:
            trusted_networks(self.trusted_proxies)
        except ValueError as e:
            raise ConfigError("trusted_proxies", str(e)) from None
        if not _NODE_ID.fullmatch(self.redis_prefix):
            raise ConfigError("redis_prefix", "redis_prefix must be 1 to 200 printable ASCII characters without spaces")

    def _check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(
                missing, f"{missing} is missing: tls_cert and tls_key go together (a certificate and its private key)"
            )
        if self.tls_cert is None:
            return
        for description in self.listen:
            if is_ssl_endpoint(description):
                raise ConfigError(
                    "tls_cert",
                    f"tls_cert puts every listen endpoint in TLS, and {description} is TLS already:"
                    " listen on tcp: or systemd: with tls_cert and tls_key, or on ssl: without them",
                )

    def redis_address(self) -> RedisAddress:
        return parse_redis_url(self.redis_url)
