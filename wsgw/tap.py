"""
The C{twist wsgw} command line: options (each also read from a
C{WSGW_<NAME>} environment variable) and the service they make.

Precedence, highest first: the command line, C{WSGW_*} variables, the
Olares C{WS_PORT}/C{WS_URL} pair (for the app URL only), the defaults.
"""

from __future__ import annotations

import difflib
import gc
import importlib.util
import ipaddress
import math
import os
import re
import signal
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher
from twisted.python import usage
from zope.interface import provider

from . import __version__, internals
from .config import (
    Config,
    ConfigError,
    app_url_from_olares_env,
    is_ssl_endpoint,
    parse_http_url,
    read_token_file,
    trusted_networks,
)
from .service import make_service
from .systemd import SystemdNotifier
from .tls import ServerTLS, TLSFileError, load_certificate

_DEFAULTS = Config()


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _positive_int(value: str) -> int:
    number = _integer(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _non_negative_int(value: str) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _non_negative_float(value: str) -> float:
    number = _number(value)
    if not number >= 0:
        raise ValueError("must be 0 or more")
    return number


def _engine(value: str) -> str:
    if value == "redis" and importlib.util.find_spec("txredisapi") is None:
        # wsgw is not on PyPI: 'wsgw[redis]' would not install.
        raise ValueError(
            "needs the txredisapi package: pip install txredisapi (or pip install '.[redis]' in a wsgw checkout)"
        )
    return value


_read_token_file = read_token_file


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_boolean(value: str) -> bool:
    """
    A switch from the environment.  Anything but the usual spellings is
    refused: C{WSGW_REQUIRE_USER=Y} silently meaning off would open a
    security switch.
    """
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be one of 0, 1, true, false, yes, no, on, off")


LISTEN_FORMS = "PORT, HOST:PORT, [IPv6]:PORT or a Twisted endpoint such as tcp:40010, ssl:443:..., unix:/path, systemd:domain=INET:index=0"


def _port(text: str) -> str:
    if int(text) > 65535:
        raise ValueError(f"the port must be 0 to 65535; accepted: {LISTEN_FORMS}")
    return text


def _shorthand(text: str) -> Optional[str]:
    """The C{tcp:}/C{tcp6:} endpoint a shorthand means, or L{None} when C{text} is none."""
    if text.isdigit():
        return f"tcp:{_port(text)}"
    bracketed = re.fullmatch(r"\[([^\]]*)\]:(\d+)", text)
    if bracketed:
        try:
            address = ipaddress.IPv6Address(bracketed.group(1))
        except ValueError:
            raise ValueError(f"{bracketed.group(1)!r} is not an IPv6 address; accepted: {LISTEN_FORMS}") from None
        # Colons separate endpoint arguments: the address's own are escaped.
        interface = str(address).replace(":", "\\:")
        return f"tcp6:{_port(bracketed.group(2))}:interface={interface}"
    host_port = re.fullmatch(r"([^:]+):(\d+)", text)
    if host_port:
        try:
            address4 = ipaddress.IPv4Address(host_port.group(1))
        except ValueError:
            return None  # tcp:40010 and the like
        return f"tcp:{_port(host_port.group(2))}:interface={address4}"
    return None


def listen_endpoint(value: str) -> str:
    """
    The Twisted endpoint string for a C{--listen} value: C{40015} and
    C{HOST:PORT} (C{0.0.0.0:40015}, C{[::1]:40015}) are shorthands for
    C{tcp:} (C{tcp6:} for an IPv6 host).  The result is parsed, without
    listening, so that a bad one fails at start-up with one line.
    """
    text = _shorthand(value.strip()) or value.strip()
    numbered = re.match(r"(?:tcp6?|ssl):(?:port=)?(\d+)(?::|$)", text)
    if numbered:
        _port(numbered.group(1))
    try:
        # Against a MemoryReactor: the endpoint is built, nothing listens.
        serverFromString(MemoryReactor(), text)
    except (IndexError, KeyError) as e:
        if text.split(":", 1)[0] != "systemd":
            raise ValueError(f"{_endpoint_error(e)}; accepted: {LISTEN_FORMS}") from None
        # Twisted looks the passed sockets up by index or name.
        raise ValueError(
            "systemd passed no such socket: systemd: endpoints adopt a socket systemd opened"
            " (socket activation: start the service through systemd/wsgw.socket);"
            " to listen directly use tcp:PORT"
        ) from None
    except Exception as e:
        raise ValueError(f"{_endpoint_error(e)}; accepted: {LISTEN_FORMS}") from None
    return text


def _endpoint_error(e: Exception) -> str:
    message = str(e) or type(e).__name__
    if isinstance(e, ValueError) and message.startswith("Unknown endpoint type"):
        return message.rstrip(".")
    return f"not a usable endpoint ({message})"


def _trusted_proxy(value: str) -> str:
    trusted_networks([value])
    return value


def _connect_url(value: str) -> str:
    return parse_http_url(value, example="http://127.0.0.1:8888/ws/connect")


# option name → (Config field, parser, help)
_SETTINGS: Dict[str, Tuple[str, Callable[[str], object], str]] = {
    "app-url": (
        "app_url",
        parse_http_url,
        "URL that receives open/message/close events as POSTs "
        "(default: http://127.0.0.1:$WS_PORT$WS_URL when WS_PORT is set, else forward nothing)",
    ),
    "connect-url": (
        "connect_url",
        _connect_url,
        "URL the app decides at, before each handshake is answered, whether the connection may open "
        "(2xx admits, 4xx refuses with that status; no answer, 5xx: 503) [default: admit all]",
    ),
    "tls-cert": (
        "tls_cert",
        str,
        "PEM file of the certificate (the server's own, then its intermediates) to serve TLS (wss://) with "
        "on every --listen endpoint, systemd: sockets included; needs --tls-key; "
        "both are read again when they change (--tls-watch-interval) or on SIGHUP",
    ),
    "tls-key": ("tls_key", str, "PEM file of --tls-cert's private key (unencrypted)"),
    "tls-watch-interval": (
        "tls_watch_interval",
        _non_negative_float,
        "seconds between looks at --tls-cert and --tls-key; both are read again when either changed "
        "(0: on SIGHUP only)",
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


# option name → (Config field, parser of one value, help); each may be given several times.
_REPEATABLE: Dict[str, Tuple[str, Callable[[str], str], str]] = {
    "listen": (
        "listen",
        listen_endpoint,
        "where to serve /ws (and the API unless --admin-listen is given): a port (40010), HOST:PORT "
        "(0.0.0.0:40010, [::1]:40010), both short for tcp:/tcp6: endpoints, or any Twisted server endpoint, "
        "e.g. tcp:40010:interface=127.0.0.1, tcp6:40010:interface=\\:\\:1, "
        "ssl:443:privateKey=key.pem:certKey=cert.pem, unix:/run/wsgw.sock, systemd:domain=INET:index=0 "
        "(socket activation) [default: tcp:40010]",
    ),
    "admin-listen": (
        "admin_listen",
        listen_endpoint,
        "where to serve the API alone (forms as for --listen); /ws is then not served there",
    ),
    "trusted-proxy": (
        "trusted_proxies",
        _trusted_proxy,
        "IP address or CIDR block of a proxy whose X-Original-Forwarded-For / X-Forwarded-For are believed; "
        "the client's address is then the nearest one not trusted [default: believe any peer, as the original]",
    ),
    "allowed-origin": (
        "allowed_origins",
        str,
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

#: Options that set the same field; giving two at the same level is refused.
_ALTERNATIVES = {"admin_token": ("admin-token", "admin-token-file")}


def env_name(option: str) -> str:
    return "WSGW_" + option.upper().replace("-", "_")


def command_name() -> str:
    """How the user ran us: C{wsgw}, or C{twist wsgw} (also C{python -m twisted wsgw})."""
    return "wsgw" if os.path.basename(sys.argv[0]) == "wsgw" else "twist wsgw"


class Options(usage.Options):
    """
    Parses and validates; L{makeService} does the wiring.
    """

    longdesc = (
        "wsgw holds WebSocket clients at /ws, forwards their open/message/close events "
        "to an app over HTTP, and serves the app's API at /tapr/ws/conn/{send,close,list}. "
        "Every option can also be set from the environment as WSGW_<OPTION> "
        "(e.g. WSGW_PING_TIMEOUT=60; WSGW_LISTEN takes endpoints separated by spaces; "
        "switches take 1/0, true/false, yes/no or on/off). "
        "The command line wins over the environment. "
        "Run as `wsgw`, twist's own --log-level, --log-format, --log-file and --reactor are accepted too."
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
        self.failed = False
        for name in _REPEATABLE:
            self[name] = []

    def opt_version(self) -> None:
        """
        Print wsgw's version and exit.
        """
        print(f"wsgw {__version__}")
        sys.exit(0)

    def getSynopsis(self) -> str:
        if command_name() == "wsgw":
            return "Usage: wsgw [options]"
        return "Usage: twist [twist options] wsgw [options]"

    def getUsage(self, width: Optional[int] = None) -> str:
        # `twist` prints str(options) after every error: after ours, one
        # line pointing at --help instead of the whole option list.
        if self.failed:
            return f"run '{command_name()} --help' for all options"
        return super().getUsage(width)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            self.failed = True
            raise usage.UsageError(self._suggest(str(e))) from None

    def _suggest(self, message: str) -> str:
        """C{message}, with a "did you mean" when an unknown option is close to a known one."""
        unknown = re.match(r"option --([^ =]+) not recognized", message)
        if not unknown:
            return message
        known = [name.rstrip("=") for name in self.longOpt]
        close = difflib.get_close_matches(unknown.group(1), known, n=1, cutoff=0.6)
        return f"{message}; did you mean --{close[0]}?" if close else message

    def postOptions(self) -> None:
        settings: Dict[str, Any] = {}
        sources: Dict[str, str] = {}  # field → the option or variable that set it
        for name, (field, parse_one, _text) in _REPEATABLE.items():
            values: List[str] = self[name]
            source = f"--{name}"
            if not values:
                values = self.environ.get(env_name(name), "").split()
                source = env_name(name)
            if values:
                settings[field] = tuple(self._parse(source, value, parse_one) for value in values)
                sources[field] = source
        for name, (field, _text) in _FLAGS.items():
            raw = self.environ.get(env_name(name), "")
            if self[name]:
                settings[field], sources[field] = True, f"--{name}"
            elif raw.strip():
                settings[field], sources[field] = self._parse(env_name(name), raw, parse_boolean), env_name(name)
        for name, source, raw in self._chosen_settings():
            field, parse, _text = _SETTINGS[name]
            settings[field] = self._parse(source, raw, parse, secret=name == "admin-token")
            sources[field] = source
        if ("tls_cert" in sources) != ("tls_key" in sources):
            half = sources["tls_cert"] if "tls_cert" in sources else sources["tls_key"]
            both = ("--tls-cert", "--tls-key") if half.startswith("--") else (env_name("tls-cert"), env_name("tls-key"))
            missing = both[1] if "tls_cert" in sources else both[0]
            raise usage.UsageError(
                f"{missing} is missing: {both[0]} and {both[1]} go together (a certificate and its private key)"
            )
        if "app_url" not in settings:
            settings["app_url"] = app_url_from_olares_env(self.environ)
            sources["app_url"] = "WS_PORT/WS_URL"
        try:
            self.config = Config(**settings)
        except ConfigError as e:
            given = sources.get(e.field)
            raise usage.UsageError(f"{given}: {e}" if given else str(e)) from None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            try:
                load_certificate(self.config.tls_cert, self.config.tls_key)
            except TLSFileError as e:
                raise usage.UsageError(f"{sources['tls_' + e.which]}: {e}") from None

    def _chosen_settings(self) -> List[Tuple[str, str, str]]:
        """
        (option, source, raw value) for each setting given: the command line
        first, then C{WSGW_*} variables.  Two alternatives for one field at
        the same level (C{--admin-token} and C{--admin-token-file}) are
        refused rather than one silently winning.
        """
        chosen: Dict[str, Tuple[str, str, str, bool]] = {}
        for from_flags in (True, False):
            for name, (field, _parse, _text) in _SETTINGS.items():
                source = f"--{name}" if from_flags else env_name(name)
                raw = self[name] if from_flags else (self.environ.get(env_name(name)) or None)
                if raw is None:
                    continue
                if field in chosen:
                    other = chosen[field]
                    if other[3] == from_flags and field in _ALTERNATIVES:
                        raise usage.UsageError(f"{other[1]} and {source} are alternatives: give one of them")
                    continue
                chosen[field] = (name, source, raw, from_flags)
        return [(name, source, raw) for name, source, raw, _flag in chosen.values()]

    @staticmethod
    def _parse(source: str, raw: str, parse: Callable[[str], object], secret: bool = False) -> object:
        try:
            return parse(raw)
        except ValueError as e:
            shown = "…" if secret else repr(raw)
            raise usage.UsageError(f"{source}={shown}: {e}") from None


def _repeatable_option(name: str, text: str) -> Callable[[Options, str], None]:
    def opt(self: Options, value: str) -> None:
        self[name].append(value)

    opt.__doc__ = f"{text}; repeatable (env {env_name(name)}, separated by spaces)"
    return opt


for _name, (_field, _parse_one, _text) in _REPEATABLE.items():
    setattr(Options, "opt_" + _name.replace("-", "_"), _repeatable_option(_name, _text))


log = Logger()


class StopOnSignal(Service):
    """
    Treats SIGTERM and SIGINT as a requested stop: the reactor stops (the
    gateway drains) and the process exits 0.  Left alone, `twist` ends a
    process stopped by a signal by raising that signal again once the
    reactor stops (exit status 143 to a shell or supervisor, which reports
    a clean, complete drain as a kill), and a second SIGTERM during the
    drain logs a C{ReactorNotRunning} traceback.  systemd counts a SIGTERM
    death as clean either way; tests/test_startup.py pins both differences.
    """

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        # `twist` starts services before the reactor installs its own
        # handlers; take over once it has.
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._received)

    def _received(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.info("received {signal} again; still draining", signal=name)
            return
        self.stopping = True
        log.info("received {signal}; closing connections and draining", signal=name)
        self.reactor.callFromThread(self.reactor.stop)


class ReloadOnSignal(Service):
    """
    SIGHUP reads the TLS certificate and key again (C{tls}, a
    L{ServerTLS}): a renewed certificate is served from the next handshake
    on, with no connection dropped.  Installed only with C{--tls-cert}, so
    that elsewhere SIGHUP keeps its usual meaning.
    """

    def __init__(self, reactor: Any, tls: ServerTLS):
        self.reactor = reactor
        self.tls = tls

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(signal.signal, signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: object) -> None:
        log.info("received SIGHUP; reading the TLS certificate and key again")
        self.reactor.callFromThread(self.tls.reload)


def listener_urls(description: str, address: object, websocket: bool, api: bool, tls: bool = False) -> Dict[str, str]:
    """
    Where a listener serves, as URLs a user can paste: C{ws_url} for C{/ws}
    and C{api_url} for the API, each when served there; C{tls} when the
    listener is wrapped in TLS (C{--tls-cert}).
    """
    secure = tls or is_ssl_endpoint(description)
    ws_scheme, http_scheme = ("wss", "https") if secure else ("ws", "http")
    if isinstance(address, UNIXAddress):
        path = address.name.decode() if isinstance(address.name, bytes) else str(address.name)
        return _urls(
            websocket,
            api,
            f"{ws_scheme}://localhost/ws on unix:{path}",
            f"{http_scheme}://localhost/tapr/ws/conn/ on unix:{path}",
        )
    host = getattr(address, "host", "?")
    port = getattr(address, "port", "?")
    where = f"[{host}]:{port}" if isinstance(address, IPv6Address) else f"{host}:{port}"
    return _urls(websocket, api, f"{ws_scheme}://{where}/ws", f"{http_scheme}://{where}/tapr/ws/conn/")


def _urls(websocket: bool, api: bool, ws_url: str, api_url: str) -> Dict[str, str]:
    urls = {}
    if websocket:
        urls["ws_url"] = ws_url
    if api:
        urls["api_url"] = api_url
    return urls


def announce(config: Config, ports: Sequence[Any]) -> None:
    """
    Says what start-up did: one line per listener with its URLs, where
    events go (or a warning that they go nowhere), the engine and version.
    C{ports} are in C{make_service}'s order: C{config.listen}, then
    C{config.admin_listen}.
    """
    descriptions = list(config.listen) + list(config.admin_listen)
    separate_api = bool(config.admin_listen)
    for index, (description, port) in enumerate(zip(descriptions, ports)):
        websocket = index < len(config.listen)
        tls = websocket and config.tls_cert is not None
        urls = listener_urls(description, port.getHost(), websocket, api=not (websocket and separate_api), tls=tls)
        if websocket and "api_url" in urls:
            text = "serving /ws at {ws_url} and the API at {api_url} ({endpoint})"
        elif websocket:
            text = "serving /ws at {ws_url} ({endpoint})"
        else:
            text = "serving the API alone at {api_url} ({endpoint})"
        log.info(text, endpoint=description, **urls)
    if config.app_url:
        log.info("posting client events to {app_url}", app_url=config.app_url)
    else:
        log.warn(
            "no app URL is set (--app-url, or WS_PORT/WS_URL): client events go nowhere, only the API can reach clients"
        )
    log.info("wsgw {version} ready, engine {engine}", version=__version__, engine=config.engine)


@provider(ILogObserver)
def render_messages(event: Dict[str, Any]) -> None:
    """
    Puts the rendered message (C{text}) beside its template (C{log_format})
    in each event, for C{twist --log-format=json}, whose records otherwise
    hold only the template and its fields.  It is added to the global
    publisher before twist begins logging, so it sees each event before
    the JSON writer does.
    """
    if "log_format" in event and "text" not in event:
        event["text"] = formatEvent(event)


class Daemon(MultiService):
    """
    The daemon: the gateway's service with signal handling and systemd
    notification beside it.  A listener that cannot listen has logged why
    (the port, the holder, what to do); the start then ends with that line
    and exit status 1, not with the same error again as a traceback.
    """

    def __init__(self, listening: Deferred[List[Any]]):
        super().__init__()
        self.listening = listening

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError:
            self.listening.addErrback(lambda failure: None)  # the listener has said why
            raise SystemExit(1) from None


def settle_garbage_collector() -> None:
    """
    Once the daemon listens: what start-up built (modules, the service
    tree) is frozen out of the collector's reach, and the young generation
    is collected after 10,000 allocations rather than 700.  A gateway's
    objects live long (connections) or die young (requests, frames), and
    with Python's defaults the collector took about a quarter of a
    handshake's CPU over a 10,000-connection ramp, a third of that after.
    The daemon's choice alone: an embedding process keeps its own.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def makeService(options: Options, reactor: Any = None) -> Daemon:
    if reactor is None:
        from twisted.internet import reactor
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("logFormat") == "json":
        globalLogPublisher.addObserver(render_messages)
    service = make_service(options.config, reactor=reactor)
    daemon = Daemon(service.listening)
    service.setServiceParent(daemon)
    StopOnSignal(reactor).setServiceParent(daemon)
    if service.node.tls is not None:
        ReloadOnSignal(reactor, service.node.tls).setServiceParent(daemon)

    def listening(ports: List[Any]) -> List[Any]:
        announce(options.config, ports)
        settle_garbage_collector()
        return ports

    service.listening.addCallback(listening)
    SystemdNotifier(service.listening, reactor, options.environ).setServiceParent(daemon)
    return daemon


#: twist's own options, which the C{wsgw} command passes on to twist.
_TWIST_OPTIONS = ("--reactor", "--log-level", "--log-file", "--log-format")


def split_twist_options(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """C{argv} as (twist's own options, wsgw's options), wherever each was given."""
    twist: List[str] = []
    rest: List[str] = []
    words = iter(argv)
    for word in words:
        if word.split("=", 1)[0] in _TWIST_OPTIONS:
            twist.append(word)
            value = None if "=" in word else next(words, None)
            if value is not None:
                twist.append(value)
        else:
            rest.append(word)
    return twist, rest


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The C{wsgw} command: C{twist wsgw} with the same options (and twist's
    logging options anywhere on the line).  Under systemd the units run
    C{twist wsgw}; both are the same daemon.
    """
    twist, rest = split_twist_options(sys.argv[1:] if argv is None else argv)
    internals.run_twist(["wsgw", *twist, "wsgw", *rest], "run 'wsgw --help' for all options")
