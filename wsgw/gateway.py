"""
The gateway's domain: connections come and go, their events go to the app,
and the app's C{send}/C{close}/C{list} act on them.

Nothing here knows about sockets or HTTP; the WebSocket protocol calls in
with what happened, and a connection's C{channel} carries frames out:

  - C{channel.deliver(frame)}: send a prepared text frame;
  - C{channel.close_with(code, reason)}: start a closing handshake;
  - C{channel.pause_reading()} / C{channel.resume_reading()}.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import events
from .forwarder import AppForwarder
from .identity import shortened
from .registry import AccessType, Connection, Registry

log = Logger()

#: Close codes the gateway sends (documented in the README).
CLOSE_BY_APP = (4000, "closed by app")
CLOSE_PING_TIMEOUT = (4001, "ping timeout")
CLOSE_GOING_AWAY = (1001, "going away")
#: Not sent (the client is not reading): reported to the app in the close event.
CLOSE_TOO_SLOW = (4002, "client too slow")

_JSON_HEADERS = [b"application/json"]

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


@attr.s(eq=False)
class Gateway:
    """
    The open connections and what can be done with them.
    """

    clock: IReactorTime = attr.ib()
    forwarder: AppForwarder = attr.ib()
    ping_timeout: float = attr.ib(default=45.0)
    #: Turns a frame's bytes into what C{channel.deliver} takes; the
    #: WebSocket factory encodes each frame once for every recipient.
    prepare: Callable[[bytes], Any] = attr.ib(default=lambda payload: payload)
    registry: Registry = attr.ib(factory=Registry)
    #: The WebSocket factory whose protocols report here, when there is one.
    factory: Any = attr.ib(default=None)
    stats: GatewayStats = attr.ib(factory=GatewayStats)
    #: Every listener is up (set by the service that owns the listeners).
    accepting: bool = attr.ib(default=False)
    #: The L{wsgw.cluster.Cluster} this gateway is a node of, if any: it is
    #: told of every connection that joins or leaves the registry.
    cluster: Any = attr.ib(default=None)

    #: Connections open or closing whose C{close} event is not queued yet.
    _live: dict = attr.ib(factory=dict, init=False)
    _all_closed: List[Deferred] = attr.ib(factory=list, init=False)
    _pong: Any = attr.ib(default=None, init=False)
    _shutting_down: bool = attr.ib(default=False, init=False)

    def __attrs_post_init__(self):
        self.forwarder.throttle = self._throttle
        self._pong = self.prepare(events.PONG)

    # -- what the WebSocket side reports ---------------------------------

    def opened(self, conn: Connection) -> None:
        conn.last_seen = self.clock.seconds()
        conn.event_tail = events.envelope_tail(conn)
        self.registry.add(conn)
        if self.cluster is not None:
            self.cluster.joined(conn)
        self._live[conn.conn_id] = conn
        self.stats.opened += 1
        log.info(
            "open {conn_id} user={user_name!r} public={access_public} from {remote_addr}",
            conn_id=conn.conn_id,
            user_name=conn.user_name,
            access_public=conn.access_public,
            remote_addr=conn.remote_addr,
        )
        log.debug("token of {conn_id}: {token}", conn_id=conn.conn_id, token=shortened(conn.token))
        self._forward(conn, b"open", events.EMPTY_OBJECT, events.open_extra(conn))
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
            conn.channel.deliver(self._pong)
            stats.frames_out += 1
            stats.bytes_out += len(events.PONG)
            return
        self._forward(conn, b"message", data, extra)

    def closed(self, conn: Connection, code: Optional[int] = None, reason: str = "") -> None:
        """
        The connection has ended, for whatever reason; its C{close} event
        is queued behind its earlier events, exactly once.
        """
        if conn.ended or self._live.get(conn.conn_id) is not conn:
            return
        self._unregister(conn)
        self._forward(conn, b"close", events.EMPTY_OBJECT, events.close_extra(code, reason))
        conn.ended = True
        conn.channel = None
        del self._live[conn.conn_id]
        self.stats.count(self.stats.closed, close_reason_label(code))
        log.info("close {conn_id} code={code} reason={reason!r}", conn_id=conn.conn_id, code=code, reason=reason)
        if not self._live:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    # -- what the app asks for ---------------------------------------------

    def send(
        self,
        payload: bytes,
        conn_ids: Sequence[str] = (),
        users: Sequence[str] = (),
        tokens: Sequence[str] = (),
        access: AccessType = AccessType.ALL,
    ) -> int:
        """
        Send the text frame C{payload} to every matching connection without
        waiting on any of them; returns how many matched.
        """
        targets = self.registry.select(conn_ids, users, tokens, access)
        if targets:
            frame = self.prepare(payload)
            for conn in targets:
                conn.channel.deliver(frame)
            self.stats.frames_out += len(targets)
            self.stats.bytes_out += len(payload) * len(targets)
        return len(targets)

    def close(
        self,
        conn_ids: Sequence[str] = (),
        users: Sequence[str] = (),
        tokens: Sequence[str] = (),
        access: AccessType = AccessType.ALL,
    ) -> int:
        """
        Close every matching connection; each produces a C{close} event.
        """
        targets = self.registry.select(conn_ids, users, tokens, access)
        for conn in targets:
            self.close_connection(conn, *CLOSE_BY_APP)
        return len(targets)

    def listing(self):
        return self.registry.listing()

    # -- the gateway's own decisions -----------------------------------------

    def close_connection(self, conn: Connection, code: int, reason: str) -> None:
        """
        Start closing C{conn}: it leaves the indexes at once (no more sends
        reach it) and its C{close} event follows when the socket is gone.
        """
        if conn.closing or conn.ended:
            return
        self.forget(conn)
        conn.channel.close_with(code, reason)

    def forget(self, conn: Connection) -> None:
        """
        Take C{conn} out of the indexes because it is being closed: no send,
        close or list sees it any more.  Its C{close} event still follows.
        """
        conn.closing = True
        self._unregister(conn)

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

    def shut_down(self, timeout: float) -> Deferred:
        """
        Close every connection with 1001 Going Away and wait, at most
        C{timeout} seconds, until their C{close} events reached the app.
        """
        self._shutting_down = True
        log.info("shutting down: closing {count} connection(s)", count=len(self._live))
        for conn in list(self._live.values()):
            try:
                self.close_connection(conn, *CLOSE_GOING_AWAY)
            except Exception:
                log.failure("could not close {conn_id}", conn_id=conn.conn_id)
        done = Deferred()
        timer = self.clock.callLater(timeout, self._drain_timed_out, done)

        def all_closed(_):
            return self.forwarder.drained()

        def finished(_):
            if timer.active():
                timer.cancel()
                done.callback(None)

        self._when_all_closed().addCallback(all_closed).addCallback(finished)
        return done

    def _drain_timed_out(self, done: Deferred) -> None:
        log.warn(
            "shutdown: {open} connection(s) still open, events of {backlog} not delivered",
            open=len(self._live),
            backlog=len(self.forwarder),
        )
        done.callback(None)

    def _when_all_closed(self) -> Deferred:
        if not self._live:
            return succeed(None)
        d = Deferred()
        self._all_closed.append(d)
        return d

    # -- internals -------------------------------------------------------------

    def _unregister(self, conn: Connection) -> None:
        if self.registry.remove(conn) and self.cluster is not None:
            self.cluster.left(conn)

    def _forward(self, conn: Connection, action: bytes, data: bytes, extra: bytes) -> None:
        if not self.forwarder.enabled:
            return
        seq = conn.next_seq
        conn.next_seq = seq + 1
        body = events.encode_event(action, data, conn.event_tail, extra)
        headers = {
            b"Content-Type": _JSON_HEADERS,
            b"X-Wsgw-Event-Id": [f"{conn.conn_id}:{seq}".encode()],
            b"X-Forwarded-For": [conn.remote_addr.encode("utf-8", "replace")],
        }
        if conn.cookie:
            headers[b"Cookie"] = [conn.cookie.encode("utf-8", "replace")]
        self.forwarder.enqueue(conn.conn_id, (body, headers))

    def _throttle(self, conn_id: str, paused: bool) -> None:
        conn = self._live.get(conn_id)
        if conn is None or conn.channel is None:
            return
        if paused:
            conn.channel.pause_reading()
        else:
            conn.last_seen = self.clock.seconds()
            conn.channel.resume_reading()
