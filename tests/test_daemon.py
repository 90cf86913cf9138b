"""
End to end: the real daemon (`twist wsgw`), a real app HTTP server, and real
clients (Autobahn in Python, and the Node `ws` library).
"""

import json
import signal
import uuid

import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from harness import api, node_client, py_client, start_daemon


@pytest_twisted.async_yield_fixture
async def daemon(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    yield daemon
    await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_node_client_round_trip_through_app(daemon, app, node_ws):
    """Exchange 1 and 2 of the spec: open, message, reply by conn_id, close."""
    client = await node_client(daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=abc; lang=en"})
    try:
        opened = await app.wait_for_action("open")
        assert opened["data"] == {}
        assert opened["user_name"] == "alice"
        assert opened["token"] == "abc"
        assert opened["access_public"] is False
        conn_id = opened["conn_id"]
        assert str(uuid.UUID(conn_id)) == conn_id

        client.send(json.dumps({"event": "ai", "data": {}}))
        message = await app.wait_for_action("message")
        assert message["data"] == {"event": "ai", "data": {}}
        assert app.headers[1]["cookie"] == "auth_token=abc; lang=en"

        reply = {"event": "ai_message", "data": {"message": "Hello world!"}}
        status, answer = await api(daemon, "send", {"payload": reply, "conn_id": conn_id})
        assert (status, answer) == (200, {"code": 0, "message": "success", "data": {"matched": 1}})
        [received] = await client.wait_messages(1)
        assert json.loads(received) == reply

        client.command(close=[1000, "bye"])
        await app.wait_for_action("close", conn_id)
        assert app.actions(conn_id) == ["open", "message", "close"]
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_ping_gets_exact_pong_and_is_not_forwarded(daemon, app, node_ws):
    client = await node_client(daemon.ws_url, {"X-Bfl-User": "alice"})
    try:
        opened = await app.wait_for_action("open")
        client.send('{"event":"ping","data":{}}')
        client.send('{"event":"ping"}')
        client.send('{"event":"after"}')
        assert await client.wait_messages(2) == ['{"event":"pong"}', '{"event":"pong"}']
        await app.wait_for_action("message")
        # Events of a connection arrive in order: had a ping been forwarded,
        # it would be here before "after".
        assert [e["data"] for e in app.of(opened["conn_id"])[1:]] == [{"event": "after"}]
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_public_connection_list_and_broadcast(daemon, app):
    private = await py_client(daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=tok1"})
    public = await py_client(daemon.ws_url, {"X-Bfl-User": "alice", "User-Agent": "Browser/1"})
    other = await py_client(daemon.ws_url, {"X-Bfl-User": "bob"})
    await app.wait_for(lambda: len(app.events) >= 3, "three opens")
    public_open = [e for e in app.events if e["access_public"]]
    assert len(public_open) == 2  # public and other
    assert all(str(uuid.UUID(e["token"])) == e["token"] for e in public_open)

    status, answer = await api(daemon, "list")
    assert status == 200 and answer["code"] == 0
    alice = next(entry for entry in answer["data"] if entry["name"] == "alice")
    assert alice["conns_number"] == 1 and alice["conns"][0]["token"] == "tok1"
    assert alice["public_conns_number"] == 1
    assert alice["public_conns"][0]["userAgent"] == "Browser/1"
    assert len(alice["public_conns"][0]["userAgentTag"]) == 32

    payload = {"code": 200, "data": {"uid": "app", "type": "install", "status": "running", "progress": "50"}}
    _, answer = await api(daemon, "send", {"payload": payload, "conn_id": "", "users": ["alice"]})
    assert answer["data"] == {"matched": 2}
    for client in (private, public):
        assert json.loads(await client.next_message()) == payload

    _, answer = await api(daemon, "send", {"payload": "only public", "users": ["alice"], "users_access_type": 2})
    assert answer["data"] == {"matched": 1}
    assert json.loads(await public.next_message()) == "only public"

    _, answer = await api(daemon, "close", {"users": ["alice", "bob"]})
    assert answer["data"] == {"matched": 3}
    for client in (private, public, other):
        code, reason = await client.closed
        assert (code, reason) == (4000, "closed by app")
    await app.wait_for(lambda: [e["action"] for e in app.events].count("close") == 3, "three close events")
    _, answer = await api(daemon, "list")
    assert answer["data"] == []


@pytest_twisted.ensureDeferred
async def test_text_and_binary_frames_are_forwarded(daemon, app):
    client = await py_client(daemon.ws_url)
    client.send_text("plain words")
    client.sendMessage(b"\x00\x01\xfe", isBinary=True)
    await app.wait_for(lambda: len(app.events) >= 3, "two messages")
    text, binary = app.events[1:3]
    assert text["data"] == "plain words" and "binary" not in text
    assert binary["binary"] is True and binary["data"] == "AAH+"
    client.sendClose()
    await client.closed


@pytest_twisted.ensureDeferred
async def test_forwarded_for_and_subprotocol(daemon, app):
    client = await py_client(
        daemon.ws_url, {"X-Original-Forwarded-For": "203.0.113.9"}, protocols=["chat.v2", "chat.v1"]
    )
    assert client.websocket_protocol_in_use == "chat.v2"
    opened = await app.wait_for_action("open")
    assert opened["remote_addr"] == "203.0.113.9"
    assert app.headers[0]["x-forwarded-for"] == "203.0.113.9"
    client.sendClose()
    await client.closed


@pytest_twisted.ensureDeferred
async def test_plain_get_on_ws_is_426(daemon):
    response = await treq.get(daemon.ws_url.replace("ws://", "http://"))
    assert response.code == 426
    body = await treq.json_content(response)
    assert body["code"] != 0


@pytest_twisted.ensureDeferred
async def test_silent_client_is_closed_with_code_and_close_event(app, tmp_path):
    daemon = await start_daemon(
        "--app-url", app.url, "--ping-timeout", "1", "--ping-check-interval", "0.2", cwd=tmp_path
    )
    try:
        silent = await py_client(daemon.ws_url, {"X-Bfl-User": "quiet"})
        opened = await app.wait_for_action("open")
        assert await silent.closed == (4001, "ping timeout")
        close = await app.wait_for_action("close", opened["conn_id"])
        assert close["user_name"] == "quiet"
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_slow_app_does_not_stall_others(app, daemon):
    """One connection's events hang at the app; another's flow, pongs and the API answer."""
    release = Deferred()
    app.behaviour = lambda event: (200, release if event["data"] == {"event": "slow"} else 0)
    slow = await py_client(daemon.ws_url, {"X-Bfl-User": "slow"})
    fast = await py_client(daemon.ws_url, {"X-Bfl-User": "fast"})
    await app.wait_for(lambda: len(app.events) >= 2, "two opens")
    slow.send_text('{"event":"slow"}')
    for n in range(20):
        fast.send_text(json.dumps({"n": n}))
    fast_id = next(e["conn_id"] for e in app.events if e["user_name"] == "fast")
    await app.wait_for(lambda: len(app.of(fast_id)) == 21, "the fast connection's 20 messages")
    assert [e["data"]["n"] for e in app.of(fast_id)[1:]] == list(range(20))
    slow.send_text('{"event":"ping"}')
    assert await slow.next_message() == '{"event":"pong"}'
    status, _ = await api(daemon, "list")
    assert status == 200
    release.callback(None)
    for client in (slow, fast):
        client.dropConnection(abort=True)


@pytest_twisted.ensureDeferred
async def test_close_comes_last_when_client_vanishes_mid_stream(app, daemon):
    """Events still queued when the TCP connection dies arrive, then close."""
    app.behaviour = lambda event: (200, 0.05)
    client = await py_client(daemon.ws_url)
    for n in range(30):
        client.send_text(json.dumps({"n": n}))
    opened = await app.wait_for_action("open")
    client.transport.abortConnection()
    await app.wait_for_action("close", opened["conn_id"], seconds=20)
    events = app.of(opened["conn_id"])
    assert [e["action"] for e in events] == ["open"] + ["message"] * 30 + ["close"]
    assert [e["data"]["n"] for e in events[1:-1]] == list(range(30))


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_clients_with_1001_and_delivers_close_events(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    clients = [await py_client(daemon.ws_url, {"X-Bfl-User": f"u{n}"}) for n in range(3)]
    await app.wait_for(lambda: len(app.events) >= 3, "three opens")
    assert await daemon.terminate(signal.SIGTERM) == (0, None)
    for client in clients:
        code, _ = await client.closed
        assert code == 1001
    assert [e["action"] for e in app.events].count("close") == 3


@pytest_twisted.ensureDeferred
async def test_olares_environment_sets_app_url(app, tmp_path):
    port = app.port.getHost().port
    daemon = await start_daemon(env={"WS_PORT": str(port), "WS_URL": "/ws/message"}, cwd=tmp_path)
    try:
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "env"})
        opened = await app.wait_for_action("open")
        assert opened["user_name"] == "env"
        client.sendClose()
        await client.closed
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_without_app_url_clients_and_api_still_work(tmp_path):
    daemon = await start_daemon(cwd=tmp_path)
    try:
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "solo"})
        client.send_text('{"event":"ping"}')
        assert await client.next_message() == '{"event":"pong"}'
        status, answer = await api(daemon, "list")
        assert (status, answer["data"][0]["name"]) == (200, "solo")
    finally:
        await daemon.terminate()
