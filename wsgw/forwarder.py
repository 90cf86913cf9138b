"""
Delivery of lifecycle events to the app.

Each connection has an L{EventStream}: its events wait there and go to the
app one at a time, in order, so the app sees C{open}, the messages, then
C{close}.  Different connections proceed in parallel, up to
C{max_in_flight} requests at once.  A failed attempt that may succeed later
(connection refused or reset, time-out, 5xx, 429) is retried with capped
exponential back-off and jitter until C{retry_window} has passed since the
event's first attempt; only then is the event given up, counted and logged.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


class AppRejected(Exception):
    """
    The app answered in a way that retrying will not change (a 4xx other
    than 408 and 429): the event is given up at once.
    """


class AppUnavailable(Exception):
    """
    The app answered with a status worth retrying (5xx, 408, 429).
    """


#: C{(body, headers)} of one event POST.
Event = Tuple[bytes, Dict[bytes, bytes]]


@attr.s(slots=True, frozen=True)
class Backoff:
    """
    Delays between attempts: exponential from C{first}, capped at C{cap},
    with full jitter so that many connections retrying after one outage do
    not hit the app in lock-step.
    """

    first: float = attr.ib(default=0.1)
    cap: float = attr.ib(default=5.0)
    rng: Callable[[], float] = attr.ib(default=random.random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.first * (2 ** min(attempt, 30)))
        return ceiling / 2 + self.rng() * ceiling / 2


#: Upper bounds (seconds) of the app-latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attr.s(slots=True)
class ForwardStats:
    """
    Counters an operator watches (read by the metrics collector at scrape
    time, so counting costs an integer addition).
    """

    delivered: int = attr.ib(default=0)
    retried: int = attr.ib(default=0)
    dropped: int = attr.ib(default=0)
    #: Attempts per latency bucket (the last counts those over every bound).
    latency_counts: list = attr.ib(factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = attr.ib(default=0.0)

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[index] += 1
                return
        self.latency_counts[-1] += 1


@attr.s(slots=True, eq=False)
class EventStream:
    """
    The events of one connection that have not reached the app yet.  It
    exists only while it holds events, so idle connections cost nothing here.
    """

    conn_id: str = attr.ib()
    pending: Deque[Event] = attr.ib(factory=deque)
    #: Bytes of the bodies in C{pending}.
    size: int = attr.ib(default=0)
    #: When the head event was first attempted, and how often it failed.
    first_try: Optional[float] = attr.ib(default=None)
    failures: int = attr.ib(default=0)
    #: When the attempt in flight began.
    attempt_started: float = attr.ib(default=0.0)
    #: The gateway stopped reading from the client because of this backlog.
    throttled: bool = attr.ib(default=False)


@attr.s(eq=False)
class AppForwarder:
    """
    Posts events to the app with per-connection order and bounded
    parallelism.

    C{post(body, headers)} performs one attempt and returns a L{Deferred}
    that fires when the app accepted the event, or fails: with
    L{AppRejected} for an answer that retrying cannot change, any other
    failure for one worth retrying.

    C{throttle(conn_id, paused)} is told when a connection's backlog
    reaches C{max_backlog} events or C{max_backlog_bytes} (C{paused=True})
    and when it has fallen to half of both again (C{paused=False}), so the
    caller can stop reading from that client meanwhile.
    """

    clock: IReactorTime = attr.ib()
    post: Optional[Callable[[bytes, Dict[bytes, bytes]], Deferred]] = attr.ib()
    max_in_flight: int = attr.ib(default=64)
    max_backlog: int = attr.ib(default=1000)
    max_backlog_bytes: int = attr.ib(default=4 * 1024 * 1024)
    retry_window: float = attr.ib(default=60.0)
    backoff: Backoff = attr.ib(factory=Backoff)
    throttle: Callable[[str, bool], None] = attr.ib(default=lambda conn_id, paused: None)
    stats: ForwardStats = attr.ib(factory=ForwardStats)

    #: What the last answer said of the app: "unknown", "up" or "down".
    app_state: str = attr.ib(default="unknown", init=False)
    _streams: Dict[str, EventStream] = attr.ib(factory=dict, init=False)
    _ready: Deque[EventStream] = attr.ib(factory=deque, init=False)
    _in_flight: int = attr.ib(default=0, init=False)
    _drain_waiters: list = attr.ib(factory=list, init=False)

    @property
    def enabled(self) -> bool:
        return self.post is not None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def __len__(self) -> int:
        """
        How many connections have events not yet delivered.
        """
        return len(self._streams)

    def backlog_total(self) -> int:
        """Events waiting for the app, all connections together."""
        return sum(len(stream.pending) for stream in self._streams.values())

    def is_throttled(self, conn_id: str) -> bool:
        stream = self._streams.get(conn_id)
        return stream is not None and stream.throttled

    def enqueue(self, conn_id: str, event: Event) -> None:
        """
        Queue the next event of C{conn_id} behind its earlier ones.
        """
        if self.post is None:
            return
        stream = self._streams.get(conn_id)
        idle = stream is None
        if idle:
            stream = self._streams[conn_id] = EventStream(conn_id)
        stream.pending.append(event)
        stream.size += len(event[0])
        if not stream.throttled and (len(stream.pending) >= self.max_backlog or stream.size >= self.max_backlog_bytes):
            stream.throttled = True
            log.info(
                "app backlog of {conn_id} reached {backlog} events; pausing the client",
                conn_id=conn_id,
                backlog=len(stream.pending),
            )
            self.throttle(conn_id, True)
        if idle:
            self._ready.append(stream)
            self._pump()

    def _pump(self) -> None:
        while self._ready and self._in_flight < self.max_in_flight:
            stream = self._ready.popleft()
            self._in_flight += 1
            self._attempt(stream)

    def _attempt(self, stream: EventStream) -> None:
        stream.attempt_started = self.clock.seconds()
        if stream.first_try is None:
            stream.first_try = stream.attempt_started
        body, headers = stream.pending[0]
        try:
            d = self.post(body, headers)
        except Exception as e:  # a bug in post must not wedge the stream
            d = Deferred()
            d.errback(e)
        d.addCallbacks(self._delivered, self._failed, callbackArgs=(stream,), errbackArgs=(stream,))

    def _delivered(self, _ignored, stream: EventStream) -> None:
        self.stats.delivered += 1
        self.stats.observe(self.clock.seconds() - stream.attempt_started)
        self.app_state = "up"
        self._finish_head(stream)

    def _failed(self, failure, stream: EventStream) -> None:
        self.stats.observe(self.clock.seconds() - stream.attempt_started)
        reason = failure.getErrorMessage() or failure.type.__name__
        elapsed = self.clock.seconds() - stream.first_try
        stream.failures += 1
        permanent = failure.check(AppRejected) is not None
        self.app_state = "up" if permanent else "down"
        if permanent or elapsed >= self.retry_window:
            self.stats.dropped += 1
            log.warn(
                "gave up an event of {conn_id} after {attempts} attempt(s): {reason}",
                conn_id=stream.conn_id,
                attempts=stream.failures,
                reason=reason,
            )
            self._finish_head(stream)
            return
        self.stats.retried += 1
        delay = min(self.backoff.delay(stream.failures - 1), max(0.0, self.retry_window - elapsed))
        log.info(
            "app unavailable for {conn_id} ({reason}); retrying in {delay:.2f}s",
            conn_id=stream.conn_id,
            reason=reason,
            delay=delay,
        )
        # Give the slot back while waiting: other connections go on.
        self._in_flight -= 1
        self.clock.callLater(delay, self._retry, stream)
        self._pump()

    def _retry(self, stream: EventStream) -> None:
        self._ready.append(stream)
        self._pump()

    def _finish_head(self, stream: EventStream) -> None:
        body, _headers = stream.pending.popleft()
        stream.size -= len(body)
        stream.first_try = None
        stream.failures = 0
        self._in_flight -= 1
        if (
            stream.throttled
            and len(stream.pending) <= self.max_backlog // 2
            and stream.size <= self.max_backlog_bytes // 2
        ):
            stream.throttled = False
            self.throttle(stream.conn_id, False)
        if stream.pending:
            self._ready.append(stream)
        else:
            del self._streams[stream.conn_id]
        self._pump()
        if not self._streams:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def drained(self) -> Deferred:
        """
        A L{Deferred} that fires once every queued event has been delivered
        or given up.
        """
        if not self._streams:
            return succeed(None)
        d = Deferred()
        self._drain_waiters.append(d)
        return d
