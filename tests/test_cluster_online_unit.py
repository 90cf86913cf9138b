"""
A node's side of the cluster's presence events, with a Clock and a fake
link whose scripts the test answers as Redis would (the scripts themselves
run against a real redis-server in tests/test_cluster_online.py).
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fakes import FakeApp, open_conn
from wsgw.cluster.online import _CHANGE, _SWEEP, _SYNC, ClusterOnline
from wsgw.forwarder import AppForwarder, Backoff
from wsgw.gateway import Gateway
from wsgw.registry import LiveConnections, Registry

INSTANCE = "me"


class FakeLink:
    """Records each script run; each waits until the test answers it."""

    def __init__(self):
        self.calls = []  # (script, args, Deferred)

    def eval(self, script, keys, args):
        d = Deferred()
        self.calls.append((script, list(args), d))
        return d

    def pending(self, script):
        return [(args, d) for s, args, d in self.calls if s is script and not d.called]


def make(grace=5.0):
    clock, app, registry = Clock(), FakeApp(), Registry()
    live = LiveConnections(clock, lambda payload, binary: payload)
    forwarder = AppForwarder(clock=clock, sink=app, throttle=live, replies=live, backoff=Backoff(rng=lambda: 0.0))
    online = ClusterOnline(registry, forwarder, clock, "node1", INSTANCE, grace=grace, decide_timeout=2.0)
    gateway = Gateway(clock=clock, forwarder=forwarder, live=live, registry=registry, online=online)
    link = FakeLink()
    online.connected(link)
    ((_args, sync),) = link.pending(_SYNC)
    sync.callback(["mark1"])  # nobody here yet
    link.pending(_SWEEP)[0][1].callback([])
    return clock, app, gateway, online, link


def posted(app):
    app.answer_all()
    return [(e["action"], r.conn_id, r.event_id) for e, r, _d in app.attempts]


def test_a_first_connection_waits_for_redis_and_its_online_goes_first():
    _clock, app, gateway, _online, link = make()
    open_conn(gateway, "a1", "alice")
    assert app.attempts == []  # the open waits for the decision
    ((args, d),) = link.pending(_CHANGE)
    assert args[3:] == [5000, 1, "alice"]
    d.callback(["alice", f"7 {INSTANCE}"])
    assert posted(app) == [("online", "a1", "presence:7"), ("open", "a1", "a1:0")]


def test_a_user_another_node_made_online_gets_no_second_online():
    _clock, app, gateway, _online, link = make()
    open_conn(gateway, "a1", "alice")
    link.pending(_CHANGE)[0][1].callback(["alice", "3 other-instance"])
    assert posted(app) == [("open", "a1", "a1:0")]


def test_when_redis_is_slow_to_decide_the_events_go_on_and_the_online_follows():
    clock, app, gateway, _online, link = make()
    open_conn(gateway, "a1", "alice")
    clock.advance(2.0)
    assert posted(app) == [("open", "a1", "a1:0")]
    link.pending(_CHANGE)[0][1].callback(["alice", f"9 {INSTANCE}"])
    assert posted(app)[-1] == ("online", "a1", "presence:9")


def test_an_offline_claimed_here_goes_in_the_last_connection_stream_once_and_is_confirmed():
    clock, app, gateway, online, link = make(grace=1.0)
    conn = open_conn(gateway, "a1", "alice")
    link.pending(_CHANGE)[0][1].callback(["alice", f"1 {INSTANCE}"])
    gateway.closed(conn, 1000, "")
    ((args, d),) = link.pending(_CHANGE)
    assert args[3:] == [1000, 0, "alice"]  # went, with its grace period
    d.callback([])
    clock.advance(1.05)  # the grace period ends: a sweep right away
    ((args, sweep),) = link.pending(_SWEEP)
    assert args[7:] == [1, "online", "alice", "1"]  # the online it queued is confirmed
    sweep.callback(["alice", "2"])
    assert posted(app)[-1] == ("offline", "a1", "presence:2")
    online.sweep()
    ((args, again),) = link.pending(_SWEEP)
    assert args[7:] == [1, "offline", "alice", "2"]
    again.callback(["alice", "2"])  # not confirmed yet in Redis: not posted twice
    assert [a for a, _c, _i in posted(app)].count("offline") == 1


def test_an_offline_of_a_user_with_no_connection_here_has_a_stream_of_its_own():
    _clock, app, _gateway, online, link = make()
    online.sweep()
    link.pending(_SWEEP)[0][1].callback(["zed", "4"])
    assert posted(app) == [("offline", "presence:zed", "presence:4")]


def test_what_happened_while_redis_was_away_is_said_in_one_sync():
    _clock, app, gateway, online, link = make()
    online.disconnected()
    conn = open_conn(gateway, "a1", "alice")
    open_conn(gateway, "b1", "bob")
    gateway.closed(conn, 1000, "")
    assert link.pending(_CHANGE) == []  # nothing asked while away
    assert sorted(posted(app)) == [("close", "a1", "a1:1"), ("open", "a1", "a1:0"), ("open", "b1", "b1:0")]
    online.connected(link)
    ((args, sync),) = link.pending(_SYNC)
    assert args[4:] == ["mark1", 1, "bob"]  # bob is here, alice is not: Redis works out the rest
    sync.callback(["mark1", "bob", f"5 {INSTANCE}"])
    assert posted(app)[-1] == ("online", "b1", "presence:5")


def test_a_state_redis_lost_is_said_again_with_what_was_online():
    _clock, app, gateway, online, link = make()
    open_conn(gateway, "a1", "alice")
    link.pending(_CHANGE)[0][1].callback(["alice", f"1 {INSTANCE}"])
    online.sweep()
    link.pending(_SWEEP)[0][1].callback(["lost"])
    online.sweep()
    ((args, sync),) = link.pending(_SYNC)
    # alice is named twice: as here, and as known online (put back quietly).
    assert args[4:] == ["mark1", 1, "alice", "alice"]
    sync.callback(["mark2", "alice", "8 -"])
    assert [a for a, _c, _i in posted(app)] == ["online", "open"]
