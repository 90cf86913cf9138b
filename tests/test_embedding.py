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
from wsgw import Config, make_gateway, make_resource, make_service


class Page(Resource):
    """A page the existing application already served."""

    isLeaf = True

    def render_GET(self, request):
        return b"existing page"


@pytest_twisted.ensureDeferred
async def test_mounted_in_an_existing_site(app):
    config = Config(listen=[], app_url=app.url, ping_timeout=0.5, ping_check_interval=0.1)
    gateway = make_gateway(config, reactor)
    service = make_service(config, reactor, gateway=gateway)
    service.startService()
    root = Resource()
    root.putChild(b"hello", Page())
    root.putChild(b"gateway", make_resource(gateway, config))
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
