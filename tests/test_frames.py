"""
Frames the app chooses (raw text, binary) and pings the gateway sends
(--ws-ping-interval), in memory and against the real daemon.
"""

import base64
import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, node_of, open_conn
from harness import api, node_client, start_daemon
from wsgw.cluster.wire import Command, Malformed, encode_command, parse_command
from wsgw.registry import Targets
from wsgw.service import GatewayService
from wsgw.web import make_resource

BASE = "http://127.0.0.1:40010/tapr/ws/conn/"


def recorded_gateway():
    """A gateway whose frames record (payload, binary)."""
    gateway = make_gateway(Clock(), FakeApp(), prepare=lambda payload, binary: (payload, binary))
    open_conn(gateway, "a", "alice")
    return gateway


def send(gateway, body):
    treq = StubTreq(make_resource(node_of(gateway)))
    d = treq.post(BASE + "send", data=json.dumps(body).encode())
    treq.flush()
    response = d.result
    return response.code, json.loads(treq.content(response).result)


@pytest.mark.parametrize(
    "body, frame",
    [
        ({"text": "hello, not JSON", "conn_id": "a"}, (b"hello, not JSON", False)),
        ({"text": "名前", "users": ["alice"]}, ("名前".encode(), False)),
        ({"binary": base64.b64encode(b"\x00\xffbytes").decode(), "conn_id": "a"}, (b"\x00\xffbytes", True)),
        ({"payload": {"x": 1}, "conn_id": "a"}, (b'{"x":1}', False)),
        ({"conn_id": "a"}, (b"null", False)),  # as the original: no payload sends null
    ],
)
def test_send_takes_text_binary_or_payload(body, frame):
    gateway = recorded_gateway()
    status, answer = send(gateway, body)
    assert (status, answer["data"]) == (200, {"matched": 1})
    assert gateway.registry.get("a").channel.frames == [frame]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": "a", "payload": 1, "conn_id": "a"}, "one of payload, text or binary, not payload and text"),
        ({"text": "a", "binary": "AA==", "conn_id": "a"}, "not text and binary"),
        ({"text": 5, "conn_id": "a"}, "text must be a string"),
        ({"text": "\ud800", "conn_id": "a"}, "lone surrogate"),
        ({"binary": "not base64!", "conn_id": "a"}, "binary must be standard base64"),
        ({"binary": ["AA=="], "conn_id": "a"}, "binary must be a base64 string"),
    ],
)
def test_send_refuses_a_frame_it_cannot_send_saying_why(body, message):
    gateway = recorded_gateway()
    status, answer = send(gateway, body)
    assert status == 400 and message in answer["message"]
    assert gateway.registry.get("a").channel.frames == []


def test_binary_and_raw_text_frames_cross_the_cluster_wire():
    binary = Command("n1", "r1", "send", Targets(users=["u"]), b"\x00\x01\xfe", binary=True)
    assert parse_command(encode_command(binary)) == binary
    text = Command("n1", "r2", "send", Targets(users=["u"]), b"plain text, not JSON")
    assert parse_command(encode_command(text)) == text
    broken = json.loads(encode_command(binary))
    broken["payload"] = "***"
    with pytest.raises(Malformed, match="not base64"):
        parse_command(json.dumps(broken))
    broken["binary"] = "yes"
    with pytest.raises(Malformed, match="binary must be true or false"):
        parse_command(json.dumps(broken))


def test_the_gateway_pings_every_client_at_its_interval_and_pongs_keep_them_open():
    clock = Clock()
    gateway = make_gateway(clock)
    gateway.ping_timeout = 10
    quiet, answering = open_conn(gateway, "quiet"), open_conn(gateway, "answering")
    service = GatewayService(gateway, check_interval=1.0, drain_timeout=1.0, clock=clock, ping_interval=3.0)
    service.startService()
    for _ in range(12):
        clock.advance(1.0)
        if answering.channel.pings:
            gateway.heard_from(answering)  # its pong
    assert answering.channel.pings == 4 and answering.channel.closed_with is None
    assert quiet.channel.pings >= 3 and quiet.channel.closed_with == (4001, "ping timeout")
    service.stopService()


def test_without_an_interval_the_gateway_sends_no_pings():
    clock = Clock()
    gateway = make_gateway(clock)
    conn = open_conn(gateway, "a")
    service = GatewayService(gateway, check_interval=1.0, drain_timeout=1.0, clock=clock)
    service.startService()
    clock.advance(30)
    assert conn.channel.pings == 0
    service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_only_answers_pings_stays_open_and_gets_raw_frames(tmp_path, node_ws):
    daemon = await start_daemon(
        "--ping-timeout", "1", "--ping-check-interval", "0.2", "--ws-ping-interval", "0.25", cwd=tmp_path
    )
    try:
        client = await node_client(daemon.ws_url, {"X-Bfl-User": "pat"})
        # Well past the ping timeout, with no message of its own: its pongs.
        await client.wait(lambda events: sum(1 for e in events if "pinged" in e) >= 8, "8 pings from the gateway")
        assert not [e for e in client.proto.events if "close" in e]
        _status, answer = await api(daemon, "send", {"text": "raw <b>text</b>", "users": ["pat"]})
        assert answer["data"] == {"matched": 1}
        _status, answer = await api(
            daemon, "send", {"binary": base64.b64encode(b"\x00\x01\x02").decode(), "users": ["pat"]}
        )
        assert answer["data"] == {"matched": 1}
        await client.wait(lambda events: len([e for e in events if "message" in e]) >= 2, "two frames")
        frames = [(e["message"], e["binary"]) for e in client.proto.events if "message" in e]
        assert frames == [("raw <b>text</b>", False), (base64.b64encode(b"\x00\x01\x02").decode(), True)]
        await client.stop()
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_without_gateway_pings_a_silent_node_client_times_out(tmp_path, node_ws):
    daemon = await start_daemon("--ping-timeout", "1", "--ping-check-interval", "0.2", cwd=tmp_path)
    try:
        client = await node_client(daemon.ws_url, {"X-Bfl-User": "pat"})
        closed = await client.wait_close()
        assert closed["close"] == 4001
        assert not [e for e in client.proto.events if "pinged" in e]
    finally:
        await daemon.terminate()
