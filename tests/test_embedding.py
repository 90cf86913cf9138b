"""
An existing Twisted application mounts wsgw in its own Site, or adds its
service to its own MultiService.
"""

import json

import pytest_twisted
import treq
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from harness import py_client
from wsgw import Config, make_node, make_resource, make_service


class Page(Resource):
    """A page the existing application already served."""

    isLeaf = True

    def render_GET(self, request):
        return b"existing page"


@pytest_twisted.ensureDeferred
async def test_mounted_in_an_existing_site(app):
    config = Config(listen=[], app_url=app.url, ping_timeout=0.5, ping_check_interval=0.1)
    node = make_node(config, reactor)
    service = make_service(config, reactor, node=node)
    service.startService()
    root = Resource()
    root.putChild(b"hello", Page())
    root.putChild(b"gateway", make_resource(node))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    base = f"127.0.0.1:{port.getHost().port}"
    try:
        assert await treq.text_content(await treq.get(f"http://{base}/hello")) == "existing page"
        client = await py_client(f"ws://{base}/gateway/ws", {"X-Bfl-User": "alice"})
        opened = await app.wait_for_action("open")
        response = await treq.post(
            f"http://{base}/gateway/tapr/ws/conn/send",
            data=json.dumps({"payload": {"hi": 1}, "conn_id": opened["conn_id"]}).encode(),
        )
        assert (await treq.json_content(response))["data"] == {"matched": 1}
        assert json.loads(await client.next_message()) == {"hi": 1}
        # The service runs the heartbeat for the mounted gateway too.
        assert (await client.closed)[0] == 4001
        await app.wait_for_action("close")
    finally:
        await service.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_added_to_an_existing_multiservice(app):
    parent = MultiService()
    service = make_service(Config(listen=["tcp:0:interface=127.0.0.1"], app_url=app.url), reactor)
    service.setServiceParent(parent)
    parent.startService()
    [port] = await service.listening
    url = f"ws://127.0.0.1:{port.getHost().port}/ws"
    client = await py_client(url, {"X-Bfl-User": "bob"})
    await app.wait_for_action("open")
    await parent.stopService()  # closes the client with 1001 and drains
    assert (await client.closed)[0] == 1001
    assert [e["action"] for e in app.events] == ["open", "close"]


@pytest_twisted.ensureDeferred
async def test_two_embedded_gateways_are_one_cluster(app):
    """
    Two applications in one process, each with its own wsgw on the Redis
    engine, act as one gateway; one that stops leaves the cluster at once
    rather than when its presence expires.
    """
    from harness import eventually, start_redis

    redis = await start_redis()
    parent = MultiService()
    services = []
    for name in ("left", "right"):
        config = Config(
            listen=["tcp:0:interface=127.0.0.1"], app_url=app.url, engine="redis", redis_url=redis.url, node_id=name
        )
        service = make_service(config, reactor)
        service.setServiceParent(parent)
        services.append(service)
    parent.startService()
    try:
        bases = []
        for service in services:
            [port] = await service.listening
            bases.append(f"127.0.0.1:{port.getHost().port}")
        await eventually(lambda: _all_up(services), "both nodes to reach redis")
        client = await py_client(f"ws://{bases[1]}/ws", {"X-Bfl-User": "carol"})
        await app.wait_for_action("open")
        response = await treq.post(
            f"http://{bases[0]}/tapr/ws/conn/send", data=json.dumps({"payload": "across", "users": ["carol"]}).encode()
        )
        assert (await treq.json_content(response))["data"] == {"matched": 1}
        assert await client.next_message() == '"across"'

        await services[1].stopService()  # drains, then leaves the cluster
        assert (await client.closed)[0] == 1001
        answer = await treq.json_content(await treq.get(f"http://{bases[0]}/tapr/ws/conn/list"))
        assert answer == {"code": 0, "message": "success", "data": []}
        import txredisapi

        direct = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
        try:
            assert await direct.smembers("wsgw:nodes") == {"left"}
            assert await direct.exists("wsgw:alive:right") == 0
        finally:
            await direct.disconnect()
    finally:
        await parent.stopService()
        await redis.stop()


async def _all_up(services):
    return all(service.node.cluster.up for service in services)
