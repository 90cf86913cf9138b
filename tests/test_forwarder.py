"""
Events reach the app in order per connection, in parallel across
connections, survive transient failures, and never wedge the gateway.
"""

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from zope.interface import implementer

from fakes import FakeApp
from wsgw.events import Event
from wsgw.forwarder import AppForwarder, AppHealth, AppRejected, AppUnavailable, Backoff
from wsgw.interfaces import IEventSink, IReadThrottle


def event(conn_id, n):
    return Event(conn_id, n, "message", f'{{"conn_id":"{conn_id}","action":"message","data":{n}}}'.encode())


def make(app, clock=None, **kw):
    return AppForwarder(clock=clock or Clock(), sink=app, backoff=Backoff(rng=lambda: 0.0), **kw)


def test_one_connection_one_request_at_a_time_in_order():
    app = FakeApp()
    fwd = make(app)
    for n in range(3):
        fwd.enqueue(event("a", n))
    assert len(app.pending) == 1
    app.answer_all()
    assert [e["data"] for e, _, _ in app.attempts] == [0, 1, 2]
    assert fwd.stats.delivered == 3
    assert len(fwd) == 0


def test_connections_proceed_in_parallel_up_to_the_limit():
    app = FakeApp()
    fwd = make(app, max_in_flight=2)
    for conn_id in "abc":
        fwd.enqueue(event(conn_id, 0))
    assert [e["conn_id"] for e, _, _ in app.pending] == ["a", "b"]
    app.pending[1][2].callback(200)  # b answers first: c takes its slot
    assert [e["conn_id"] for e, _, _ in app.pending] == ["a", "c"]


def test_a_slow_connection_does_not_hold_back_others():
    app = FakeApp()
    fwd = make(app, max_in_flight=4)
    fwd.enqueue(event("slow", 0))
    for n in range(5):
        fwd.enqueue(event("fast", n))
        [d for e, _, d in app.pending if e["conn_id"] == "fast"][0].callback(200)
    assert [e["data"] for e, _, _ in app.attempts if e["conn_id"] == "fast"] == [0, 1, 2, 3, 4]
    assert len(app.pending) == 1


def test_transient_failure_is_retried_without_reordering():
    clock = Clock()
    app = FakeApp()
    fwd = make(app, clock)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("a", 1))
    app.pending[0][2].errback(ConnectionRefusedError())
    assert app.pending == []  # waiting out the back-off, event 1 not sent ahead
    clock.advance(0.05)
    assert [e["data"] for e, _, _ in app.pending] == [0]
    app.pending[0][2].errback(AppUnavailable("app answered HTTP 503"))
    clock.advance(0.1)
    app.answer_all()
    assert [e["data"] for e, _, _ in app.attempts] == [0, 0, 0, 1]
    assert fwd.stats.retried == 2
    assert fwd.stats.dropped == 0


def test_backoff_is_capped_and_jittered():
    low, high = Backoff(rng=lambda: 0.0), Backoff(rng=lambda: 0.999)
    assert low.delay(0) == 0.05
    assert high.delay(0) < 0.1
    assert low.delay(20) == 2.5
    assert high.delay(50) < 5.0


def test_rejected_event_is_given_up_at_once_and_the_next_goes_on():
    app = FakeApp()
    fwd = make(app)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("a", 1))
    app.pending[0][2].errback(AppRejected("app answered HTTP 400"))
    assert [e["data"] for e, _, _ in app.pending] == [1]
    assert fwd.stats.dropped == 1
    assert fwd.stats.retried == 0


def test_event_given_up_after_the_retry_window():
    clock = Clock()
    app = FakeApp()
    fwd = make(app, clock, retry_window=10.0)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("a", 1))
    while app.pending and app.pending[0][0]["data"] == 0:
        app.pending[0][2].errback(ConnectionRefusedError())
        clock.advance(5.0)
    assert fwd.stats.dropped == 1
    assert clock.seconds() <= 15.0
    assert [e["data"] for e, _, _ in app.pending] == [1]


def test_a_bug_in_post_does_not_wedge_the_stream():
    calls = []

    @implementer(IEventSink)
    class Broken:
        def post(self, event):
            calls.append(event)
            raise RuntimeError("boom")

    clock = Clock()
    fwd = AppForwarder(clock=clock, sink=Broken(), retry_window=1.0, backoff=Backoff(rng=lambda: 0.0))
    fwd.enqueue(event("a", 0))
    clock.advance(2.0)
    assert fwd.stats.dropped == 1
    assert len(fwd) == 0


def test_full_backlog_pauses_the_client_and_half_resumes_it():
    app = FakeApp()
    calls = []

    @implementer(IReadThrottle)
    class Recorded:
        def backlog_full(self, conn_id):
            calls.append((conn_id, True))

        def backlog_eased(self, conn_id):
            calls.append((conn_id, False))

    fwd = make(app, max_backlog=4, throttle=Recorded())
    for n in range(4):
        fwd.enqueue(event("a", n))
    assert calls == [("a", True)]
    assert fwd.is_throttled("a")
    app.pending[0][2].callback(200)
    assert calls == [("a", True)]
    app.pending[0][2].callback(200)
    assert calls == [("a", True), ("a", False)]
    assert not fwd.is_throttled("a")


def test_drained_fires_when_everything_is_delivered():
    app = FakeApp()
    fwd = make(app)
    assert fwd.drained().called
    fwd.enqueue(event("a", 0))
    d = fwd.drained()
    assert not d.called
    app.answer_all()
    assert d.called


def test_no_app_means_nothing_is_queued():
    fwd = AppForwarder(clock=Clock(), sink=None)
    fwd.enqueue(event("a", 0))
    assert len(fwd) == 0
    assert not fwd.enabled


def test_waiting_retries_do_not_hold_slots():
    """Connections whose app calls fail wait out their back-off without
    keeping others from the app."""
    clock = Clock()
    app = FakeApp()
    fwd = make(app, clock, max_in_flight=2)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("b", 0))
    fwd.enqueue(event("c", 0))
    for _, _, d in app.pending:
        d.errback(AppUnavailable("app answered HTTP 503"))
    assert [e["conn_id"] for e, _, _ in app.pending] == ["c"]
    app.pending[0][2].callback(200)
    clock.advance(0.1)
    assert sorted(e["conn_id"] for e, _, _ in app.pending) == ["a", "b"]
