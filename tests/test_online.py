"""
Online and offline per user (--presence-events): in memory with a Clock,
and against the real daemon with a real app server and Node clients.
"""

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, open_conn
from harness import node_client, start_daemon
from wsgw.config import Config
from wsgw.forwarder import AppUnavailable, Backoff


def presence_gateway(grace=5.0):
    clock, app = Clock(), FakeApp()
    gateway = make_gateway(clock, app, presence_grace=grace, backoff=Backoff(rng=lambda: 0.0))
    return clock, app, gateway


def posted(app):
    """What the app accepted so far, answering as it goes: (action, user or conn)."""
    app.answer_all()
    return [(e["action"], e.get("conn_id", e["user_name"])) for e, _r, _d in app.attempts]


def test_online_goes_before_the_first_open_and_only_once():
    _clock, app, gateway = presence_gateway()
    open_conn(gateway, "a1", "alice")
    open_conn(gateway, "a2", "alice")
    open_conn(gateway, "p1", "alice", public=True)
    sent = posted(app)
    assert sent[0] == ("online", "alice") and sorted(sent[1:]) == [("open", "a1"), ("open", "a2"), ("open", "p1")]
    # The online event travels in a1's stream, numbered in its sequence,
    # so the open it caused is posted only once the app has it.
    a1 = [r.event_id for _e, r, _d in app.attempts if r.conn_id == "a1"]
    assert a1 == ["a1:0", "a1:1"] and app.attempts[0][1].action == "online"


def test_public_connections_never_make_a_user_online():
    clock, app, gateway = presence_gateway()
    conn = open_conn(gateway, "p1", "owner", public=True)
    gateway.closed(conn, 1000, "")
    clock.advance(10)
    assert [action for action, _ in posted(app)] == ["open", "close"]


def test_a_reconnect_within_the_grace_period_says_nothing():
    clock, app, gateway = presence_gateway(grace=5.0)
    first = open_conn(gateway, "a1", "alice")
    gateway.closed(first, 1001, "reload")
    clock.advance(4.0)
    second = open_conn(gateway, "a2", "alice")
    clock.advance(10.0)
    gateway.closed(second, 1000, "")
    clock.advance(4.9)
    posted(app)
    streams = {}
    for _e, record, _d in app.attempts:
        streams.setdefault(record.conn_id, []).append(record.action)
    assert streams == {"a1": ["online", "open", "close"], "a2": ["open", "close"]}
    clock.advance(0.2)
    assert posted(app)[-1] == ("offline", "alice")
    assert app.attempts[-1][1].conn_id == "a2"  # behind the close of the last connection
    # Strictly alternating: a new connection is online again.
    open_conn(gateway, "a3", "alice")
    assert [a for a, _ in posted(app) if a in ("online", "offline")] == ["online", "offline", "online"]


def test_offline_follows_the_last_close_even_while_that_close_is_retried():
    clock, app, gateway = presence_gateway(grace=1.0)
    conn = open_conn(gateway, "a1", "alice")
    app.answer_all()
    gateway.closed(conn, 1000, "")
    [(_e, _r, close)] = app.pending
    close.errback(AppUnavailable("app answered HTTP 503"))
    clock.advance(1.5)  # the grace period is over while the close waits for its retry
    assert [e["action"] for e, _r, _d in app.pending] == ["close"]
    app.answer_all()
    assert [e["action"] for e, _r, _d in app.attempts][-2:] == ["close", "offline"]


def test_on_shutdown_users_go_offline_without_waiting_for_the_grace_period():
    _clock, app, gateway = presence_gateway(grace=60.0)
    conn = open_conn(gateway, "a1", "alice")
    gone = open_conn(gateway, "b1", "bob")
    gateway.closed(gone, 1000, "")  # bob waits out his grace period
    done = gateway.shut_down(timeout=10)
    gateway.closed(conn, 1001, "going away")
    app.answer_all()
    assert done.called
    assert sorted(who for a, who in posted(app) if a == "offline") == ["alice", "bob"]


def test_presence_events_work_with_either_engine():
    for engine in ("memory", "redis"):
        assert Config(presence_events=True, engine=engine).presence_events


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_daemon_posts_online_and_offline_around_a_users_connections(app, tmp_path, node_ws):
    daemon = await start_daemon("--app-url", app.url, "--presence-events", "--presence-grace", "0.3", cwd=tmp_path)
    try:
        # Signed-in connections (an auth_token cookie): public ones make nobody online.
        first = await node_client(daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=t1"})
        await app.wait_for(lambda: app.counts["open"] >= 1, "the open")
        second = await node_client(daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=t2"})
        await app.wait_for(lambda: app.counts["open"] >= 2, "the second open")
        first.command(close=[1000, "bye"])
        await app.wait_for(lambda: app.counts["close"] >= 1, "the first close")
        second.command(close=[1000, "bye"])
        await app.wait_for(lambda: app.counts["offline"] >= 1, "the offline after the grace period")
        actions = [(e["action"], e["user_name"]) for e in app.events]
        assert actions == [
            ("online", "alice"),
            ("open", "alice"),
            ("open", "alice"),
            ("close", "alice"),
            ("close", "alice"),
            ("offline", "alice"),
        ]
        ids = [h["x-wsgw-event-id"] for h in app.headers]
        assert len(set(ids)) == len(ids)  # every event, presence ones too, has its own id
    finally:
        await daemon.terminate()
