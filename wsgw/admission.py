"""
Whether a WebSocket handshake may become a connection: the page's origin,
the signed-in user, and the connection limits.  Checked in the WebSocket
protocol's C{onConnect}, once the handshake is parsed, whichever way the
upgrade arrived (straight from the listener, or through a twisted.web
resource in an embedding application).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import attr

from .access import OriginPolicy
from .registry import Registry


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Refusal:
    """A handshake refused: the HTTP status, what to tell the client, and
    the reason an operator counts it under."""

    status: int
    message: str
    label: str
    #: The answer's body, when not the gateway's own JSON of C{message}
    #: (the app's refusal, passed on).
    body: Optional[bytes] = None

    @property
    def retry_after(self) -> Optional[int]:
        """Seconds a client should wait before trying again, for a limit."""
        return 5 if self.status in (429, 503) else None


@attr.s(slots=True)
class Waiting:
    """Handshakes waiting for the app's verdict, in all and per user."""

    total: int = attr.ib(default=0)
    by_user: Dict[str, int] = attr.ib(factory=dict)

    def add(self, user: str) -> None:
        self.total += 1
        self.by_user[user] = self.by_user.get(user, 0) + 1

    def discard(self, user: str) -> None:
        self.total -= 1
        left = self.by_user.pop(user, 1) - 1
        if left:
            self.by_user[user] = left


@attr.s(frozen=True, eq=False)
class HandshakePolicy:
    """
    The checks a handshake passes before it is answered with 101.
    """

    registry: Registry = attr.ib()
    origins: OriginPolicy = attr.ib(factory=OriginPolicy)
    user_header: str = attr.ib(default="X-Bfl-User")
    require_user: bool = attr.ib(default=False)
    #: Open connections allowed in total and per user name (0: no limit).
    max_connections: int = attr.ib(default=0)
    max_connections_per_user: int = attr.ib(default=0)
    #: Handshakes waiting for the app count against the limits...
    waiting: Waiting = attr.ib(factory=Waiting)
    #: ...and are at most this many (0: no bound).
    max_waiting: int = attr.ib(default=0)

    def refusal(self, origin: Optional[str], hosts: Sequence[str], user: str) -> Optional[Refusal]:
        """
        C{origin}: the C{Origin} header, if any; C{hosts}: the C{Host} the
        client asked for and, behind a proxy that rewrites it, the
        C{X-Forwarded-Host}; C{user}: the user header's value.
        """
        if not self.origins.allows(origin, hosts):
            return Refusal(403, "this page's origin may not open WebSockets here (see --allowed-origin)", "origin")
        if self.require_user and not user:
            return Refusal(401, f"sign in first: the {self.user_header} header is missing", "no_user")
        registry, waiting = self.registry, self.waiting
        if self.max_waiting and waiting.total >= self.max_waiting:
            return Refusal(503, f"{waiting.total} handshakes wait for the app already; try again later", "connect_busy")
        if self.max_connections and len(registry) + waiting.total >= self.max_connections:
            return Refusal(
                503,
                f"the gateway holds its limit of {self.max_connections} connections; try again later",
                "max_connections",
            )
        if (
            self.max_connections_per_user
            and registry.count_user(user) + waiting.by_user.get(user, 0) >= self.max_connections_per_user
        ):
            return Refusal(
                429,
                f"this user holds its limit of {self.max_connections_per_user} connections",
                "max_connections_per_user",
            )
        return None
