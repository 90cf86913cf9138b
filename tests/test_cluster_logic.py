"""
The cluster engine's decisions, without Redis: what a node publishes and
writes, how it counts the other nodes' answers, and what it refuses to
believe.  (tests/test_cluster.py runs the same against a real redis-server.)
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from fakes import make_gateway, open_conn
from wsgw.cluster import Cluster, Presence
from wsgw.cluster.redislink import RedisDown
from wsgw.cluster.wire import (
    Command,
    Malformed,
    encode_command,
    encode_reply,
    parse_command,
    parse_presence,
    parse_reply,
    presence_record,
)
from wsgw.config import Config, RedisAddress, parse_redis_url
from wsgw.registry import AccessType, Registry, Targets


class FakeLink:
    """The Redis link as the cluster sees it: commands recorded, answers pending."""

    def __init__(self):
        self.up = True
        self.commands = []  # (args, Deferred)
        self.evals = []

    def command(self, *args):
        if not self.up:
            return fail(RedisDown("down"))
        d = Deferred()
        self.commands.append((args, d))
        return d

    def eval(self, script, keys, args):
        if not self.up:
            return fail(RedisDown("down"))
        d = Deferred()
        self.evals.append((keys, args, d))
        return d

    def published(self):
        return [(args[1], args[2]) for args, _ in self.commands if args[0] == "PUBLISH"]

    def answer_publish(self, receivers):
        [(args, d)] = [(a, d) for a, d in self.commands if a[0] == "PUBLISH" and not d.called]
        d.callback(receivers)
        return json.loads(args[2])


def make_node(node_id="n1", timeout=2.0):
    """A node whose link to Redis is up and whose presence is written."""
    clock = Clock()
    registry = Registry()
    presence = Presence(registry, node_id)
    gateway = make_gateway(clock, registry=registry, membership=presence)
    cluster = Cluster(gateway, presence, RedisAddress(), clock, reply_timeout=timeout, link=FakeLink())
    cluster._state(True)  # its first hash write and refresh, answered
    cluster.link.commands.clear()
    cluster.link.evals.clear()
    return clock, gateway, cluster


def results(d):
    out = []
    d.addCallback(out.append)
    return out


def test_a_send_counts_every_node_that_received_it():
    _clock, gateway, cluster = make_node()
    open_conn(gateway, "a", user="alice")
    answer = results(cluster.send(b'"hi"', Targets(users=["alice"])))
    [(channel, raw)] = cluster.link.published()
    assert channel == "wsgw:commands"
    command = parse_command(raw)
    assert (command.origin, command.op, command.targets.users, command.payload) == ("n1", "send", ("alice",), b'"hi"')
    # Three subscribers got it: this node's own (its echo counts as its
    # answer, already applied) and two others.
    cluster.link.answer_publish(3)
    cluster._message("wsgw:replies:n1", encode_reply("n2", command.request_id, 2))
    assert answer == []
    cluster._message("wsgw:commands", raw)  # the echo
    assert answer == []
    cluster._message("wsgw:replies:n1", encode_reply("n3", command.request_id, 0))
    assert [(r.matched, r.partial) for r in answer] == [(3, False)]
    assert gateway.registry.get("a").channel.frames == [b'"hi"']  # once, not again for the echo


def test_answers_before_the_publish_returns_are_counted():
    _clock, _gateway, cluster = make_node()
    answer = results(cluster.close(Targets(users=["bob"])))
    command = parse_command(cluster.link.published()[0][1])
    cluster._message("wsgw:replies:n1", encode_reply("n2", command.request_id, 1))
    cluster._message("wsgw:commands", cluster.link.published()[0][1])
    cluster.link.answer_publish(2)
    assert [(r.matched, r.partial) for r in answer] == [(1, False)]


def test_a_node_that_does_not_answer_makes_the_count_partial():
    clock, gateway, cluster = make_node(timeout=2.0)
    open_conn(gateway, "a", user="alice")
    answer = results(cluster.send(b"1", Targets(users=["alice"])))
    cluster.link.answer_publish(2)
    clock.advance(1.9)
    assert answer == []
    clock.advance(0.2)
    assert [(r.matched, r.partial) for r in answer] == [(1, True)]
    assert cluster.stats.partial == 1
    # A late answer changes nothing and is not mistaken for garbage.
    cluster._message("wsgw:commands", cluster.link.published()[0][1])
    assert cluster.stats.malformed == 0


def test_with_redis_down_a_send_reaches_this_node_and_says_partial():
    _clock, gateway, cluster = make_node()
    conn = open_conn(gateway, "a", user="alice")
    cluster.link.up = False
    answer = results(cluster.send(b"1", Targets(users=["alice"])))
    assert [(r.matched, r.partial) for r in answer] == [(1, True)]
    assert conn.channel.frames == [b"1"]


def test_a_send_to_local_conn_ids_asks_nobody():
    _clock, gateway, cluster = make_node()
    open_conn(gateway, "a")
    open_conn(gateway, "b")
    assert [(r.matched, r.partial) for r in results(cluster.send(b"1", Targets(conn_ids=["a", "b", "a"])))] == [
        (2, False)
    ]
    assert cluster.link.published() == []
    # One conn id held elsewhere: the others are asked.
    cluster.send(b"1", Targets(conn_ids=["a", "elsewhere"]))
    assert len(cluster.link.published()) == 1


def test_a_command_from_another_node_is_applied_and_answered():
    _clock, gateway, cluster = make_node("n2")
    conn = open_conn(gateway, "a", user="alice", public=True)
    open_conn(gateway, "b", user="alice")
    raw = encode_command(Command("n1", "r1", "send", Targets(users=["alice"], access=AccessType.PUBLIC), b'{"x":1}'))
    cluster._message("wsgw:commands", raw)
    assert conn.channel.frames == [b'{"x":1}']
    [(channel, reply)] = cluster.link.published()
    assert channel == "wsgw:replies:n1"
    assert parse_reply(reply) == ("n2", "r1", 1)
    cluster._message("wsgw:commands", encode_command(Command("n1", "r2", "close", Targets(conn_ids=["a"]))))
    assert conn.channel.closed_with == (4000, "closed by app")
    assert cluster.stats.applied == 2


def test_presence_follows_the_registry():
    _clock, gateway, cluster = make_node()
    conn = open_conn(gateway, "a", user="alice", token="t")
    [(args, _d), (expire, _e)] = cluster.link.commands
    assert args[:3] == ("HSET", "wsgw:conns:n1", "a")
    assert parse_presence(args[3]) == ("alice", False, conn.describe())
    # A hash the HSET created expires even if the node dies before its refresh.
    assert expire == ("PEXPIRE", "wsgw:conns:n1", 15000)
    gateway.close_connection(conn, 4000, "bye")
    assert cluster.link.commands[-1][0] == ("HDEL", "wsgw:conns:n1", "a")


def test_after_redis_was_down_the_whole_hash_is_written_again():
    _clock, gateway, cluster = make_node()
    cluster.link.up = False
    cluster._state(False)
    open_conn(gateway, "a")
    open_conn(gateway, "b")
    assert cluster.link.commands == []
    cluster.link.up = True
    cluster._state(True)
    written = [args for args, _ in cluster.link.commands]
    assert written[0] == ("DEL", "wsgw:conns:n1")
    assert written[1][:2] == ("HSET", "wsgw:conns:n1") and written[1][2::2] == ("a", "b")
    assert len(cluster.link.evals) == 1  # and marked alive


def test_a_refresh_that_finds_the_hash_gone_writes_it_again():
    _clock, gateway, cluster = make_node()
    cluster.link.up = True
    open_conn(gateway, "a")
    cluster.link.commands.clear()
    cluster.presence.refresh()
    cluster.link.evals[0][2].callback(["", 0, 2])  # Redis restarted empty
    assert [args[0] for args, _ in cluster.link.commands] == ["DEL", "HSET"]
    assert cluster.stats.nodes == 2


def test_malformed_messages_are_counted_and_logged_at_most_once_a_minute(caplog_events):
    clock, _gateway, cluster = make_node()
    for raw in ["nope", b"\xff", "[]", '{"v":1}']:
        cluster._message("wsgw:commands", raw)
    assert cluster.stats.malformed == 4
    assert len(caplog_events("malformed")) == 1
    clock.advance(61)
    cluster._message("wsgw:replies:n1", '{"v":1,"from":"x","id":"y","matched":true}')
    assert cluster.stats.malformed == 5
    assert len(caplog_events("malformed")) == 2


@pytest.fixture
def caplog_events():
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)

    def matching(word):
        return [e for e in seen if word in e.get("log_format", "")]

    yield matching
    globalLogPublisher.removeObserver(seen.append)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(json_values)
def test_anything_from_redis_is_parsed_or_refused_never_crashes(value):
    raw = json.dumps(value)
    for parse in (parse_command, parse_reply, parse_presence):
        try:
            parse(raw)
        except Malformed:
            pass


@given(st.sampled_from(["conn_ids", "users", "tokens", "access", "payload", "from", "id", "op", "v"]), json_values)
def test_a_command_with_any_field_replaced_is_valid_or_refused(field, value):
    good = json.loads(
        encode_command(Command("n1", "r", "send", Targets(conn_ids=["c"], users=["u"], tokens=["t"]), b'{"a":1}'))
    )
    good[field] = value
    try:
        command = parse_command(json.dumps(good))
    except Malformed:
        return
    targets = command.targets
    assert all(isinstance(v, str) for v in [*targets.conn_ids, *targets.users, *targets.tokens])
    assert isinstance(command.payload, bytes)
    if not command.binary:
        command.payload.decode("utf-8")  # a text frame's payload is text


def test_presence_records_round_trip():
    _clock, gateway, _cluster = make_node()
    conn = open_conn(gateway, "a", user="名前", public=True)
    conn.user_agent = "agent"
    assert parse_presence(presence_record(conn)) == ("名前", True, conn.describe())


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:7000/2", RedisAddress(port=7000, db=2)),
        ("redis://:s%40cret@redis.internal", RedisAddress(host="redis.internal", password="s@cret")),
        ("rediss://user:pw@[::1]:6380", RedisAddress(host="::1", port=6380, tls=True, username="user", password="pw")),
        ("unix:///run/redis.sock?db=3", RedisAddress(path="/run/redis.sock", db=3)),
    ],
)
def test_redis_urls(url, expected):
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://x", "scheme"),
        ("redis://", "no host"),
        ("redis://h:99999", "out of range"),
        ("redis://h/zero", "database must be a number"),
    ],
)
def test_unusable_redis_urls_are_refused_saying_why(url, message):
    with pytest.raises(ValueError, match=message):
        Config(engine="redis", redis_url=url)


def test_the_password_never_shows():
    address = parse_redis_url("redis://:hunter2@h:1/0")
    assert "hunter2" not in address.shown() and "hunter2" not in repr(address)
    assert "hunter2" not in repr(Config(engine="redis", redis_url="redis://:hunter2@h:1/0"))


def test_the_memory_engine_needs_nothing_from_redis():
    from wsgw.service import make_node as make_daemon_node

    node = make_daemon_node(Config(), reactor=Clock())
    assert node.cluster is None and node.connections is node.gateway
    Config(redis_url="not even a url")  # only checked for --engine redis
