"""
The C{twist wsgw} command line: options (each also read from a
C{WSGW_<NAME>} environment variable) and the service they make.

Precedence, highest first: the command line, C{WSGW_*} variables, the
Olares C{WS_PORT}/C{WS_URL} pair (for the app URL only), the defaults.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from typing import Callable, Dict, Mapping, Tuple

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from .config import Config, app_url_from_olares_env
from .service import make_service
from .systemd import SystemdNotifier

_DEFAULTS = Config()


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be 0 or more")
    return number


def _engine(value: str) -> str:
    if value == "redis" and importlib.util.find_spec("txredisapi") is None:
        raise ValueError("needs the txredisapi package: pip install 'wsgw[redis]'")
    return value


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    if not token:
        raise ValueError("the file is empty")
    return token


# option name → (Config field, parser, help)
_SETTINGS: Dict[str, Tuple[str, Callable[[str], object], str]] = {
    "app-url": (
        "app_url",
        str,
        "URL that receives open/message/close events as POSTs "
        "(default: http://127.0.0.1:$WS_PORT$WS_URL when WS_PORT is set, else forward nothing)",
    ),
    "connect-url": (
        "connect_url",
        str,
        "URL the app decides at, before each handshake is answered, whether the connection may open "
        "(2xx admits, 4xx refuses with that status; no answer, 5xx: 503) [default: admit all]",
    ),
    "presence-grace": (
        "presence_grace",
        _non_negative_float,
        "seconds a user must have no connection before its offline event (with --presence-events)",
    ),
    "connect-timeout": ("connect_timeout", _positive_float, "seconds a handshake waits for --connect-url's answer"),
    "connect-max-waiting": (
        "connect_max_waiting",
        _positive_int,
        "handshakes that may wait for --connect-url's answer at once (more: 503)",
    ),
    "ping-timeout": ("ping_timeout", _positive_float, "close a connection silent this many seconds"),
    "ping-check-interval": ("ping_check_interval", _positive_float, "seconds between heartbeat sweeps"),
    "ws-ping-interval": (
        "ws_ping_interval",
        _non_negative_float,
        "seconds between WebSocket pings the gateway sends every client (0: none); "
        "a client silent for --ping-timeout is closed",
    ),
    "app-timeout": ("app_timeout", _positive_float, "seconds before one POST to the app is abandoned (and retried)"),
    "retry-window": ("retry_window", _positive_float, "seconds to keep retrying an event the app failed"),
    "app-down-after": (
        "app_down_after",
        _positive_float,
        "seconds of failed event POSTs, with no success between, before /readyz says the app is down (503)",
    ),
    "max-in-flight": ("max_in_flight", _positive_int, "event POSTs in flight at once, all connections"),
    "app-batch": (
        "app_batch",
        _positive_int,
        "events one POST may carry, of any connections, as a JSON array (1: each event alone, as the original)",
    ),
    "max-backlog": ("max_backlog", _positive_int, "events queued per connection before reading from it pauses"),
    "max-backlog-bytes": (
        "max_backlog_bytes",
        _positive_int,
        "bytes of events queued per connection before reading from it pauses",
    ),
    "max-outgoing": (
        "max_outgoing",
        _positive_int,
        "bytes waiting for a client that does not read before it is dropped",
    ),
    "max-connections": (
        "max_connections",
        _non_negative_int,
        "open connections in total (0: no limit; more: 503 at the handshake)",
    ),
    "max-connections-per-user": (
        "max_connections_per_user",
        _non_negative_int,
        "open connections per user name (0: no limit; more: 429 at the handshake)",
    ),
    "max-message-size": ("max_message_size", _positive_int, "largest client message in bytes (larger: close 1009)"),
    "max-api-body": ("max_api_body", _positive_int, "largest API request body in bytes (larger: 413)"),
    "handshake-timeout": (
        "handshake_timeout",
        _positive_float,
        "seconds a new connection has to send its first complete request (handshake or API call)",
    ),
    "drain-timeout": ("drain_timeout", _positive_float, "seconds to deliver close events on shutdown"),
    "user-header": ("user_header", str, "request header with the user's name"),
    "admin-token": ("admin_token", str, "bearer token the API requires (Authorization: Bearer ...)"),
    "admin-token-file": ("admin_token", _read_token_file, "file holding the API's bearer token"),
    "rate-limit": (
        "rate_limit",
        _non_negative_float,
        "requests per second per peer address, bursts of twice that (0: off; more: 429)",
    ),
    "engine": (
        "engine",
        _engine,
        "memory (this process is the whole gateway) or redis (one node of several sharing Redis)",
    ),
    "redis-url": (
        "redis_url",
        str,
        "Redis for --engine redis: redis://[[user]:password@]host[:port][/db], rediss:// (TLS) or unix:///path",
    ),
    "redis-prefix": ("redis_prefix", str, "prefix of the Redis keys and channels; nodes sharing it form one gateway"),
    "node-id": ("node_id", str, "this node's unique, stable name in the cluster [default: host name/first --listen]"),
    "presence-ttl": (
        "presence_ttl",
        _positive_float,
        "seconds after which a node that stopped refreshing leaves /list",
    ),
    "cluster-timeout": ("cluster_timeout", _positive_float, "seconds a send/close waits for the other nodes' counts"),
}

# option name → (Config field, help); each may be given several times.
_REPEATABLE: Dict[str, Tuple[str, str]] = {
    "listen": (
        "listen",
        "Twisted server endpoint to serve /ws (and the API unless --admin-listen is given) on, "
        "e.g. tcp:40010, tcp:40010:interface=127.0.0.1, ssl:443:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/wsgw.sock, systemd:domain=INET:index=0 [default: tcp:40010]",
    ),
    "admin-listen": ("admin_listen", "endpoint that serves the API alone; /ws is then not served there"),
    "trusted-proxy": (
        "trusted_proxies",
        "IP address or CIDR block of a proxy whose X-Original-Forwarded-For / X-Forwarded-For are believed; "
        "the client's address is then the nearest one not trusted [default: believe any peer, as the original]",
    ),
    "allowed-origin": (
        "allowed_origins",
        "Origin pattern (fnmatch, e.g. https://*.example.com) a browser handshake may come from, "
        "besides same-origin pages and clients that send no Origin",
    ),
}

# flag name → (Config field, help)
_FLAGS: Dict[str, Tuple[str, str]] = {
    "require-user": ("require_user", "refuse handshakes without the user header (401)"),
    "admin-allow-remote": ("admin_allow_remote", "let API callers other than loopback in (needs an admin token)"),
    "presence-events": (
        "presence_events",
        "post online/offline events per user to the app (offline after --presence-grace with no connection)",
    ),
    "log-connections": (
        "log_connections",
        "log each connection's open and close (info level; off: counted in /metrics only)",
    ),
}


def env_name(option: str) -> str:
    return "WSGW_" + option.upper().replace("-", "_")


class Options(usage.Options):
    """
    Parses and validates; L{makeService} does the wiring.
    """

    synopsis = "[options]"
    longdesc = (
        "wsgw holds WebSocket clients at /ws, forwards their open/message/close events "
        "to an app over HTTP, and serves the app's API at /tapr/ws/conn/{send,close,list}. "
        "Every option can also be set from the environment as WSGW_<OPTION> "
        "(e.g. WSGW_PING_TIMEOUT=60; WSGW_LISTEN takes endpoints separated by spaces)."
    )
    optFlags = [[name, None, f"{text} (env {env_name(name)}=1)"] for name, (_field, text) in _FLAGS.items()]
    optParameters = [
        [
            name,
            None,
            None,
            text
            + ("" if getattr(_DEFAULTS, field) is None else f" [default: {getattr(_DEFAULTS, field)}]")
            + f" (env {env_name(name)})",
        ]
        for name, (field, _parse, text) in _SETTINGS.items()
    ]

    def __init__(self, environ: Mapping[str, str] = os.environ):
        super().__init__()
        self.environ = environ
        for name in _REPEATABLE:
            self[name] = []

    def postOptions(self) -> None:
        settings = {}
        for name, (field, _text) in _REPEATABLE.items():
            values = self[name] or self.environ.get(env_name(name), "").split()
            if values:
                settings[field] = tuple(values)
        for name, (field, _text) in _FLAGS.items():
            if self[name] or self.environ.get(env_name(name), "").lower() in ("1", "true", "yes", "on"):
                settings[field] = True
        for name, (field, parse, _text) in _SETTINGS.items():
            raw = self[name]
            if raw is None:
                raw = self.environ.get(env_name(name)) or None
            if raw is None or field in settings:
                continue
            try:
                settings[field] = parse(raw)
            except ValueError as e:
                shown = "…" if field == "admin_token" else repr(raw)
                raise usage.UsageError(f"--{name}={shown}: {e}") from None
        if "app_url" not in settings:
            settings["app_url"] = app_url_from_olares_env(self.environ)
        try:
            self.config = Config(**settings)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _repeatable_option(name: str, text: str):
    def opt(self, value: str) -> None:
        self[name].append(value)

    opt.__doc__ = f"{text}; repeatable (env {env_name(name)}, separated by spaces)"
    return opt


for _name, (_field, _text) in _REPEATABLE.items():
    setattr(Options, "opt_" + _name.replace("-", "_"), _repeatable_option(_name, _text))


log = Logger()


class StopOnSignal(Service):
    """
    Treats SIGTERM and SIGINT as a requested stop: the reactor stops (the
    gateway drains) and the process exits 0.  Left alone, `twist` ends a
    process stopped by a signal by raising that signal again once the
    reactor stops, which reports a clean, complete drain as a kill.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.stopping = False

    def startService(self):
        super().startService()
        # `twist` starts services before the reactor installs its own
        # handlers; take over once it has.
        self.reactor.callWhenRunning(self._install)

    def _install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._received)

    def _received(self, signum, frame):
        if self.stopping:
            return
        self.stopping = True
        log.info("received {signal}; closing connections and draining", signal=signal.Signals(signum).name)
        self.reactor.callFromThread(self.reactor.stop)


def makeService(options: Options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    service = make_service(options.config, reactor=reactor)
    StopOnSignal(reactor).setServiceParent(service)
    SystemdNotifier(service.listening, reactor, options.environ).setServiceParent(service)
    return service
