"""
The gateway's domain: connections come and go, their events go to the app,
and the app's C{send}/C{close}/C{list} act on them.

Nothing here knows about sockets or HTTP: the WebSocket protocol calls in
with what happened, and each connection's L{IChannel} carries frames out.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from . import events
from .forwarder import AppForwarder
from .interfaces import IAnswerFirst, IChannel, IConnectionsHere, IMembership, IOnlineUsers, Listing, Reach
from .registry import Connection, LiveConnections, Registry, Targets

log = Logger()

#: Close codes the gateway sends (documented in the README).
CLOSE_BY_APP = (4000, "closed by app")
CLOSE_PING_TIMEOUT = (4001, "ping timeout")
CLOSE_GOING_AWAY = (1001, "going away")
#: Not sent (the client is not reading): reported to the app in the close event.
CLOSE_TOO_SLOW = (4002, "client too slow")

#: Close codes by the reason an operator counts them under.
_CLOSE_REASONS = {
    1000: "client",
    1001: "going_away",
    1002: "protocol_error",
    1005: "client",
    1006: "dropped",
    1007: "protocol_error",
    1009: "too_big",
    CLOSE_BY_APP[0]: "app",
    CLOSE_PING_TIMEOUT[0]: "ping_timeout",
    CLOSE_TOO_SLOW[0]: "too_slow",
}


def close_reason_label(code: Optional[int]) -> str:
    return _CLOSE_REASONS.get(code if code is not None else 1006, "client")


@attr.s(slots=True)
class GatewayStats:
    """
    Counters an operator watches, read by the metrics collector at scrape
    time; counting costs an integer addition on the hot paths.
    """

    opened: int = attr.ib(default=0)
    closed: Dict[str, int] = attr.ib(factory=dict)
    refused: Dict[str, int] = attr.ib(factory=dict)
    frames_in: int = attr.ib(default=0)
    bytes_in: int = attr.ib(default=0)
    frames_out: int = attr.ib(default=0)
    bytes_out: int = attr.ib(default=0)

    def count(self, counter: Dict[str, int], label: str) -> None:
        counter[label] = counter.get(label, 0) + 1


def _unprepared(payload: bytes, binary: bool = False) -> object:
    return payload


def _shortened(secret: str) -> str:
    """
    Enough of a token to tell two apart in a debug log, not to use it.
    """
    return secret[:4] + "…" if len(secret) >= 12 else "…"


@implementer(IMembership)
class NoMembership:
    """A gateway that is the whole gateway: nobody else needs to know."""

    def joined(self, conn: Connection) -> None:
        pass

    def left(self, conn: Connection) -> None:
        pass


@implementer(IConnectionsHere)
@attr.s(eq=False)
class Gateway:
    """
    The open connections and what can be done with them.

    C{live} must be the forwarder's throttle (see L{wsgw.service.make_node}):
    a client whose events pile up is read no more until they drain.
    """

    clock: IReactorTime = attr.ib()
    forwarder: AppForwarder = attr.ib()
    live: LiveConnections = attr.ib()
    registry: Registry = attr.ib(factory=Registry)
    #: Told of every connection that joins or leaves the registry.
    membership: IMembership = attr.ib(factory=NoMembership)
    ping_timeout: float = attr.ib(default=45.0)
    #: Turns a frame's bytes into what L{IChannel.deliver} takes: each
    #: frame is encoded once for every recipient.
    prepare: Callable[[bytes, bool], object] = attr.ib(default=_unprepared)
    stats: GatewayStats = attr.ib(factory=GatewayStats)
    #: Log every connection's open and close at info level: a line each,
    #: which at thousands of handshakes a second costs more than the rest.
    log_connections: bool = attr.ib(default=False)
    #: Who is online, told of every non-public connection that opens and
    #: ends (C{--presence-events}; None: no presence events).
    online: Optional[IOnlineUsers] = attr.ib(default=None)
    #: Every listener is up (set by the service that owns the listeners).
    accepting: bool = attr.ib(default=False)
    #: Always reachable: this process is the whole of it.
    up = True

    _all_closed: List[Deferred[None]] = attr.ib(factory=list, init=False)
    _pong: Any = attr.ib(default=None, init=False)
    _shutting_down: bool = attr.ib(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._pong = self.prepare(events.PONG, False)

    # -- what the WebSocket side reports ---------------------------------

    def opened(self, conn: Connection) -> None:
        conn.last_seen = self.clock.seconds()
        conn.event_tail = events.envelope_tail(conn)
        self.registry.add(conn)
        self.membership.joined(conn)
        self.live.add(conn)
        if self.online is not None:
            self.online.opened(conn)  # its "online" goes ahead of the "open"
        self.stats.opened += 1
        if self.log_connections:
            log.info(
                "open {conn_id} user={user_name!r} public={access_public} from {remote_addr}",
                conn_id=conn.conn_id,
                user_name=conn.user_name,
                access_public=conn.access_public,
                remote_addr=conn.remote_addr,
            )
            log.debug("token of {conn_id}: {token}", conn_id=conn.conn_id, token=_shortened(conn.token))
        self._forward(conn, "open", events.EMPTY_OBJECT, events.open_extra(conn))
        if self._shutting_down:  # its handshake was already under way
            self.close_connection(conn, *CLOSE_GOING_AWAY)

    def heard_from(self, conn: Connection) -> None:
        """The client sent something that is not a message (a ping frame)."""
        conn.last_seen = self.clock.seconds()

    def received(self, conn: Connection, payload: bytes, is_binary: bool) -> None:
        conn.last_seen = self.clock.seconds()
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(payload)
        if conn.ended:
            return
        is_ping, data, extra = events.classify_message(payload, is_binary)
        if is_ping:
            channel(conn).deliver(self._pong)
            stats.frames_out += 1
            stats.bytes_out += len(events.PONG)
            return
        self._forward(conn, "message", data, extra)

    def closed(self, conn: Connection, code: Optional[int] = None, reason: str = "") -> None:
        """
        The connection has ended, for whatever reason; its C{close} event
        is queued behind its earlier events, exactly once.
        """
        if conn.ended or not self.live.holds(conn):
            return
        self._unregister(conn)
        self._forward(conn, "close", events.EMPTY_OBJECT, events.close_extra(code, reason))
        if self.online is not None:
            self.online.ended(conn)  # any "offline" goes behind the "close"
        conn.ended = True
        conn.channel = None
        self.live.discard(conn)
        self.stats.count(self.stats.closed, close_reason_label(code))
        if self.log_connections:
            log.info("close {conn_id} code={code} reason={reason!r}", conn_id=conn.conn_id, code=code, reason=reason)
        if not len(self.live):
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    # -- what the app asks for (IConnections) -------------------------------

    def send(self, payload: bytes, targets: Targets, binary: bool = False) -> Deferred[Reach]:
        return succeed(Reach(self.send_here(payload, targets, binary)))

    def close(self, targets: Targets) -> Deferred[Reach]:
        return succeed(Reach(self.close_here(targets)))

    def listing(self) -> Deferred[Listing]:
        return succeed(Listing(self.registry.listing()))

    def send_here(
        self,
        payload: bytes,
        targets: Targets,
        binary: bool = False,
        first: Optional[IAnswerFirst] = None,
    ) -> int:
        """
        Send C{payload} as one frame to every matching connection of this
        process without waiting on any of them; returns how many matched.
        With C{first}, the request asking, frames to more than one
        connection are written once it is answered; a single frame is
        written at once, as soon either way.
        """
        matched = self.registry.select(targets)
        if matched:
            frame = self.prepare(payload, binary)
            if first is None or len(matched) == 1:
                self._deliver(matched, frame, len(payload))
            else:
                first.after_answer(partial(self._deliver, matched, frame, len(payload)))
        return len(matched)

    def _deliver(self, matched: List[Connection], frame: object, size: int) -> None:
        for conn in matched:  # the registry holds open connections only
            try:
                conn.channel.deliver(frame)  # type: ignore[union-attr]
            except Exception:  # a bug for one connection must not cost the others their frame
                log.failure("sending to {conn_id} failed", conn_id=conn.conn_id)
        self.stats.frames_out += len(matched)
        self.stats.bytes_out += size * len(matched)

    def close_here(self, targets: Targets) -> int:
        """
        Close every matching connection of this process; each produces a
        C{close} event.
        """
        matched = self.registry.select(targets)
        for conn in matched:
            self.close_connection(conn, *CLOSE_BY_APP)
        return len(matched)

    # -- the gateway's own decisions -----------------------------------------

    def close_connection(self, conn: Connection, code: int, reason: str) -> None:
        """
        Start closing C{conn}: it leaves the indexes at once (no more sends
        reach it) and its C{close} event follows when the socket is gone.
        """
        if conn.closing or conn.ended:
            return
        self.forget(conn)
        channel(conn).close_with(code, reason)

    def forget(self, conn: Connection) -> None:
        """
        Take C{conn} out of the indexes because it is being closed: no send,
        close or list sees it any more.  Its C{close} event still follows.
        """
        conn.closing = True
        self._unregister(conn)

    def ping_all(self) -> int:
        """
        Send every open connection a WebSocket ping, for clients that send
        no heartbeat of their own: their pongs keep them alive, and one
        that does not answer is closed by L{expire_silent} in time.
        """
        conns = list(self.registry)
        for conn in conns:
            channel(conn).ping()
        return len(conns)

    def expire_silent(self) -> int:
        """
        Close connections that sent nothing for longer than the ping
        timeout.  A connection the gateway itself paused (its app backlog
        is full) is not held to account meanwhile.
        """
        deadline = self.clock.seconds() - self.ping_timeout
        expired = [
            conn
            for conn in self.registry
            if conn.last_seen < deadline and not self.forwarder.is_throttled(conn.conn_id)
        ]
        for conn in expired:
            log.info("ping timeout {conn_id}", conn_id=conn.conn_id)
            self.close_connection(conn, *CLOSE_PING_TIMEOUT)
        return len(expired)

    def shut_down(self, timeout: float) -> Deferred[None]:
        """
        Close every connection with 1001 Going Away and wait, at most
        C{timeout} seconds, until their C{close} events reached the app.
        """
        self._shutting_down = True
        if self.online is not None:
            self.online.shutting_down()
        log.info("shutting down: closing {count} connection(s)", count=len(self.live))
        for conn in self.live.snapshot():
            try:
                self.close_connection(conn, *CLOSE_GOING_AWAY)
            except Exception:
                log.failure("could not close {conn_id}", conn_id=conn.conn_id)
        done: Deferred[None] = Deferred()
        timer = self.clock.callLater(timeout, self._drain_timed_out, done)

        def all_closed(_: object) -> Deferred[None]:
            return self.forwarder.drained()

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        self._when_all_closed().addCallback(all_closed).addCallback(finished)
        return done

    def _drain_timed_out(self, done: Deferred[None]) -> None:
        log.warn(
            "shutdown: {open} connection(s) still open, events of {backlog} not delivered",
            open=len(self.live),
            backlog=len(self.forwarder),
        )
        done.callback(None)

    def _when_all_closed(self) -> Deferred[None]:
        if not len(self.live):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d

    # -- internals -------------------------------------------------------------

    def _unregister(self, conn: Connection) -> None:
        if self.registry.remove(conn):
            self.membership.left(conn)

    def _forward(self, conn: Connection, action: str, data: bytes, extra: bytes) -> None:
        if not self.forwarder.enabled:
            return
        seq = conn.next_seq
        conn.next_seq = seq + 1
        body = events.encode_event(action.encode("ascii"), data, conn.event_tail, extra)
        self.forwarder.enqueue(events.Event(conn.conn_id, seq, action, body, conn.cookie, conn.remote_addr))


def channel(conn: Connection) -> IChannel:
    """
    The channel of a connection that has not ended (the registry and the
    live table hold only those).
    """
    assert conn.channel is not None, f"{conn.conn_id} has ended"
    return conn.channel
