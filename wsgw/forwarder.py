"""
Delivery of lifecycle events to the app.

Each connection has an L{EventStream}: its events wait there and go to the
app in order, so the app sees C{open}, the messages, then C{close}, and a
connection never has two requests in flight.  Different connections
proceed in parallel, up to C{max_in_flight} requests at once.

A request carries one event, or with C{batch} above 1 up to that many, of
any connections, in a JSON array: a batch forms from what waits while the
earlier requests are in flight (no timer: under light traffic each event
goes at once, alone).

A failed attempt that may succeed later (connection refused or reset,
time-out, 5xx, 429) is retried, the same events together, with capped
exponential back-off and jitter until C{retry_window} has passed since
their first attempt; only then are they given up, counted and logged.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .events import Event
from .interfaces import IEventQueue, IEventSink, IReadThrottle, IReplies

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
        ceiling: float = min(self.cap, self.first * (2 ** min(attempt, 30)))
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
    #: Requests that carried more than one event, and the events in them.
    batches: int = attr.ib(default=0)
    batched_events: int = attr.ib(default=0)
    #: Attempts per latency bucket (the last counts those over every bound).
    latency_counts: List[int] = attr.ib(factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = attr.ib(default=0.0)

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[index] += 1
                return
        self.latency_counts[-1] += 1


@attr.s(slots=True)
class AppHealth:
    """
    Whether the app is reachable, as a sustained condition rather than the
    verdict of the last attempt: one 503, one slow answer or one stale
    keep-alive is retried and changes nothing.  The app is I{down} once
    attempts have failed without a single success in between for at least
    C{down_after} seconds (the first failure and the latest are that far
    apart); any answer it gives, even one refusing an event, is a success.
    """

    down_after: float = attr.ib(default=10.0)
    #: When the app last answered; None before its first answer.
    last_success: Optional[float] = attr.ib(default=None)
    #: The first and the latest failure since the last success.
    failing_since: Optional[float] = attr.ib(default=None)
    last_failure: Optional[float] = attr.ib(default=None)

    def succeeded(self, now: float) -> None:
        self.last_success = now
        self.failing_since = self.last_failure = None

    def failed(self, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
        self.last_failure = now

    @property
    def state(self) -> str:
        """C{unknown}, C{up}, C{failing} (not for long enough to count) or C{down}."""
        if self.failing_since is not None and self.last_failure is not None:
            if self.last_failure - self.failing_since >= self.down_after:
                return "down"
            return "failing"
        return "unknown" if self.last_success is None else "up"


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
    #: The gateway stopped reading from the client because of this backlog.
    throttled: bool = attr.ib(default=False)
    #: Its first event is not known yet (L{AppForwarder.hold}): nothing goes.
    held: bool = attr.ib(default=False)
    #: Its first events are in a request (or waiting to be tried again).
    busy: bool = attr.ib(default=False)


@attr.s(slots=True, eq=False)
class _Request:
    """
    Events on their way in one request, the first C{count} of each of
    their streams, and how trying to deliver them has gone.
    """

    parts: List[Tuple[EventStream, int]] = attr.ib(factory=list)
    events: List[Event] = attr.ib(factory=list)
    #: When these events were first attempted, and how often that failed.
    first_try: Optional[float] = attr.ib(default=None)
    failures: int = attr.ib(default=0)
    #: When the attempt in flight began.
    attempt_started: float = attr.ib(default=0.0)
    #: It carries fewer events than a batch may (never, one event per request).
    partial: bool = attr.ib(default=False)


@implementer(IReadThrottle, IReplies)
class NoThrottle:
    """For a forwarder whose clients nobody can pause or answer (tests, tools)."""

    def backlog_full(self, conn_id: str) -> None:
        pass

    def backlog_eased(self, conn_id: str) -> None:
        pass

    def reply(self, event: Event, body: bytes) -> None:
        pass


@implementer(IEventQueue)
@attr.s(eq=False)
class AppForwarder:
    """
    Posts events to the app with per-connection order and bounded
    parallelism.

    C{sink} (an L{IEventSink}) makes one attempt per call; L{None} means
    no app is configured and nothing is forwarded.

    C{throttle} is told when a connection's backlog reaches C{max_backlog}
    events or C{max_backlog_bytes} and when it has fallen to half of both
    again, so that reading from that client stops meanwhile.  C{replies}
    takes what the app answers to an event for its connection (one event
    per request only).
    """

    clock: IReactorTime = attr.ib()
    sink: Optional[IEventSink] = attr.ib()
    throttle: IReadThrottle = attr.ib(factory=NoThrottle)
    replies: IReplies = attr.ib(factory=NoThrottle)
    max_in_flight: int = attr.ib(default=64)
    max_backlog: int = attr.ib(default=1000)
    max_backlog_bytes: int = attr.ib(default=4 * 1024 * 1024)
    retry_window: float = attr.ib(default=60.0)
    #: Events one request may carry; 1 posts each event alone.
    batch: int = attr.ib(default=1)
    backoff: Backoff = attr.ib(factory=Backoff)
    stats: ForwardStats = attr.ib(factory=ForwardStats)
    health: AppHealth = attr.ib(factory=AppHealth)

    _streams: Dict[str, EventStream] = attr.ib(factory=dict, init=False)
    #: Streams with events and no request in flight, in the order they got ready.
    _ready: Deque[EventStream] = attr.ib(factory=deque, init=False)
    #: Requests whose back-off has passed, waiting for a free slot.
    _retries: Deque[_Request] = attr.ib(factory=deque, init=False)
    _in_flight: int = attr.ib(default=0, init=False)
    #: Events of the streams in C{_ready}: a batch's worth can go at once.
    _ready_events: int = attr.ib(default=0, init=False)
    #: Attempts in flight with fewer events than a batch may carry.
    _partials: int = attr.ib(default=0, init=False)
    _drain_waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)

    @property
    def enabled(self) -> bool:
        return self.sink is not None

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

    def enqueue(self, event: Event) -> None:
        """
        Queue C{event} behind the earlier events of its connection.
        """
        if self.sink is None:
            return
        conn_id = event.conn_id
        stream = self._streams.get(conn_id)
        idle = stream is None
        if stream is None:
            stream = self._streams[conn_id] = EventStream(conn_id)
        stream.pending.append(event)
        stream.size += len(event.body)
        if not (stream.busy or stream.held):  # the stream is ready, or is about to be
            self._ready_events += 1
        if not stream.throttled and (len(stream.pending) >= self.max_backlog or stream.size >= self.max_backlog_bytes):
            stream.throttled = True
            log.info(
                "app backlog of {conn_id} reached {backlog} events; pausing the client",
                conn_id=conn_id,
                backlog=len(stream.pending),
            )
            self.throttle.backlog_full(conn_id)
        if idle:
            self._ready.append(stream)
            self._pump()
        elif self._ready_events == self.batch:  # a batch's worth now waits
            self._pump()

    def hold(self, stream: str) -> bool:
        """
        Hold the new stream C{stream} until its first event is known (a
        cluster asks Redis whether a connection's user just came online,
        and that C{online} must go ahead of the connection's C{open}).
        """
        if self.sink is None or stream in self._streams:
            return False
        self._streams[stream] = EventStream(stream, held=True)
        return True

    def release(self, stream: str, first: Optional[Event]) -> None:
        held = self._streams.get(stream)
        if held is None or not held.held:
            if first is not None:
                self.enqueue(first)
            return
        held.held = False
        if first is not None:
            held.pending.appendleft(first)
            held.size += len(first.body)
        if held.pending:
            self._ready.append(held)
            self._ready_events += len(held.pending)
            self._pump()
        else:
            del self._streams[stream]
            self._check_drained()

    def _pump(self) -> None:
        """
        Start what may start.  A request that would carry fewer events
        than a batch may starts only while no other such request is in
        flight: under light traffic each event goes at once, and under load
        events wait for the request before them and go together, with no
        timer.  (With one event per request every request is full.)
        """
        while self._in_flight < self.max_in_flight:
            if self._retries:
                request = self._retries.popleft()
            elif self._ready and (self._ready_events >= self.batch or not self._partials):
                request = self._next_request()
            else:
                return
            self._in_flight += 1
            self._attempt(request)

    def _next_request(self) -> _Request:
        """
        The next request: the head event of the first ready stream, or in
        batches as many waiting events as fit, stream by stream in order.
        """
        if self.batch == 1:
            stream = self._ready.popleft()
            stream.busy = True
            self._ready_events -= len(stream.pending)
            return _Request([(stream, 1)], [stream.pending[0]])
        request = _Request()
        room = self.batch
        while room and self._ready:
            stream = self._ready.popleft()
            stream.busy = True
            waiting = len(stream.pending)
            self._ready_events -= waiting  # the rest waits for this request
            count = min(room, waiting)
            request.parts.append((stream, count))
            for index in range(count):
                request.events.append(stream.pending[index])
            room -= count
        request.partial = room > 0
        return request

    def _attempt(self, request: _Request) -> None:
        if request.partial:
            self._partials += 1
        request.attempt_started = self.clock.seconds()
        if request.first_try is None:
            request.first_try = request.attempt_started
        assert self.sink is not None
        d: Deferred[Any]
        try:
            d = self.sink.post_batch(request.events) if self.batch > 1 else self.sink.post(request.events[0])
        except Exception:  # a bug in the sink must not wedge the streams
            d = fail()
        d.addCallbacks(self._delivered, self._failed, callbackArgs=(request,), errbackArgs=(request,))

    def _delivered(self, reply: Optional[bytes], request: _Request) -> None:
        if request.partial:
            self._partials -= 1
        now = self.clock.seconds()
        events = len(request.events)
        self.stats.delivered += events
        if self.batch > 1:
            self.stats.batches += 1
            self.stats.batched_events += events
        self.stats.observe(now - request.attempt_started)
        self.health.succeeded(now)
        if reply is not None and self.batch == 1:
            self.replies.reply(request.events[0], reply)
        self._finish(request)

    def _failed(self, failure: Failure, request: _Request) -> None:
        if request.partial:
            self._partials -= 1
        now = self.clock.seconds()
        self.stats.observe(now - request.attempt_started)
        reason = failure.getErrorMessage() or (failure.type.__name__ if failure.type is not None else "")
        assert request.first_try is not None
        elapsed = now - request.first_try
        request.failures += 1
        permanent = failure.check(AppRejected) is not None
        if permanent:
            self.health.succeeded(now)  # it answered: it is up
        else:
            self.health.failed(now)
        first = request.events[0]
        if permanent or elapsed >= self.retry_window:
            self.stats.dropped += len(request.events)
            log.warn(
                "gave up {count} event(s) of {conn_id} after {attempts} attempt(s): {reason}",
                count=len(request.events),
                conn_id=first.conn_id if len(request.parts) == 1 else f"{len(request.parts)} connections",
                attempts=request.failures,
                reason=reason,
            )
            self._finish(request)
            return
        self.stats.retried += 1
        delay = min(self.backoff.delay(request.failures - 1), max(0.0, self.retry_window - elapsed))
        log.info(
            "app unavailable for {conn_id} ({reason}); retrying in {delay:.2f}s",
            conn_id=first.conn_id if len(request.parts) == 1 else f"{len(request.parts)} connections",
            reason=reason,
            delay=delay,
        )
        # Give the slot back while waiting: other connections go on.
        self._in_flight -= 1
        self.clock.callLater(delay, self._retry, request)
        self._pump()

    def _retry(self, request: _Request) -> None:
        self._retries.append(request)
        self._pump()

    def _finish(self, request: _Request) -> None:
        """The request's events are delivered or given up: their streams go on."""
        self._in_flight -= 1
        for stream, count in request.parts:
            for _ in range(count):
                stream.size -= len(stream.pending.popleft().body)
            if (
                stream.throttled
                and len(stream.pending) <= self.max_backlog // 2
                and stream.size <= self.max_backlog_bytes // 2
            ):
                stream.throttled = False
                self.throttle.backlog_eased(stream.conn_id)
            stream.busy = False
            if stream.pending:
                self._ready.append(stream)
                self._ready_events += len(stream.pending)
            else:
                del self._streams[stream.conn_id]
        self._pump()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._streams:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def drained(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once every queued event has been delivered
        or given up.
        """
        if not self._streams:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d
