"""
Events reach the app in order per connection, in parallel across
connections, survive transient failures, and never wedge the gateway.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from zope.interface import implementer

from fakes import FakeApp, make_gateway, open_conn
from wsgw.events import Event
from wsgw.forwarder import AppForwarder, AppRejected, AppUnavailable, Backoff
from wsgw.interfaces import IEventSink, IReadThrottle, IReplies


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
    app.pending[1][2].callback(None)  # b answers first: c takes its slot
    assert [e["conn_id"] for e, _, _ in app.pending] == ["a", "c"]


def test_a_slow_connection_does_not_hold_back_others():
    app = FakeApp()
    fwd = make(app, max_in_flight=4)
    fwd.enqueue(event("slow", 0))
    for n in range(5):
        fwd.enqueue(event("fast", n))
        next(d for e, _, d in app.pending if e["conn_id"] == "fast").callback(None)
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
    app.pending[0][2].callback(None)
    assert calls == [("a", True)]
    app.pending[0][2].callback(None)
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
    app.pending[0][2].callback(None)
    clock.advance(0.1)
    assert sorted(e["conn_id"] for e, _, _ in app.pending) == ["a", "b"]


# -- batches (--app-batch) ----------------------------------------------------


def batch_ids(batch):
    return [(e.conn_id, e.seq) for e in batch[1]]


def test_batches_form_from_what_waits_while_a_request_is_in_flight():
    app = FakeApp()
    fwd = make(app, max_in_flight=1, batch=5)
    fwd.enqueue(event("a", 0))
    assert [batch_ids(b) for b in app.batches] == [[("a", 0)]]  # light traffic: at once, alone
    for conn_id, n in [("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)]:
        fwd.enqueue(event(conn_id, n))
    assert len(app.batches) == 1  # no timer, no second request: the slot is taken
    app.batches[0][2].callback(None)
    # Connections take turns: a, just served, waits behind the others.
    assert batch_ids(app.batches[1]) == [("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)]
    app.batches[1][2].callback(None)
    assert batch_ids(app.batches[2]) == [("a", 1)]
    app.batches[2][2].callback(None)
    assert (fwd.stats.delivered, fwd.stats.batches, len(fwd)) == (7, 3, 0)


def test_a_connection_never_has_two_batches_in_flight():
    app = FakeApp()
    fwd = make(app, max_in_flight=4, batch=10)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("a", 1))  # a's stream is in flight: it waits
    for n in range(10):
        fwd.enqueue(event("b", n))  # a full batch goes beside it, slots free
    assert [batch_ids(b) for b in app.batches] == [[("a", 0)], [("b", n) for n in range(10)]]
    fwd.enqueue(event("b", 10))
    assert len(app.batches) == 2
    app.batches[0][2].callback(None)
    assert batch_ids(app.batches[2]) == [("a", 1)]


def test_under_load_events_wait_for_the_request_before_them_not_for_a_timer():
    """
    While a request that is not full is in flight, the events of other
    connections wait for its answer (free slots or not) and then go in one
    request; a batch's worth goes at once.  No timer is involved.
    """
    clock, app = Clock(), FakeApp()
    fwd = make(app, clock, max_in_flight=8, batch=3)
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("b", 0))
    fwd.enqueue(event("c", 0))
    clock.advance(60)
    assert [batch_ids(b) for b in app.batches] == [[("a", 0)]]
    app.batches[0][2].callback(None)
    assert batch_ids(app.batches[1]) == [("b", 0), ("c", 0)]
    for conn_id in "def":
        fwd.enqueue(event(conn_id, 0))
    assert batch_ids(app.batches[2]) == [("d", 0), ("e", 0), ("f", 0)]  # full: beside b and c's
    app.batches[1][2].callback(None)
    app.batches[2][2].callback(None)
    fwd.enqueue(event("g", 0))  # nothing in flight: at once, alone
    assert batch_ids(app.batches[3]) == [("g", 0)]
    app.batches[3][2].callback(None)
    assert (fwd.stats.delivered, fwd.stats.batches, len(fwd)) == (7, 4, 0)


def test_what_waited_behind_a_request_counts_towards_a_batch_once_it_is_answered():
    app = FakeApp()
    fwd = make(app, max_in_flight=4, batch=2)
    fwd.enqueue(event("a", 0))  # alone: short of a batch, in flight for the rest of the test
    for n in range(4):
        fwd.enqueue(event("b", n))
    assert [batch_ids(b) for b in app.batches] == [[("a", 0)], [("b", 0), ("b", 1)]]
    app.batches[1][2].callback(None)  # b's next two are a batch's worth: they go beside a's
    assert batch_ids(app.batches[2]) == [("b", 2), ("b", 3)]


def test_a_failed_batch_is_retried_whole_and_later_events_follow_it():
    clock, app = Clock(), FakeApp()
    fwd = make(app, clock, max_in_flight=1, batch=10)
    fwd.enqueue(event("a", 0))
    app.batches[0][2].callback(None)
    fwd.enqueue(event("a", 1))
    fwd.enqueue(event("b", 0))
    assert batch_ids(app.batches[1]) == [("a", 1)]
    fwd.enqueue(event("a", 2))
    app.batches[1][2].errback(AppUnavailable("app answered HTTP 503"))
    # Meanwhile the slot serves b, whose stream was ready.
    assert batch_ids(app.batches[2]) == [("b", 0)]
    app.batches[2][2].callback(None)
    clock.advance(1.0)
    assert batch_ids(app.batches[3]) == [("a", 1)]  # the same events, not a2
    app.batches[3][2].callback(None)
    assert batch_ids(app.batches[4]) == [("a", 2)]
    assert (fwd.stats.retried, fwd.stats.dropped) == (1, 0)


def test_a_rejected_batch_is_given_up_whole():
    app = FakeApp()
    fwd = make(app, max_in_flight=1, batch=10)
    fwd.enqueue(event("x", 0))
    fwd.enqueue(event("a", 0))
    fwd.enqueue(event("b", 0))
    app.batches[0][2].callback(None)
    app.batches[1][2].errback(AppRejected("app answered HTTP 400"))
    assert fwd.stats.dropped == 2 and len(fwd) == 0


# -- inline replies ------------------------------------------------------------


@implementer(IReplies)
class RecordedReplies:
    def __init__(self):
        self.got = []

    def reply(self, event, body):
        self.got.append((event.conn_id, event.seq, body))


def test_replies_go_back_in_the_order_of_their_events():
    app, replies = FakeApp(), RecordedReplies()
    fwd = make(app, replies=replies)
    for n in range(3):
        fwd.enqueue(event("a", n))
    app.pending[0][2].callback(b"first")
    app.pending[0][2].callback(None)  # no reply asked for
    app.pending[0][2].callback(b"third")
    assert replies.got == [("a", 0, b"first"), ("a", 2, b"third")]


def test_a_reply_reaches_its_connection_as_one_text_frame():
    clock, app = Clock(), FakeApp()
    gateway = make_gateway(clock, app, prepare=lambda payload, binary: (payload, binary))
    conn = open_conn(gateway, "a")
    app.pending[0][2].callback(b'{"welcome":true}')  # the open event's answer
    gateway.received(conn, b'"question"', False)
    app.pending[0][2].callback("answer ✓".encode())
    assert conn.channel.frames == [(b'{"welcome":true}', False), ("answer ✓".encode(), False)]
    assert gateway.live.reply_stats.sent == 2


@pytest.mark.parametrize(
    "body, counted",
    [
        (b"\xff\xfe not utf-8", "not_utf8"),
        (b"x" * 1001, "too_big"),
    ],
)
def test_a_reply_that_cannot_be_sent_is_refused_counted_and_logged(body, counted, log_lines):
    clock, app = Clock(), FakeApp()
    gateway = make_gateway(clock, app)
    gateway.live.max_reply = 1000
    conn = open_conn(gateway, "a")
    app.pending[0][2].callback(body)
    assert conn.channel.frames == []
    assert gateway.live.reply_stats.refused == {counted: 1}
    assert [e for e in log_lines if "refused the app's reply to a:0" in e]


def test_replies_to_close_events_and_empty_replies_send_nothing():
    clock, app = Clock(), FakeApp()
    gateway = make_gateway(clock, app)
    conn = open_conn(gateway, "a")
    channel = conn.channel
    app.pending[0][2].callback(b"")  # empty: nothing
    gateway.closed(conn, 1000, "")
    app.pending[0][2].callback(b"bye")  # to a close event: dropped silently
    assert channel.frames == []
    assert gateway.live.reply_stats.sent == 0 and gateway.live.reply_stats.refused == {}


def test_batches_take_no_replies():
    app, replies = FakeApp(), RecordedReplies()
    fwd = make(app, replies=replies, batch=5)
    fwd.enqueue(event("a", 0))
    app.batches[0][2].callback(b"ignored")
    assert replies.got == []


def test_a_held_stream_waits_and_its_first_event_goes_ahead_of_the_rest():
    """
    A cluster holds a new connection's stream while Redis decides whether
    its user just came online: the events queued meanwhile wait, and the
    decided event goes first.
    """
    app = FakeApp()
    fwd = make(app)
    assert fwd.hold("a")
    fwd.enqueue(event("a", 1))
    fwd.enqueue(event("a", 2))
    fwd.enqueue(event("b", 0))  # other streams are not held
    assert [e["conn_id"] for e, _, _ in app.pending] == ["b"]
    done = fwd.drained()
    app.answer_all()
    assert not done.called  # a's events still wait
    fwd.release("a", event("a", 0))
    app.answer_all()
    assert [e["data"] for e, _, _ in app.attempts if e["conn_id"] == "a"] == [0, 1, 2]
    assert done.called


def test_a_released_stream_with_nothing_queued_is_gone():
    app = FakeApp()
    fwd = make(app)
    assert fwd.hold("a")
    done = fwd.drained()
    fwd.release("a", None)
    assert len(fwd) == 0 and done.called and app.attempts == []
    fwd.release("a", event("a", 5))  # released already: just queued
    assert [e["data"] for e, _, _ in app.attempts] == [5]


def test_only_a_new_stream_is_held():
    app = FakeApp()
    fwd = make(app)
    fwd.enqueue(event("a", 0))
    assert not fwd.hold("a")
    assert not AppForwarder(clock=Clock(), sink=None).hold("x")  # nothing is forwarded at all


# -- any traffic, any answers ----------------------------------------------------------


@implementer(IEventSink)
class RecordingSink:
    """Each attempt kept with its events, in flight until the test answers it."""

    def __init__(self):
        self.attempts = []  # [events, Deferred]

    def post(self, event):
        return self.post_batch([event])

    def post_batch(self, events):
        d = Deferred()
        self.attempts.append((list(events), d))
        return d

    def in_flight(self):
        return [(events, d) for events, d in self.attempts if not d.called]


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.sampled_from("abcd")),
        st.tuples(st.sampled_from(["answer", "unavailable", "rejected"]), st.integers(0, 7)),
        st.tuples(st.just("wait"), st.sampled_from([0.1, 1.0, 5.0])),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS, batch=st.integers(1, 4), max_in_flight=st.integers(1, 3))
def test_any_traffic_keeps_order_loses_nothing_and_never_stalls(steps, batch, max_in_flight):
    clock, sink = Clock(), RecordingSink()
    fwd = make(sink, clock, max_in_flight=max_in_flight, batch=batch)
    seqs = {}
    seen = set()  # ids of attempts already checked when they started
    delivered = {}

    def first_try(events):
        return sum(1 for o, _ in sink.attempts if o == events) == 1

    def check():
        flying = sink.in_flight()
        assert len(flying) <= max_in_flight
        conns = [e.conn_id for events, _ in flying for e in {e.conn_id: e for e in events}.values()]
        assert len(conns) == len(set(conns))  # never two requests of one connection
        for events, d in sink.attempts:
            if id(d) in seen:
                continue
            seen.add(id(d))
            assert 1 <= len(events) <= batch
            if len(events) < batch and first_try(events):
                others = [o for o, od in flying if od is not d and len(o) < batch and first_try(o)]
                assert not others, "a request short of a batch went beside another"
        if not flying and not fwd._retries and not clock.getDelayedCalls():
            assert len(fwd) == 0, "events wait with nothing in flight"

    def answer(events, d):
        for e in events:
            delivered.setdefault(e.conn_id, []).append(e.seq)
        d.callback(None)

    for kind, arg in steps:
        if kind == "enqueue":
            seq = seqs.get(arg, 0)
            seqs[arg] = seq + 1
            fwd.enqueue(event(arg, seq))
        elif kind == "wait":
            clock.advance(arg)
        else:
            flying = sink.in_flight()
            if flying:
                events, d = flying[arg % len(flying)]
                if kind == "answer":
                    answer(events, d)
                else:
                    d.errback((AppUnavailable if kind == "unavailable" else AppRejected)(kind))
        check()
    while sink.in_flight() or clock.getDelayedCalls():  # everything answered in the end
        for events, d in sink.in_flight():
            answer(events, d)
        clock.advance(60)
        check()
    assert len(fwd) == 0
    for got in delivered.values():
        assert got == sorted(got) and len(got) == len(set(got))
    settled = fwd.stats.delivered + fwd.stats.dropped
    assert settled == sum(seqs.values())
