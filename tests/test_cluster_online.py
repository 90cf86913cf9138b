"""
Presence events across a cluster (--presence-events on the Redis engine):
three nodes in this process, each a real node as make_node builds it, on
one real redis-server, posting to one real app.  Connections are opened
and ended on the nodes' gateways directly (the WebSocket side is tested
elsewhere; tests/test_cluster.py drives whole daemons).

What is promised, and tested here: one online and one offline per
transition of a user, whichever nodes hold its connections; the online
ahead of the open that caused it, the offline behind the last close; a
move to another node within the grace period says nothing; a node that
stops or vanishes takes its users offline (the others post it); Redis
out of reach delays events and invents none; Redis losing its data
repeats nothing.
"""

import signal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from fakes import open_conn
from harness import eventually, redis_command, start_redis
from wsgw.config import Config
from wsgw.service import make_node

pytestmark = pytest.mark.integration

GRACE = 0.5
TTL = 1.5


@pytest_twisted.async_yield_fixture
async def redis():
    server = await start_redis()
    yield server
    await server.stop()


async def start_nodes(redis, app, count=3, **options):
    nodes = []
    for i in range(count):
        config = Config(
            app_url=app.url,
            engine="redis",
            redis_url=redis.url,
            node_id=f"node{i}",
            presence_events=True,
            presence_grace=options.get("grace", GRACE),
            presence_ttl=TTL,
            cluster_timeout=1.0,
        )
        node = make_node(config, reactor)
        node.cluster.startService()
        nodes.append(node)
    for node in nodes:
        await until_linked(node)
    return nodes


async def until_linked(node):
    async def check():
        return node.cluster.up and not node.gateway.online._unsure

    await eventually(check, f"{node.config.node_id} to be linked and synced")


async def stop_nodes(nodes):
    await gatherResults([node.cluster.stopService() for node in nodes if node.cluster.running], consumeErrors=True)


def presence(app, user=None):
    """The presence events the app accepted, with their event ids."""
    return [
        (e["action"], e["user_name"], h["x-wsgw-event-id"])
        for e, h in zip(app.events, app.headers)
        if e["action"] in ("online", "offline") and (user is None or e["user_name"] == user)
    ]


def position(app, action, conn_id=None, user=None):
    for index, e in enumerate(app.events):
        matches = (conn_id is None or e.get("conn_id") == conn_id) and (user is None or e["user_name"] == user)
        if e["action"] == action and matches:
            return index
    raise AssertionError(f"no {action} of {conn_id or user} among {app.events}")


async def settled(redis, user):
    """Whether Redis holds C{user} online, and whether its grace period runs."""
    online = await redis_command(redis, "HEXISTS", "wsgw:online", user)
    going = await redis_command(redis, "ZSCORE", "wsgw:going", user)
    return bool(online), going is not None


def seen(app, action, conn_id):
    return any(e["action"] == action and e.get("conn_id") == conn_id for e in app.events)


def wait_opens(app, *conn_ids):
    return app.wait_for(lambda: all(seen(app, "open", c) for c in conn_ids), f"the opens of {conn_ids}")


@pytest_twisted.ensureDeferred
async def test_one_online_ahead_of_the_open_and_one_offline_behind_the_last_close(redis, app):
    nodes = await start_nodes(redis, app)
    try:
        conns = []
        for i, node in enumerate(nodes):
            conns.append(open_conn(node.gateway, f"alice-{i}", "alice"))
            await wait_opens(app, f"alice-{i}")
        assert [(a, u) for a, u, _ in presence(app)] == [("online", "alice")]
        assert position(app, "online", user="alice") < position(app, "open", "alice-0")
        for node, conn in zip(nodes, conns):
            node.gateway.closed(conn, 1000, "")
        await app.wait_for(lambda: len(presence(app)) == 2, "alice's offline")
        (_, _, on_id), (off, user, off_id) = presence(app)
        assert (off, user) == ("offline", "alice")
        assert position(app, "close", "alice-2") < position(app, "offline", user="alice")
        # Ids from one counter: the app can tell the later decision.
        assert on_id.startswith("presence:") and int(off_id.split(":")[1]) > int(on_id.split(":")[1])
        assert await settled(redis, "alice") == (False, False)  # nothing left to decide
        # The node of the last connection posted it.
        assert [n.gateway.online.went_offline for n in nodes] == [0, 0, 1]
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_first_connections_on_every_node_at_once_make_one_online(redis, app):
    nodes = await start_nodes(redis, app)
    try:
        for i, node in enumerate(nodes):  # in one turn of the reactor
            open_conn(node.gateway, f"bob-{i}", "bob")
        await wait_opens(app, "bob-0", "bob-1", "bob-2")
        assert [(a, u) for a, u, _ in presence(app)] == [("online", "bob")]
        assert sum(n.gateway.online.went_online for n in nodes) == 1
        assert await redis_command(redis, "HLEN", "wsgw:pu:bob") == 3
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_moving_to_another_node_within_the_grace_period_says_nothing(redis, app):
    nodes = await start_nodes(redis, app, grace=30.0)
    try:
        first = open_conn(nodes[0].gateway, "carol-0", "carol")
        await wait_opens(app, "carol-0")
        nodes[0].gateway.closed(first, 1001, "reload")
        await app.wait_for(lambda: seen(app, "close", "carol-0"), "the close")

        async def grace_running():
            return await settled(redis, "carol") == (True, True)

        await eventually(grace_running, "carol's grace period to start")
        open_conn(nodes[1].gateway, "carol-1", "carol")
        await wait_opens(app, "carol-1")
        # Back within the grace period: it no longer runs, nothing is due.
        assert await settled(redis, "carol") == (True, False)
        assert [(a, u) for a, u, _ in presence(app)] == [("online", "carol")]
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_a_node_that_stops_leaves_its_users_offline_to_the_others(redis, app):
    nodes = await start_nodes(redis, app)
    try:
        dave = open_conn(nodes[0].gateway, "dave-0", "dave")
        open_conn(nodes[1].gateway, "erin-1", "erin")
        await wait_opens(app, "dave-0", "erin-1")
        done = nodes[0].gateway.shut_down(timeout=5)
        nodes[0].gateway.closed(dave, 1001, "going away")  # the client answers the 1001
        await done
        await nodes[0].cluster.stopService()
        await app.wait_for(lambda: [a for a, _, _ in presence(app, "dave")] == ["online", "offline"], "dave offline")
        assert position(app, "close", "dave-0") < position(app, "offline", user="dave")
        assert nodes[0].gateway.online.went_offline == 0  # another node posted it
        assert sum(n.gateway.online.went_offline for n in nodes) == 1
        assert await settled(redis, "erin") == (True, False)
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_a_node_that_vanishes_takes_its_users_offline_within_the_ttl_and_the_grace(redis, app):
    nodes = await start_nodes(redis, app)
    try:
        open_conn(nodes[0].gateway, "fay-0", "fay")
        open_conn(nodes[0].gateway, "gus-0", "gus")
        open_conn(nodes[2].gateway, "gus-2", "gus")  # gus is also elsewhere
        await wait_opens(app, "fay-0", "gus-0", "gus-2")
        # node0 falls silent: no more sweeps, no goodbye.
        online = nodes[0].gateway.online
        online._sweeper.stop()
        online.disconnected()
        nodes[0].cluster._refresh.stop()
        vanished = reactor.seconds()
        await app.wait_for(lambda: [a for a, _, _ in presence(app, "fay")] == ["online", "offline"], "fay offline")
        # Within a TTL plus the grace period and a sweep (0.5 s here), with
        # a second for a loaded machine.
        assert reactor.seconds() - vanished <= TTL + GRACE + 0.5 + 1.0
        assert await settled(redis, "gus") == (True, False)
        assert [a for a, _, _ in presence(app, "gus")] == ["online"]
    finally:
        await nodes[0].cluster.link.stopService()
        await stop_nodes(nodes[1:])


@pytest_twisted.ensureDeferred
async def test_while_redis_is_out_of_reach_nothing_is_invented_and_it_is_all_said_after(redis, app):
    nodes = await start_nodes(redis, app)
    try:
        dave = open_conn(nodes[1].gateway, "dave-1", "dave")
        open_conn(nodes[2].gateway, "erin-2", "erin")
        await wait_opens(app, "dave-1", "erin-2")
        redis.process.signalProcess("STOP")
        try:

            async def all_down():
                return not any(n.cluster.up for n in nodes)

            await eventually(all_down, "every node to see redis out of reach", seconds=15)
            open_conn(nodes[0].gateway, "hal-0", "hal")
            nodes[1].gateway.closed(dave, 1000, "")
            await wait_opens(app, "hal-0")
            await app.wait_for(lambda: seen(app, "close", "dave-1"), "dave's close")
            assert sorted((a, u) for a, u, _ in presence(app)) == [("online", "dave"), ("online", "erin")]
        finally:
            redis.process.signalProcess(signal.SIGCONT)
        await app.wait_for(
            lambda: (
                [a for a, _, _ in presence(app, "hal")] == ["online"]
                and [a for a, _, _ in presence(app, "dave")] == ["online", "offline"]
            ),
            "hal online and dave offline, late",
            seconds=20,
        )
        # The online follows the open it could not go ahead of.
        assert position(app, "open", "hal-0") < position(app, "online", user="hal")
        assert await settled(redis, "erin") == (True, False)
        assert [a for a, _, _ in presence(app, "erin")] == ["online"]
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_redis_losing_its_data_repeats_no_online(redis, app, log_lines):
    nodes = await start_nodes(redis, app)
    try:
        open_conn(nodes[0].gateway, "ivy-0", "ivy")
        await wait_opens(app, "ivy-0")
        await app.wait_for(lambda: presence(app, "ivy"), "ivy online")
        await redis_command(redis, "FLUSHALL")

        async def restored():
            return (await settled(redis, "ivy")) == (True, False)

        await eventually(restored, "ivy put back online in redis")
        assert any("redis lost the presence state" in line for line in log_lines)
        assert [a for a, _, _ in presence(app, "ivy")] == ["online"]
        assert sum(n.gateway.online.went_online for n in nodes) == 1
    finally:
        await stop_nodes(nodes)
