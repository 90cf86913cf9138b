"""
The gateway's decisions: heartbeats, closes, sends, and close events that
come exactly once and last.
"""

import json

from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, open_conn
from wsgw.events import PONG
from wsgw.gateway import CLOSE_BY_APP, CLOSE_GOING_AWAY, CLOSE_PING_TIMEOUT
from wsgw.registry import AccessType, Targets


def test_ping_is_answered_with_exact_pong_and_not_forwarded():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    conn = open_conn(gw, "a")
    app.answer_all()
    gw.received(conn, b'{"event":"ping","data":{}}', False)
    gw.received(conn, b'{"event":"ping"}', False)
    assert conn.channel.frames == [PONG, PONG]
    assert PONG == b'{"event":"pong"}'
    assert [a for _, a, _ in app.summary()] == ["open"]


def test_events_carry_cookie_and_event_id():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    conn = open_conn(gw, "a", cookie="auth_token=abc; x=1")
    app.answer_all()
    gw.received(conn, b'{"event":"ai","data":{}}', False)
    body, event, _ = app.attempts[-1]
    assert body["data"] == {"event": "ai", "data": {}}
    assert body["action"] == "message" == event.action
    assert event.cookie == "auth_token=abc; x=1"
    assert event.event_id == "a:1"
    assert app.attempts[0][1].event_id == "a:0"


def test_silent_connection_expires_with_close_frame_and_close_event():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    gw.ping_timeout = 45
    quiet = open_conn(gw, "quiet")
    chatty = open_conn(gw, "chatty")
    for _ in range(9):
        clock.advance(5)
        gw.received(chatty, b'{"event":"ping"}', False)
        gw.expire_silent()
    assert quiet.channel.closed_with is None  # 45 s: not yet past the timeout
    clock.advance(1)
    assert gw.expire_silent() == 1
    assert quiet.channel.closed_with == CLOSE_PING_TIMEOUT
    assert chatty.channel.closed_with is None
    # It leaves the indexes at once; the close event follows the socket.
    assert gw.registry.get("quiet") is None
    gw.closed(quiet, 4001, "ping timeout")
    app.answer_all()
    assert ("quiet", "close", {}) in app.summary()


def test_any_frame_counts_as_a_sign_of_life():
    clock = Clock()
    gw = make_gateway(clock)
    conn = open_conn(gw, "a")
    clock.advance(40)
    gw.received(conn, b"hello", False)
    clock.advance(40)
    assert gw.expire_silent() == 0


def test_connection_paused_by_the_gateway_is_not_expired():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app, max_backlog=3)
    conn = open_conn(gw, "a")  # open stays pending: the app is stuck
    gw.received(conn, b"1", False)
    gw.received(conn, b"2", False)
    assert conn.channel.paused
    clock.advance(100)
    assert gw.expire_silent() == 0
    app.answer_all()
    assert not conn.channel.paused
    clock.advance(44)
    assert gw.expire_silent() == 0  # resuming restarted its clock


def test_close_event_is_last_and_exactly_once_even_with_events_in_flight():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    conn = open_conn(gw, "a")
    gw.received(conn, b'{"n":1}', False)
    gw.received(conn, b'{"n":2}', False)
    gw.closed(conn, 1000, "")
    gw.closed(conn, 1006, "")  # a second report changes nothing
    gw.received(conn, b'{"n":3}', False)  # nor does a late frame
    app.answer_all()
    assert app.summary() == [
        ("a", "open", {}),
        ("a", "message", {"n": 1}),
        ("a", "message", {"n": 2}),
        ("a", "close", {}),
    ]


def test_send_counts_matches_and_delivers_one_frame_to_each():
    clock = Clock()
    gw = make_gateway(clock)
    a1 = open_conn(gw, "a1", "alice")
    a2 = open_conn(gw, "a2", "alice", public=True)
    b1 = open_conn(gw, "b1", "bob")
    assert gw.send_here(b'{"x":1}', Targets(users=["alice"])) == 2
    assert gw.send_here(b'"p"', Targets(users=["alice"], access=AccessType.PUBLIC)) == 1
    assert gw.send_here(b"null", Targets(conn_ids=["b1"])) == 1
    assert gw.send_here(b"null", Targets(conn_ids=["gone"])) == 0
    assert a1.channel.frames == [b'{"x":1}']
    assert a2.channel.frames == [b'{"x":1}', b'"p"']
    assert b1.channel.frames == [b"null"]


def test_close_by_app_sends_close_frame_and_stops_sends():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    a = open_conn(gw, "a", "alice")
    assert gw.close_here(Targets(users=["alice"])) == 1
    assert a.channel.closed_with == CLOSE_BY_APP
    assert gw.send_here(b"1", Targets(users=["alice"])) == 0
    assert gw.close_here(Targets(users=["alice"])) == 0
    assert gw.registry.listing() == []
    channel = a.channel
    gw.closed(a, 4000, "closed by app")
    app.answer_all()
    assert [x for _, x, _ in app.summary()] == ["open", "close"]
    assert channel.frames == []


def test_shutdown_closes_everyone_and_waits_for_close_events():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    a, b = open_conn(gw, "a"), open_conn(gw, "b")
    app.answer_all()
    done = gw.shut_down(timeout=10)
    assert a.channel.closed_with == CLOSE_GOING_AWAY == b.channel.closed_with
    assert not done.called
    gw.closed(a, 1001, "")
    gw.closed(b, 1001, "")
    assert not done.called  # close events still on their way
    app.answer_all()
    assert done.called
    assert [x for _, x, _ in app.summary()].count("close") == 2


def test_shutdown_gives_up_after_the_drain_timeout():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    open_conn(gw, "a")
    done = gw.shut_down(timeout=3)
    clock.advance(2.9)
    assert not done.called
    clock.advance(0.2)
    assert done.called


def test_without_app_nothing_is_forwarded_but_clients_are_served():
    clock = Clock()
    gw = make_gateway(clock, None)
    conn = open_conn(gw, "a")
    gw.received(conn, b'{"event":"ping"}', False)
    gw.received(conn, b"hi", False)
    assert conn.channel.frames == [PONG]
    assert json.loads(json.dumps(gw.registry.listing()))[0]["conns_number"] == 1


def test_connection_opening_during_shutdown_is_closed_too():
    clock, app = Clock(), FakeApp()
    gw = make_gateway(clock, app)
    done = gw.shut_down(timeout=10)
    late = open_conn(gw, "late")  # its handshake finished after the stop began
    assert late.channel.closed_with == CLOSE_GOING_AWAY
    gw.closed(late, 1001, "going away")
    app.answer_all()
    assert done.called
    assert [a for _, a, _ in app.summary()] == ["open", "close"]


def test_connections_are_logged_only_when_asked(log_lines):
    clock, app = Clock(), FakeApp()
    quiet = make_gateway(clock, app)
    conn = open_conn(quiet, "q")
    quiet.closed(conn, 1000, "")
    assert not [line for line in log_lines if line.startswith(("open q", "close q"))]
    chatty = make_gateway(clock, app)
    chatty.log_connections = True
    conn = open_conn(chatty, "c")
    chatty.closed(conn, 1000, "")
    assert [line.split(" ")[0] for line in log_lines if " c " in f" {line} "] == ["open", "close"]
