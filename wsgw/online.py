"""
Who is online (C{--presence-events}): per user name, an C{online} event
when it gets its first non-public connection, and an C{offline} event once
it has had none for the grace period, so that a page reload or a network
blip does not flicker.

Per user the two alternate strictly.  C{online} goes in the stream of the
connection that caused it, ahead of its C{open}; C{offline} in the stream
of the user's last connection, behind its C{close}: the forwarder's
per-connection order then puts each where it belongs, retries included.
Public (anonymous) connections never make a user online: in Olares they
share the owner's user name.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import attr
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from . import events
from .interfaces import IEventQueue, IOnlineUsers
from .registry import Connection

#: (the connection whose stream carries it, "online" or "offline")
Emit = Callable[[Connection, str], None]


@attr.s(frozen=True)
class PresenceEvents:
    """Builds C{online}/C{offline} events and queues them for the app."""

    queue: IEventQueue = attr.ib()

    def in_stream(self, conn: Connection, action: str) -> None:
        """
        C{action} for C{conn}'s user, in C{conn}'s stream (so in order with
        its events) and numbered in its sequence (so the app can drop a
        repeat by its event id, as any other).
        """
        seq = conn.next_seq
        conn.next_seq = seq + 1
        self.queue.enqueue(events.Event(conn.conn_id, seq, action, events.presence_event(action, conn.user_name)))

    def decided(self, action: str, user_name: str, event_id: str, stream: str) -> events.Event:
        """
        C{action} for C{user_name} as a cluster decided it, under the id the
        cluster gave it, for the stream C{stream}.
        """
        return events.Event(stream, 0, action, events.presence_event(action, user_name), given_id=event_id)


@attr.s(slots=True, eq=False)
class _User:
    #: Its non-public connections whose C{close} is not queued yet.
    connections: int = attr.ib(default=0)
    #: The last of them to end: its stream carries C{offline}.
    last: Optional[Connection] = attr.ib(default=None)
    #: The grace period running out, while it has none.
    going: Optional[IDelayedCall] = attr.ib(default=None)


@implementer(IOnlineUsers)
@attr.s(eq=False)
class OnlineUsers:
    """
    The users online on this gateway, told by the gateway of each
    connection that opens and each whose C{close} event is queued.
    """

    clock: IReactorTime = attr.ib()
    emit: Emit = attr.ib()
    grace: float = attr.ib(default=5.0)
    #: Transitions so far, for /metrics.
    went_online: int = attr.ib(default=0, init=False)
    went_offline: int = attr.ib(default=0, init=False)
    _users: Dict[str, _User] = attr.ib(factory=dict, init=False)
    #: Shutting down: a user whose last connection ends goes offline at once.
    _closing: bool = attr.ib(default=False, init=False)

    def __len__(self) -> int:
        return len(self._users)

    def opened(self, conn: Connection) -> None:
        if conn.access_public:
            return
        user = self._users.get(conn.user_name)
        if user is None:
            user = self._users[conn.user_name] = _User()
            self.went_online += 1
            self.emit(conn, "online")
        elif user.going is not None:  # back within the grace period: nothing to say
            user.going.cancel()
            user.going = None
        user.connections += 1

    def ended(self, conn: Connection) -> None:
        if conn.access_public:
            return
        user = self._users.get(conn.user_name)
        if user is None:
            return
        user.connections -= 1
        user.last = conn
        if user.connections == 0:
            if self._closing:
                self._offline(conn.user_name)
            else:
                user.going = self.clock.callLater(self.grace, self._offline, conn.user_name)

    def shutting_down(self) -> None:
        """Every user waiting out its grace period goes offline now."""
        self._closing = True
        for name, user in list(self._users.items()):
            if user.going is not None:
                user.going.cancel()
                self._offline(name)

    def _offline(self, name: str) -> None:
        user = self._users.pop(name)
        user.going = None
        assert user.last is not None
        self.went_offline += 1
        self.emit(user.last, "offline")
