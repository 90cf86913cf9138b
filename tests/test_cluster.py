"""
Several nodes as one gateway (--engine redis): a real redis-server, three
`twist wsgw` processes, one app, and clients spread over the nodes.
"""

import json
import signal

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from harness import (
    api,
    bounded,
    ctl,
    eventually,
    node_client,
    py_client,
    redis_command,
    scrape,
    start_daemon,
    start_redis,
)

PRESENCE_TTL = 2.0


async def start_node(redis, app, tmp_path, name, *extra):
    node = await start_daemon(
        "--app-url",
        app.url,
        "--engine",
        "redis",
        "--redis-url",
        redis.url,
        "--node-id",
        name,
        # A generous wait for the other nodes' counts: a loaded CI machine
        # must not turn a complete answer into a partial one.
        "--presence-ttl",
        str(PRESENCE_TTL),
        "--cluster-timeout",
        "5",
        *extra,
        cwd=tmp_path,
    )
    node.name = name
    await until_redis(node, "up")
    return node


async def until_redis(node, state):
    async def check():
        response = await treq.get(node.base + "/readyz")
        body = await treq.json_content(response)
        return body.get("redis") == state and body

    return await eventually(check, f"{node.name} to see redis {state}", seconds=20)


@pytest_twisted.async_yield_fixture
async def redis():
    server = await start_redis()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def nodes(redis, app, tmp_path):
    started = await gatherResults(
        [Deferred.fromCoroutine(start_node(redis, app, tmp_path, f"node{i}")) for i in (1, 2, 3)],
        consumeErrors=True,
    )
    # Each node counts the others once it has refreshed after they joined.
    await gatherResults([Deferred.fromCoroutine(until_nodes(node, 3)) for node in started])
    yield started
    await gatherResults([node.terminate() for node in started], consumeErrors=True)


async def until_nodes(node, count):
    async def check():
        return (await metric(node, "wsgw_cluster_nodes")) == count

    await eventually(check, f"{node.name} to count {count} nodes")


async def metric(node, name):
    return (await scrape(node)).get(name)


async def listed_ids(node):
    status, answer = await api(node, "list")
    assert status == 200 and answer["code"] == 0
    return {
        entry["name"]: sorted(c["id"] for c in entry["conns"] + entry["public_conns"]) for entry in answer["data"]
    }, answer.get("partial", False)


async def opened_conn(app, user, seen):
    """The conn id of the next connection of C{user} the app heard open."""
    event = await app.wait_for(
        lambda: next(
            (e for e in app.events if e["action"] == "open" and e["user_name"] == user and e["conn_id"] not in seen),
            None,
        ),
        f"open of {user}",
    )
    seen.add(event["conn_id"])
    return event["conn_id"]


@pytest_twisted.ensureDeferred
async def test_send_to_a_user_reaches_each_connection_once_on_every_node(nodes, app, node_ws):
    """
    Alice has a Node `ws` client on each node, Bob one on the second: a
    send to Alice, from any node, reaches each of hers exactly once, in
    order, and none of Bob's; C{matched} counts them all.
    """
    alice = [await node_client(node.ws_url, {"X-Bfl-User": "alice"}) for node in nodes]
    bob = await node_client(nodes[1].ws_url, {"X-Bfl-User": "bob"})
    try:
        sent = []
        for i in range(30):
            origin = nodes[i % 3]
            status, answer = await api(origin, "send", {"users": ["alice"], "payload": {"n": i}})
            assert (status, answer["data"]) == (200, {"matched": 3})
            sent.append({"n": i})
        for client in alice:
            received = await client.wait_messages(30)
            assert [json.loads(m) for m in received] == sent
        # A last message to everyone: anything duplicated would be before it.
        status, answer = await api(nodes[2], "send", {"users": ["alice", "bob"], "payload": "end"})
        assert answer["data"] == {"matched": 4}
        for client in alice:
            received = await client.wait_messages(31)
            assert [json.loads(m) for m in received] == sent + ["end"]
        assert [json.loads(m) for m in await bob.wait_messages(1)] == ["end"]
    finally:
        for client in alice + [bob]:
            await client.stop()


@pytest_twisted.ensureDeferred
async def test_send_matching_rules_hold_across_nodes(nodes, app):
    """
    Conn ids, tokens and users_access_type select the same connections
    whichever node is asked and whichever node holds them.
    """
    seen = set()
    private = await py_client(nodes[0].ws_url, {"X-Bfl-User": "carol", "Cookie": "auth_token=t-carol"})
    private_id = await opened_conn(app, "carol", seen)
    public = await py_client(nodes[1].ws_url, {"X-Bfl-User": "carol"})
    public_id = await opened_conn(app, "carol", seen)
    other = await py_client(nodes[2].ws_url, {"X-Bfl-User": "dave", "Cookie": "auth_token=t-dave"})
    other_id = await opened_conn(app, "dave", seen)

    # By conn id, asked on a node that does not hold it.
    status, answer = await api(nodes[2], "send", {"conn_id": private_id, "payload": "one"})
    assert answer["data"] == {"matched": 1}
    assert await private.next_message() == '"one"'
    # Public connections of a user only.
    status, answer = await api(nodes[0], "send", {"users": ["carol"], "users_access_type": 2, "payload": "pub"})
    assert answer["data"] == {"matched": 1}
    assert await public.next_message() == '"pub"'
    # Private ones only.
    status, answer = await api(nodes[1], "send", {"users": ["carol"], "users_access_type": 1, "payload": "priv"})
    assert answer["data"] == {"matched": 1}
    assert await private.next_message() == '"priv"'
    # Token and user together: the intersection (Dave's token is not Carol's).
    status, answer = await api(nodes[0], "send", {"users": ["carol"], "tokens": ["t-dave"], "payload": "none"})
    assert answer["data"] == {"matched": 0}
    status, answer = await api(nodes[0], "send", {"tokens": ["t-dave", "t-carol"], "payload": "both"})
    assert answer["data"] == {"matched": 2}
    assert await private.next_message() == '"both"'
    assert await other.next_message() == '"both"'
    # Nothing else arrived anywhere.
    for client in (private, public, other):
        assert client.messages.pending == []
    # An unknown conn id matches nothing, wherever it is asked.
    status, answer = await api(nodes[1], "send", {"conn_id": "no-such-conn", "payload": "x"})
    assert (status, answer["data"]) == (200, {"matched": 0})
    assert other_id and public_id
    for client in (private, public, other):
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_list_shows_the_whole_gateway_on_every_node(nodes, app):
    seen = set()
    clients, expected = [], {}
    for i, (node, user, cookie) in enumerate(
        [
            (nodes[0], "erin", "auth_token=e1"),
            (nodes[1], "erin", ""),
            (nodes[2], "frank", "auth_token=f1"),
            (nodes[2], "erin", "auth_token=e2"),
        ]
    ):
        headers = {"X-Bfl-User": user, "User-Agent": f"agent-{i}"}
        if cookie:
            headers["Cookie"] = cookie
        clients.append(await py_client(node.ws_url, headers))
        expected.setdefault(user, []).append(await opened_conn(app, user, seen))
    expected = {user: sorted(ids) for user, ids in expected.items()}
    for node in nodes:
        listed, partial = await listed_ids(node)
        assert (listed, partial) == (expected, False)
    # The entries have the original's shape, with public and private apart.
    status, answer = await api(nodes[1], "list")
    assert status == 200
    [erin] = [entry for entry in answer["data"] if entry["name"] == "erin"]
    assert erin["conns_number"] == 2 and erin["public_conns_number"] == 1
    assert {c["userAgent"] for c in erin["conns"]} == {"agent-0", "agent-3"}
    assert {c["token"] for c in erin["conns"]} == {"e1", "e2"}
    for client in clients:
        client.transport.loseConnection()
    # Closed connections leave every node's list.
    for node in nodes:
        await eventually(lambda node=node: _empty(node), f"{node.name}'s list to empty")


async def _empty(node):
    listed, _partial = await listed_ids(node)
    return listed == {}


@pytest_twisted.ensureDeferred
async def test_close_reaches_every_node_and_each_node_reports_its_own(nodes, app):
    """
    A close by user, asked on one node, closes that user's connections on
    all nodes with 4000; each close event reaches the app once.
    """
    seen = set()
    clients = [await py_client(node.ws_url, {"X-Bfl-User": "gina"}) for node in nodes]
    ids = [await opened_conn(app, "gina", seen) for _ in nodes]
    status, answer = await api(nodes[0], "close", {"users": ["gina"]})
    assert (status, answer["data"]) == (200, {"matched": 3})
    for client in clients:
        code, _reason = await client.closed
        assert code == 4000
    for conn_id in ids:
        await app.wait_for_action("close", conn_id)
        assert app.actions(conn_id) == ["open", "close"]
    status, answer = await api(nodes[1], "close", {"users": ["gina"]})
    assert answer["data"] == {"matched": 0}


@pytest_twisted.ensureDeferred
async def test_a_killed_node_leaves_the_list_and_a_restart_leaves_no_ghosts(nodes, app, redis, tmp_path):
    seen = set()
    survivor = await py_client(nodes[0].ws_url, {"X-Bfl-User": "hank"})
    survivor_id = await opened_conn(app, "hank", seen)
    doomed = [await py_client(nodes[2].ws_url, {"X-Bfl-User": "hank"}) for _ in range(2)]
    for _ in doomed:
        await opened_conn(app, "hank", seen)
    listed, _ = await listed_ids(nodes[0])
    assert len(listed["hank"]) == 3

    # SIGKILL: no goodbye.  Sends stop counting it at once (its subscription
    # is gone), and its connections leave /list within the presence TTL:
    # /list shows the nodes whose alive key exists, and the dead node's
    # expires by then (-2: gone already).
    await nodes[2].terminate(signal.SIGKILL)
    ttl_ms = await redis_command(redis, "PTTL", "wsgw:alive:node3")
    assert ttl_ms == -2 or 0 < ttl_ms <= PRESENCE_TTL * 1000, ttl_ms
    status, answer = await api(nodes[1], "send", {"users": ["hank"], "payload": "still here"})
    assert (status, answer["data"]["matched"]) == (200, 1)

    async def only_survivor():
        listed, _ = await listed_ids(nodes[1])
        return listed == {"hank": [survivor_id]}

    await eventually(only_survivor, "the dead node to leave /list")

    # Its connections appear again, but only those of the restarted node.
    restarted = await start_node(redis, app, tmp_path, "node3")
    listed, _ = await listed_ids(nodes[0])
    assert listed == {"hank": [survivor_id]}
    fresh = await py_client(restarted.ws_url, {"X-Bfl-User": "hank"})
    fresh_id = await opened_conn(app, "hank", seen)
    listed, _ = await listed_ids(nodes[1])
    assert listed == {"hank": sorted([survivor_id, fresh_id])}
    status, answer = await api(nodes[0], "send", {"users": ["hank"], "payload": "hi"})
    assert (status, answer["data"]) == (200, {"matched": 2})
    assert await fresh.next_message() == '"hi"'
    fresh.transport.loseConnection()
    survivor.transport.loseConnection()
    await restarted.terminate()


@pytest_twisted.ensureDeferred
async def test_redis_down_each_node_serves_its_own_and_recovers(nodes, app, redis):
    seen = set()
    near = await py_client(nodes[0].ws_url, {"X-Bfl-User": "ivy"})
    near_id = await opened_conn(app, "ivy", seen)
    far = await py_client(nodes[1].ws_url, {"X-Bfl-User": "ivy"})
    far_id = await opened_conn(app, "ivy", seen)

    await redis.stop()
    ready = await until_redis(nodes[0], "down")
    assert ready["code"] == 0 and "degraded" in ready["message"]
    assert await metric(nodes[0], "wsgw_redis_up") == 0

    # Local send, close and list go on; the answers say they are partial.
    for i in range(5):
        status, answer = await api(nodes[0], "send", {"users": ["ivy"], "payload": i})
        assert (status, answer["data"]) == (200, {"matched": 1, "partial": True})
        assert await near.next_message() == str(i)
    listed, partial = await listed_ids(nodes[0])
    assert (listed, partial) == ({"ivy": [near_id]}, True)
    # wsgw-ctl says so too.
    result = await ctl(nodes[0], "send", "5", "--user", "ivy")
    assert (
        result.stdout.strip() == "send: 1 connection(s) matched (partial: some nodes were not reached (is Redis down?))"
    )
    assert await near.next_message() == "5"
    result = await ctl(nodes[0], "list")
    assert "ivy" in result.stdout and "partial" in result.stderr
    # A client connecting meanwhile is served, and listed once Redis is back.
    late = await py_client(nodes[2].ws_url, {"X-Bfl-User": "ivy"})
    late_id = await opened_conn(app, "ivy", seen)
    # Said once, not once per send.
    unreachable = [line for line in nodes[0].log_lines() if "unreachable" in line]
    assert len(unreachable) == 1

    # Redis comes back empty: every node writes its presence again.
    await redis.start()
    for node in nodes:
        await until_redis(node, "up")
    expected = {"ivy": sorted([near_id, far_id, late_id])}

    async def whole():
        listed, partial = await listed_ids(nodes[0])
        return (listed, partial) == (expected, False)

    await eventually(whole, "the list to be whole again")
    status, answer = await api(nodes[0], "send", {"users": ["ivy"], "payload": "back"})
    assert answer["data"] == {"matched": 3}
    for client in (near, far, late):
        # Far missed what was sent while Redis was down: documented.
        assert await client.next_message() == '"back"'
    assert len([line for line in nodes[0].log_lines() if "reachable again" in line]) == 1
    for client in (near, far, late):
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_malformed_messages_from_redis_are_counted_and_skipped(nodes, app, redis):
    """
    A node applies only well-formed commands from the channel; everything
    else is counted, logged at most once a minute, and skipped.
    """
    import txredisapi

    client = await py_client(nodes[0].ws_url, {"X-Bfl-User": "jack"})
    await opened_conn(app, "jack", set())
    publisher = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
    try:
        bad = [
            "not json",
            "[1,2]",
            json.dumps({"v": 2, "from": "x", "id": "1", "op": "send", "users": ["jack"], "payload": "1"}),
            json.dumps({"v": 1, "from": "x", "id": "2", "op": "explode", "users": ["jack"]}),
            json.dumps({"v": 1, "from": "x", "id": "3", "op": "send", "users": "jack", "payload": "1"}),
            # (Text need not be JSON: raw text frames cross the wire too.)
            json.dumps(
                {"v": 1, "from": "x", "id": "4", "op": "send", "users": ["jack"], "payload": "*", "binary": True}
            ),
            json.dumps({"v": 1, "from": "x", "id": "5", "op": "send", "users": ["jack"], "payload": 7}),
            json.dumps({"v": 1, "from": "x", "id": "6", "op": "close", "access": True, "users": ["jack"]}),
            json.dumps({"v": 1, "from": "", "id": "7", "op": "close", "users": ["jack"]}),
            json.dumps({"v": 1, "from": "x", "id": "8", "op": "close"}),
        ]
        for raw in bad:
            await publisher.publish("wsgw:commands", raw)
        await publisher.publish("wsgw:replies:node1", '{"v":1,"from":"x","id":"9","matched":-1}')
        # A well-formed command from a node the test plays is applied and answered.
        good = {
            "v": 1,
            "from": "tester",
            "id": "10",
            "op": "send",
            "conn_ids": [],
            "users": ["jack"],
            "tokens": [],
            "access": 0,
            "payload": '{"ok":true}',
        }
        await publisher.publish("wsgw:commands", json.dumps(good))
        assert await client.next_message() == '{"ok":true}'

        async def counted():
            return await metric(nodes[0], "wsgw_cluster_messages_malformed_total") == len(bad) + 1

        await eventually(counted, "malformed messages to be counted")
        assert len([line for line in nodes[0].log_lines() if "malformed" in line]) == 1
        # A malformed presence record of a live node is skipped by /list.
        await publisher.set("wsgw:alive:ghost", "x", expire=30)
        await publisher.sadd("wsgw:nodes", "ghost")
        await publisher.hset("wsgw:conns:ghost", "c1", "{not a record")
        await publisher.hset("wsgw:conns:ghost", "c2", json.dumps({"name": "jack", "public": "no", "conn": {}}))
        listed, partial = await listed_ids(nodes[1])
        assert len(listed["jack"]) == 1 and not partial
        # Every node still serves.
        for node in nodes:
            status, answer = await api(node, "send", {"users": ["jack"], "payload": node.name})
            assert (status, answer["data"]["matched"]) == (200, 1)
            assert await client.next_message() == json.dumps(node.name)
    finally:
        await publisher.disconnect()
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_is_noticed_and_the_nodes_keep_serving(nodes, app, redis):
    """
    A Redis that stops answering (SIGSTOP: its socket still accepts) is
    noticed by the reply timeout; sends answer meanwhile, and the node does
    not flap between down and up while it stays hung.
    """
    client = await py_client(nodes[0].ws_url, {"X-Bfl-User": "kim"})
    await opened_conn(app, "kim", set())
    redis.process.signalProcess(signal.SIGSTOP)
    try:
        # Answered once the other nodes' counts are given up on (the
        # cluster timeout), not when Redis answers.
        status, answer = await bounded(
            Deferred.fromCoroutine(api(nodes[0], "send", {"users": ["kim"], "payload": 1})),
            what="a send to be answered while Redis hangs",
        )
        assert (status, answer["data"]) == (200, {"matched": 1, "partial": True})
        assert await client.next_message() == "1"
        await until_redis(nodes[0], "down")
        status, answer = await api(nodes[0], "send", {"users": ["kim"], "payload": 2})
        assert answer["data"] == {"matched": 1, "partial": True}
    finally:
        redis.process.signalProcess(signal.SIGCONT)
    for node in nodes:  # each reconnects on its own schedule
        await until_redis(node, "up")
    assert len([line for line in nodes[0].log_lines() if "unreachable" in line]) == 1
    status, answer = await api(nodes[1], "send", {"users": ["kim"], "payload": 3})
    assert answer["data"] == {"matched": 1}
    assert [await client.next_message(), await client.next_message()] == ["2", "3"]
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_presence_events_across_nodes_and_a_killed_node(redis, app, tmp_path, node_ws):
    """
    Three daemons with --presence-events: a user with clients on two nodes
    is online once, ahead of the first open; a user whose only node is
    SIGKILLed goes offline within the presence TTL plus the grace period,
    posted by a surviving node, exactly once; a user also on a surviving
    node stays online.
    """
    grace = 1.0
    started = await gatherResults(
        [
            Deferred.fromCoroutine(
                start_node(redis, app, tmp_path, f"node{i}", "--presence-events", "--presence-grace", str(grace))
            )
            for i in (1, 2, 3)
        ],
        consumeErrors=True,
    )
    try:
        seen = set()

        def presence(user):
            return [e["action"] for e in app.events if e["action"] in ("online", "offline") and e["user_name"] == user]

        # Signed-in clients (an auth_token cookie): public ones make nobody online.
        def signed_in(user, n):
            return {"X-Bfl-User": user, "Cookie": f"auth_token={user}{n}"}

        kim = [await node_client(node.ws_url, signed_in("kim", n)) for n, node in enumerate(started[:2])]
        first_kim = await opened_conn(app, "kim", seen)
        await opened_conn(app, "kim", seen)
        assert presence("kim") == ["online"]
        actions = [(e["action"], e.get("conn_id")) for e in app.events if e["user_name"] == "kim"]
        assert actions[0] == ("online", None) and actions[1] == ("open", first_kim)
        ids = [h["x-wsgw-event-id"] for e, h in zip(app.events, app.headers) if e["action"] == "online"]
        assert ids[0].startswith("presence:")

        # On the node about to die: lou alone, kim besides her other two.
        await node_client(started[2].ws_url, signed_in("lou", 0))
        await node_client(started[2].ws_url, signed_in("kim", 2))
        await opened_conn(app, "lou", seen)
        await opened_conn(app, "kim", seen)
        assert presence("lou") == ["online"]

        await started[2].terminate(signal.SIGKILL)
        killed_at = reactor.seconds()
        await app.wait_for(lambda: presence("lou") == ["online", "offline"], "lou offline", seconds=20)
        # The TTL, the grace period, a sweep, and slack for a loaded machine.
        assert reactor.seconds() - killed_at <= PRESENCE_TTL + grace + 1.0 + 2.0
        assert presence("kim") == ["online"]
        offline_posted = [await metric(node, "wsgw_presence_events_total|action=offline") for node in started[:2]]
        assert sorted(offline_posted) == [0.0, 1.0]

        # kim leaves the surviving nodes: one offline, behind both closes.
        for client in kim:
            await client.stop()
        await app.wait_for(lambda: presence("kim") == ["online", "offline"], "kim offline", seconds=20)
        kim_events = [e["action"] for e in app.events if e["user_name"] == "kim"]
        assert kim_events[-1] == "offline" and kim_events.count("close") == 2
    finally:
        await gatherResults([node.terminate() for node in started], consumeErrors=True)
