"""
Faults against the real daemon and a real app process: the app down, killed,
slow or failing; clients that never read or that flood.  Each test asserts
exactly what arrived, in what order, and that memory stayed bounded.
"""

import json
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from harness import AppProcess, bounded, free_port, py_client, rss_kib, start_daemon, upgrade_request

pytestmark = pytest.mark.timeout(120)


def messages_of(events, conn_id):
    return [e["data"] for e in events if e["conn_id"] == conn_id and e["action"] == "message"]


def actions_of(events, conn_id):
    return [e["action"] for e in events if e["conn_id"] == conn_id]


class Peak:
    """Samples a process's resident memory until stopped."""

    def __init__(self, pid, every=0.05):
        self.pid = pid
        self.baseline = rss_kib(pid)
        self.peak = self.baseline
        self.loop = LoopingCall(self.sample)
        self.loop.start(every)

    def sample(self):
        self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self):
        self.sample()
        self.loop.stop()
        return (self.peak - self.baseline) / 1024  # MiB grown


@pytest_twisted.ensureDeferred
async def test_app_down_at_start_gets_every_event_in_order(tmp_path):
    port = free_port()
    daemon = await start_daemon("--app-url", f"http://127.0.0.1:{port}/ws/message", cwd=tmp_path)
    app = AppProcess()
    try:
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "early"})
        for n in range(5):
            client.send_text(json.dumps({"n": n}))
        await app.start(port=port)
        await app.wait_for(lambda: len(app.unique()) >= 6, "open and five messages")
        events = app.unique()
        conn_id = events[0]["conn_id"]
        assert actions_of(events, conn_id) == ["open"] + ["message"] * 5
        assert messages_of(events, conn_id) == [{"n": n} for n in range(5)]
        client.sendClose()
        await app.wait_for(lambda: actions_of(app.unique(), conn_id)[-1:] == ["close"], "close")
    finally:
        await daemon.terminate()
        await app.kill()


@pytest_twisted.ensureDeferred
async def test_app_killed_and_restarted_mid_stream_loses_nothing(tmp_path):
    app = await AppProcess().start()
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    try:
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "steady"})
        for n in range(20):
            client.send_text(json.dumps({"n": n}))
        await app.wait_for(lambda: len(app.unique()) >= 10, "the first messages")
        await app.kill()
        for n in range(20, 40):
            client.send_text(json.dumps({"n": n}))
        await app.start(port=app.port)
        await app.wait_for(lambda: len(app.unique()) >= 41, "every message after the restart", seconds=30)
        events = app.unique()
        conn_id = events[0]["conn_id"]
        assert messages_of(events, conn_id) == [{"n": n} for n in range(40)]
        ids = [event_id for event_id, _ in app.events]
        assert sorted(set(ids), key=ids.index) == [f"{conn_id}:{seq}" for seq in range(41)]
    finally:
        await daemon.terminate()
        await app.kill()


@pytest_twisted.ensureDeferred
async def test_app_answering_500_then_recovering_gets_everything_once_accepted(tmp_path):
    app = await AppProcess().start("--fail-first", "2")
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    try:
        client = await py_client(daemon.ws_url)
        for n in range(10):
            client.send_text(json.dumps({"n": n}))
        client.sendClose()
        await app.wait_for(lambda: any(e["action"] == "close" for _, e in app.events), "close", seconds=30)
        events = [e for _, e in app.events]
        conn_id = events[0]["conn_id"]
        assert actions_of(events, conn_id) == ["open"] + ["message"] * 10 + ["close"]
        assert messages_of(events, conn_id) == [{"n": n} for n in range(10)]
    finally:
        await daemon.terminate()
        await app.kill()


@pytest_twisted.ensureDeferred
async def test_slow_app_is_used_in_parallel_and_blocks_nobody(app, tmp_path):
    """The app answers no event until the test has seen twenty at once and
    a pong and a list answered meanwhile."""
    in_flight = []
    answer = Deferred()

    def behaviour(event):
        d = Deferred()
        in_flight.append(d)
        answer.addCallback(lambda _: d.callback(None))
        return 200, d

    app.behaviour = behaviour
    daemon = await start_daemon("--app-url", app.url, "--app-timeout", "60", cwd=tmp_path)
    try:
        clients = [await py_client(daemon.ws_url, {"X-Bfl-User": f"u{n}"}) for n in range(20)]
        # All twenty opens are at the app at once, none answered yet.
        await app.wait_for(lambda: len(in_flight) >= 20, "twenty concurrent requests")
        assert not any(d.called for d in in_flight)
        clients[0].send_text('{"event":"ping"}')
        assert await clients[0].next_message() == '{"event":"pong"}'
        response = await treq.get(daemon.base + "/tapr/ws/conn/list")
        assert len((await treq.json_content(response))["data"]) == 20
        assert len(app.events) == 20 and not answer.called
    finally:
        if not answer.called:
            answer.callback(None)
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_paused_client_is_not_expired_for_missed_pings(app, tmp_path):
    app.behaviour = lambda event: (200, 0.6)
    daemon = await start_daemon(
        "--app-url",
        app.url,
        "--max-backlog",
        "2",
        "--ping-timeout",
        "1",
        "--ping-check-interval",
        "0.1",
        cwd=tmp_path,
    )
    try:
        client = await py_client(daemon.ws_url)
        pings = []

        def ping():
            pings.append(1)
            client.send_text('{"event":"ping"}')

        pinger = LoopingCall(ping)
        pinger.start(0.3)
        for n in range(5):
            client.send_text(json.dumps({"n": n}))
        await app.wait_for(lambda: len(app.events) >= 6, "open and five messages", seconds=20)
        pinger.stop()
        # Pings wait in the socket while reading is paused; each is
        # answered once it is read.
        for _ in pings:
            assert await client.next_message() == '{"event":"pong"}'
        client.sendClose(1000)
        await app.wait_for_action("close")
        close = app.events[-1]
        assert close["close_code"] == 1000  # not 4001: the gateway paused it
        assert [e["data"] for e in app.events[1:-1]] == [{"n": n} for n in range(5)]
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_is_dropped_and_others_get_everything(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, "--max-outgoing", "262144", cwd=tmp_path)
    try:
        stalled = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        # Its open event first: opens of different connections are forwarded
        # in parallel, so the app may hear of a second one before the first.
        stalled_id = (await app.wait_for_action("open"))["conn_id"]
        reader = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        await app.wait_for(lambda: len(app.events) >= 2, "two opens")
        # Stop reading, with a small receive buffer: Linux may otherwise
        # grow it to tens of MB (net.ipv4.tcp_rmem) and absorb the test.
        stalled.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        stalled.transport.pauseProducing()
        peak = Peak(daemon.process.pid)
        chunk = "x" * 100_000
        # Broadcast until the gateway gives up on the stalled client: how
        # much that takes depends on the kernel's socket buffers (a few MB).
        # The reader takes each message before the next is sent, so it is
        # never the one that falls behind.
        count = 0
        while not any(e["action"] == "close" for e in app.events) and count < 600:
            response = await treq.post(
                daemon.base + "/tapr/ws/conn/send",
                data=json.dumps({"payload": {"n": count, "pad": chunk}, "users": ["alice"]}).encode(),
            )
            assert (await treq.json_content(response))["data"]["matched"] in (1, 2)
            assert json.loads(await reader.next_message())["n"] == count
            count += 1
        grown = peak.stop()
        close = await app.wait_for_action("close", stalled_id)
        assert (close["close_code"], close["close_reason"]) == (4002, "client too slow")
        assert [e["action"] for e in app.events].count("close") == 1  # the reader stays
        # Megabytes went out; the stalled client held at most its socket
        # buffers and --max-outgoing in the gateway.
        assert grown < 15, f"gateway grew by {grown:.1f} MiB"
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_client_flood_is_throttled_not_buffered_and_nothing_lost(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, "--max-backlog-bytes", "1000000", cwd=tmp_path)
    try:
        client = await py_client(daemon.ws_url)
        await app.wait_for_action("open")
        peak = Peak(daemon.process.pid)
        pad = "y" * 50_000
        count = 1500  # 75 MB
        for n in range(count):
            client.send_text(json.dumps({"n": n, "pad": pad}))
        await app.wait_for(lambda: len(app.events) >= count + 1, "every flooded message", seconds=90)
        grown = peak.stop()
        assert [e["data"]["n"] for e in app.events[1:]] == list(range(count))
        assert grown < 30, f"gateway grew by {grown:.1f} MiB for a 75 MB flood"
        client.sendClose()
        await client.closed
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_connection_limits_refuse_handshake_with_json(tmp_path):
    daemon = await start_daemon("--max-connections", "3", "--max-connections-per-user", "2", cwd=tmp_path)
    try:
        await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        status, body = await upgrade_request(daemon.base, "alice")
        assert status == 429 and body["code"] == 429 and "limit" in body["message"]
        await py_client(daemon.ws_url, {"X-Bfl-User": "bob"})
        status, body = await upgrade_request(daemon.base, "carol")
        assert status == 503 and body["code"] == 503 and "limit" in body["message"]
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_oversized_api_body_is_413_and_message_too_big_is_1009(app, tmp_path):
    daemon = await start_daemon(
        "--app-url", app.url, "--max-api-body", "1000", "--max-message-size", "2000", cwd=tmp_path
    )
    try:
        response = await treq.post(daemon.base + "/tapr/ws/conn/send", data=b"{" + b" " * 5000 + b"}")
        assert response.code == 413
        assert (await treq.json_content(response))["code"] == 413
        client = await py_client(daemon.ws_url)
        opened = await app.wait_for_action("open")
        client.send_text('"' + "z" * 3000 + '"')
        code, _ = await client.closed
        assert code == 1009
        close = await app.wait_for_action("close", opened["conn_id"])
        assert close["close_code"] == 1009
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_handshake_must_complete_in_time(tmp_path):
    from twisted.internet.protocol import ClientFactory, Protocol

    daemon = await start_daemon("--handshake-timeout", "0.5", cwd=tmp_path)
    lost = Deferred()

    class Trickle(Protocol):
        """A request that never ends: a header line every 0.1 s, so the
        connection is never idle and only the deadline can end it."""

        def connectionMade(self):
            self.transport.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            self.more = LoopingCall(self.transport.write, b"X-Slow: 1\r\n")
            self.more.start(0.1, now=False)

        def connectionLost(self, reason):
            self.more.stop()
            lost.callback(None)

    factory = ClientFactory.forProtocol(Trickle)
    try:
        reactor.connectTCP("127.0.0.1", daemon.port, factory)
        await bounded(lost, 5, "the gateway to drop a client that never finishes its request")
        client = await py_client(daemon.ws_url)  # others are still served
        client.sendClose()
    finally:
        await daemon.terminate()
