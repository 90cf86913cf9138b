"""
Inline replies and batched events against the real daemon, a real app
HTTP server and the Node `ws` client.
"""

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from harness import Waiters, api, node_client, scrape, start_daemon


class ReplyingApp(Resource):
    """Answers each message with an inline reply naming it; records all."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []  # (headers, parsed body)
        self.waiters = Waiters()

    def render_POST(self, request):
        body = json.loads(request.content.read())
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.bodies.append((headers, body))
        self.waiters.check()
        if isinstance(body, dict) and body["action"] == "open":
            request.setHeader(b"X-Wsgw-Reply", b"1")
            return b'{"welcome":true}'
        if isinstance(body, dict) and body["action"] == "message":
            request.setHeader(b"X-Wsgw-Reply", b"1")
            return json.dumps({"re": body["data"]}).encode()
        return b""

    def events(self):
        for _headers, body in self.bodies:
            yield from body if isinstance(body, list) else [body]


def serve(resource):
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/events"


@pytest_twisted.ensureDeferred
async def test_the_apps_inline_replies_reach_the_client_in_order(tmp_path, node_ws):
    app = ReplyingApp()
    port, url = serve(app)
    daemon = await start_daemon("--app-url", url, cwd=tmp_path)
    try:
        client = await node_client(daemon.ws_url, {"X-Bfl-User": "ann"})
        for n in range(5):
            client.send(json.dumps({"n": n}))
        messages = await client.wait_messages(6)
        assert [json.loads(m) for m in messages[:6]] == [{"welcome": True}] + [{"re": {"n": n}} for n in range(5)]
        samples = await scrape(daemon)
        assert samples["wsgw_app_replies_total|result=sent"] == 6
        # Nothing was asked of the API for them.
        _status, listed = await api(daemon, "list")
        assert listed["data"][0]["name"] == "ann"
        await client.stop()
    finally:
        await daemon.terminate()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_batched_events_keep_each_connections_order_and_lose_nothing(tmp_path, node_ws):
    app = ReplyingApp()
    port, url = serve(app)
    daemon = await start_daemon("--app-url", url, "--app-batch", "10", cwd=tmp_path)
    try:
        clients = [await node_client(daemon.ws_url, {"X-Bfl-User": f"u{i}"}) for i in range(3)]
        for n in range(20):
            for client in clients:
                client.send(json.dumps({"n": n}))
        await app.waiters.wait(
            lambda: sum(1 for e in app.events() if e["action"] == "message") >= 60, "all 60 messages"
        )
        batches = [(headers, body) for headers, body in app.bodies if isinstance(body, list)]
        assert batches and all(headers["x-wsgw-batch"] == str(len(body)) for headers, body in batches)
        assert all(len(body) <= 10 for _h, body in batches)
        assert any(len(body) > 1 for _h, body in batches)  # they did batch up
        per_conn = {}
        for event in app.events():
            conn_id, seq = event["event_id"].rsplit(":", 1)
            assert conn_id == event["conn_id"]
            per_conn.setdefault(conn_id, []).append((int(seq), event["action"], event["data"]))
        for events in per_conn.values():
            assert [seq for seq, _a, _d in events] == list(range(len(events)))  # in order, once each
            assert [d["n"] for _s, a, d in events if a == "message"] == list(range(20))
        # Inline replies do not apply to batches.
        assert not [e for client in clients for e in client.proto.events if "message" in e]
        for client in clients:
            await client.stop()
    finally:
        await daemon.terminate()
        await port.stopListening()
