"""
The open connections, indexed so that C{send}, C{close} and C{list} touch
only the connections they are about, never every connection.
"""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IChannel, IReadThrottle, IReplies

if TYPE_CHECKING:
    from .events import Event

_log = Logger()


class AccessType(enum.IntEnum):
    """
    C{users_access_type}: which of a user's connections a C{users} target
    reaches.
    """

    ALL = 0
    PRIVATE = 1
    PUBLIC = 2


def _strings(values: Iterable[str]) -> Tuple[str, ...]:
    return tuple(values)


def _access(value: Any) -> AccessType:
    # Calling the enum on one of its members is a tenth of a send's Targets.
    return value if type(value) is AccessType else AccessType(value)


@attr.s(frozen=True, slots=True, kw_only=True)
class Targets:
    """
    Which connections a C{send} or C{close} is for: those that match every
    criterion given (the original gateway's intersection rule).  An empty
    criterion is absent; with none at all, nothing matches.
    """

    conn_ids: Tuple[str, ...] = attr.ib(default=(), converter=_strings)
    users: Tuple[str, ...] = attr.ib(default=(), converter=_strings)
    tokens: Tuple[str, ...] = attr.ib(default=(), converter=_strings)
    #: Narrows C{users} to private or public connections
    #: (C{users_access_type}).
    access: AccessType = attr.ib(default=AccessType.ALL, converter=_access)

    def __bool__(self) -> bool:
        return bool(self.conn_ids or self.users or self.tokens)

    def only_conn_ids(self) -> bool:
        """Conn ids are the only criterion."""
        return bool(self.conn_ids) and not self.users and not self.tokens


_new_targets = object.__new__
_set_field = object.__setattr__


def plain_targets(conn_ids: Tuple[str, ...] = (), users: Tuple[str, ...] = ()) -> Targets:
    """
    C{Targets(conn_ids=conn_ids, users=users)} for tuples of strings: the
    same record, without the five calls of its converters (a C{send}'s
    common targets, made once per call).
    """
    targets: Targets = _new_targets(Targets)
    _set_field(targets, "conn_ids", conn_ids)
    _set_field(targets, "users", users)
    _set_field(targets, "tokens", ())
    _set_field(targets, "access", AccessType.ALL)
    return targets


@attr.s(slots=True, eq=False, kw_only=True)
class Connection:
    """
    One client connection as the gateway knows it.

    C{channel} carries frames to the client (the WebSocket protocol in the
    daemon) until the connection has ended; the registry never uses it.
    """

    conn_id: str = attr.ib()
    user_name: str = attr.ib()
    token: str = attr.ib(repr=False)
    access_public: bool = attr.ib()
    user_agent: str = attr.ib(default="")
    remote_addr: str = attr.ib(default="")
    cookie: str = attr.ib(default="", repr=False)
    channel: Optional[IChannel] = attr.ib(default=None, repr=False)
    #: When the client was last heard from (reactor seconds).
    last_seen: float = attr.ib(default=0.0)
    #: Sequence number of this connection's next event to the app.
    next_seq: int = attr.ib(default=0)
    #: The fields every event of this connection ends with, pre-encoded.
    event_tail: bytes = attr.ib(default=b"", repr=False)
    #: The gateway has begun closing it (it left the indexes already).
    closing: bool = attr.ib(default=False)
    #: Its C{close} event has been queued: nothing may follow.
    ended: bool = attr.ib(default=False)

    def describe(self) -> Dict[str, str]:
        """
        This connection as C{/list} shows it.
        """
        agent = self.user_agent
        return {
            "id": self.conn_id,
            "token": self.token,
            "userAgent": agent,
            "userAgentTag": hashlib.md5(agent.encode("utf-8")).hexdigest() if agent else "",
            "remoteAddr": self.remote_addr,
        }


def _add(index: Dict[str, Dict[str, Connection]], key: str, conn: Connection) -> None:
    bucket = index.get(key)
    if bucket is None:
        index[key] = {conn.conn_id: conn}
    else:
        bucket[conn.conn_id] = conn


def _discard(index: Dict[str, Dict[str, Connection]], key: str, conn_id: str) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.pop(conn_id, None)
        if not bucket:
            del index[key]


@attr.s(slots=True)
class Registry:
    """
    Open connections by conn id, by user name and by token.

    Each index maps to a dict keyed by conn id, so iteration follows the
    order connections opened and removal is constant time.
    """

    _by_id: Dict[str, Connection] = attr.ib(factory=dict)
    _by_user: Dict[str, Dict[str, Connection]] = attr.ib(factory=dict)
    _by_token: Dict[str, Dict[str, Connection]] = attr.ib(factory=dict)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def add(self, conn: Connection) -> None:
        if conn.conn_id in self._by_id:
            raise ValueError(f"duplicate conn id {conn.conn_id}")
        self._by_id[conn.conn_id] = conn
        _add(self._by_user, conn.user_name, conn)
        _add(self._by_token, conn.token, conn)

    def remove(self, conn: Connection) -> bool:
        """
        Forget C{conn}; L{True} if it was registered.
        """
        if self._by_id.pop(conn.conn_id, None) is None:
            return False
        _discard(self._by_user, conn.user_name, conn.conn_id)
        _discard(self._by_token, conn.token, conn.conn_id)
        return True

    def count_user(self, user_name: str) -> int:
        return len(self._by_user.get(user_name, ()))

    def get(self, conn_id: str) -> Optional[Connection]:
        return self._by_id.get(conn_id)

    def select(self, targets: Targets) -> List[Connection]:
        """
        The connections C{targets} names, in the order they opened.
        """
        conn_ids, users, tokens, access = targets.conn_ids, targets.users, targets.tokens, targets.access
        # The common calls, as the general rule below answers them: one
        # conn id, or all of one user's connections.
        if not tokens:
            if not users:
                if len(conn_ids) == 1:
                    found = self._by_id.get(conn_ids[0])
                    return [] if found is None else [found]
            elif not conn_ids and len(users) == 1 and access is AccessType.ALL:
                bucket = self._by_user.get(users[0])
                return list(bucket.values()) if bucket else []
        return self._select(conn_ids, users, tokens, access)

    def _select(
        self, conn_ids: Tuple[str, ...], users: Tuple[str, ...], tokens: Tuple[str, ...], access: AccessType
    ) -> List[Connection]:
        """The original gateway's rule: the connections every criterion given names."""
        candidates: List[List[Connection]] = []
        if conn_ids:
            candidates.append([c for c in map(self._by_id.get, dict.fromkeys(conn_ids)) if c is not None])
        if users:
            candidates.append(self._union(self._by_user, users))
        if tokens:
            candidates.append(self._union(self._by_token, tokens))
        if not candidates:
            return []
        narrow = bool(users) and access is not AccessType.ALL
        if len(candidates) == 1 and not narrow:
            return candidates[0]  # one criterion: nothing to intersect (a fan-out's common case)
        candidates.sort(key=len)
        smallest, others = candidates[0], candidates[1:]
        other_ids = [{c.conn_id for c in group} for group in others]
        return [
            conn
            for conn in smallest
            if all(conn.conn_id in ids for ids in other_ids) and not (narrow and not _access_allows(access, conn))
        ]

    @staticmethod
    def _union(index: Dict[str, Dict[str, Connection]], keys: Sequence[str]) -> List[Connection]:
        found: Dict[str, Connection] = {}
        for key in dict.fromkeys(keys):
            bucket = index.get(key)
            if bucket:
                found.update(bucket)
        return list(found.values())

    def listing(self) -> List[Dict[str, Any]]:
        """
        The C{/list} answer: one entry per user name with open connections.
        """
        return group_listing((c.user_name, c.access_public, c.describe()) for c in self._by_id.values())


def group_listing(described: Iterable[Tuple[str, bool, Dict[str, str]]]) -> List[Dict[str, Any]]:
    """
    C{/list} entries from C{(user name, public, described connection)}
    triples: one entry per user, in the order users first appear.
    """
    users: Dict[str, Tuple[List[Dict[str, str]], List[Dict[str, str]]]] = {}
    for name, public, conn in described:
        private_conns, public_conns = users.setdefault(name, ([], []))
        (public_conns if public else private_conns).append(conn)
    return [
        {
            "name": name,
            "conns": private_conns,
            "conns_number": len(private_conns),
            "public_conns": public_conns,
            "public_conns_number": len(public_conns),
        }
        for name, (private_conns, public_conns) in users.items()
    ]


def _access_allows(access: AccessType, conn: Connection) -> bool:
    if access is AccessType.PRIVATE:
        return not conn.access_public
    if access is AccessType.PUBLIC:
        return conn.access_public
    return True


@attr.s(slots=True)
class ReplyStats:
    """Inline replies: sent, refused (not UTF-8, too big), or with nowhere to go."""

    sent: int = attr.ib(default=0)
    refused: Dict[str, int] = attr.ib(factory=dict)
    dropped: int = attr.ib(default=0)


def _unprepared(payload: bytes, binary: bool = False) -> object:
    return payload


@implementer(IReadThrottle, IReplies)
@attr.s(slots=True)
class LiveConnections:
    """
    Connections open or closing whose C{close} event is not queued yet:
    a superset of the registry, which a closing connection leaves at once.

    The forwarder pauses and resumes reading from these through
    L{IReadThrottle}, and hands them the app's inline replies through
    L{IReplies}: a reply of at most C{max_reply} bytes of UTF-8 is framed
    with C{prepare} and sent while the connection is still open.
    """

    clock: IReactorTime = attr.ib()
    prepare: Callable[[bytes, bool], object] = attr.ib(default=_unprepared)
    max_reply: int = attr.ib(default=1024 * 1024)
    reply_stats: ReplyStats = attr.ib(factory=ReplyStats)
    _by_id: Dict[str, Connection] = attr.ib(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, conn: Connection) -> None:
        self._by_id[conn.conn_id] = conn

    def discard(self, conn: Connection) -> None:
        self._by_id.pop(conn.conn_id, None)

    def holds(self, conn: Connection) -> bool:
        return self._by_id.get(conn.conn_id) is conn

    def snapshot(self) -> List[Connection]:
        return list(self._by_id.values())

    def backlog_full(self, conn_id: str) -> None:
        conn = self._by_id.get(conn_id)
        if conn is not None and conn.channel is not None:
            conn.channel.pause_reading()

    def backlog_eased(self, conn_id: str) -> None:
        conn = self._by_id.get(conn_id)
        if conn is not None and conn.channel is not None:
            # Paused is not silent: the heartbeat starts counting afresh.
            conn.last_seen = self.clock.seconds()
            conn.channel.resume_reading()

    def reply(self, event: Event, body: bytes) -> None:
        stats = self.reply_stats
        if not body:
            return
        conn = self._by_id.get(event.conn_id)
        if event.action == "close" or conn is None or conn.channel is None or conn.closing:
            stats.dropped += 1
            return
        if len(body) > self.max_reply:
            self._refuse(event, "too_big", f"{len(body)} bytes, over --max-message-size ({self.max_reply})")
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(event, "not_utf8", "not UTF-8 text")
            return
        conn.channel.deliver(self.prepare(body, False))
        stats.sent += 1

    def _refuse(self, event: Event, reason: str, why: str) -> None:
        refused = self.reply_stats.refused
        refused[reason] = refused.get(reason, 0) + 1
        _log.warn(
            "refused the app's reply to {event_id}: {why}",
            event_id=event.event_id,
            why=why,
        )
