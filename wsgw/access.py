"""
Who may use the gateway: the API's callers (loopback, bearer token), the
browser pages that may open WebSockets (Origin), and how fast one peer may
knock (a per-address token bucket).
"""

from __future__ import annotations

import fnmatch
import functools
import hmac
import ipaddress
from typing import Any, Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReactorTime


def peer_host(address: object) -> Optional[str]:
    """The IP address of a peer, or L{None} for a non-IP (UNIX) peer."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return None


def is_local(address: object) -> bool:
    """
    Loopback peers (127.0.0.0/8, ::1, and IPv4-mapped loopback) and UNIX
    socket peers, whom filesystem permissions already vetted.
    """
    if isinstance(address, UNIXAddress):
        return True
    host = peer_host(address)
    return host is not None and _loopback(host)


@functools.lru_cache(maxsize=4096)
def _loopback(host: str) -> bool:
    # Cached: every API call asks, and callers are a handful of addresses.
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def bearer_matches(authorization: Optional[bytes], token: str) -> bool:
    """
    Whether an C{Authorization} header carries C{token} as a bearer token,
    compared in constant time.
    """
    if not authorization:
        return False
    scheme, _, value = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(value.strip(), token.encode("utf-8"))


@attr.s(frozen=True)
class ApiAccess:
    """
    The API's door: loopback callers only unless C{allow_remote}, and the
    bearer C{token} when one is set.
    """

    token: Optional[str] = attr.ib(default=None, repr=False)
    allow_remote: bool = attr.ib(default=False)

    def refusal(self, request: Any) -> Optional[Tuple[int, str]]:
        """C{(status, message)} when C{request} may not use the API."""
        if not self.allow_remote and not is_local(request.getClientAddress()):
            return 403, "the API answers loopback callers only"
        if self.token is not None and not bearer_matches(request.getHeader(b"authorization"), self.token):
            return 401, "the API needs the gateway's token: Authorization: Bearer <token>"
        return None


def _origin_netloc(origin: str) -> Optional[str]:
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname:
        return None
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    port = parts.port
    return parts.hostname if port is None or port == default else f"{parts.hostname}:{port}"


def _host_netloc(host: str) -> str:
    host = host.strip().lower()
    for suffix in (":80", ":443"):
        if host.endswith(suffix):
            return host[: -len(suffix)]
    return host


def _lowered(patterns: Sequence[str]) -> Tuple[str, ...]:
    return tuple(pattern.lower() for pattern in patterns)


@attr.s(frozen=True)
class OriginPolicy:
    """
    Cross-site WebSocket hijacking guard: browsers send the user's cookies
    with a WebSocket opened by any page, so a handshake whose C{Origin} is
    another site is refused unless a pattern allows it.  Clients that send
    no C{Origin} (not browsers) and same-origin pages are allowed.
    """

    patterns: Sequence[str] = attr.ib(default=(), converter=_lowered)

    def allows(self, origin: Optional[str], hosts: Sequence[str]) -> bool:
        """
        C{hosts}: the C{Host} the client asked for and, behind a proxy that
        rewrites it, the C{X-Forwarded-Host}.
        """
        if origin is None:
            return True
        origin = origin.strip().lower()
        netloc = _origin_netloc(origin)
        if netloc is not None and any(netloc == _host_netloc(h) for h in hosts if h):
            return True
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.patterns)


@attr.s(eq=False)
class PeerRateLimiter:
    """
    A token bucket per peer address: C{rate} requests a second, bursts of
    C{2 * rate}.  Idle buckets are forgotten so a scan from many addresses
    cannot grow it without bound.
    """

    clock: IReactorTime = attr.ib()
    rate: float = attr.ib()
    max_peers: int = attr.ib(default=10_000)
    _buckets: Dict[str, Tuple[float, float]] = attr.ib(factory=dict, init=False)

    @property
    def burst(self) -> float:
        return 2 * self.rate

    def allow(self, peer: str) -> bool:
        now = self.clock.seconds()
        tokens, last = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if peer not in self._buckets and len(self._buckets) >= self.max_peers:
            self._forget_idle(now)
        self._buckets[peer] = (tokens, now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        refill = self.burst / self.rate
        idle = [peer for peer, (_tokens, last) in self._buckets.items() if now - last >= refill]
        for peer in idle:
            del self._buckets[peer]
        if len(self._buckets) >= self.max_peers:  # all busy: forget the oldest half
            for peer, _ in sorted(self._buckets.items(), key=lambda item: item[1][1])[: self.max_peers // 2]:
                del self._buckets[peer]

    def __len__(self) -> int:
        return len(self._buckets)
