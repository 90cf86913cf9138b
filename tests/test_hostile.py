"""
Hostile input against the real daemon: property-based requests to every API
endpoint, and raw TCP that breaks the WebSocket protocol in every way we
know.  The daemon never answers 5xx, never crashes, closes each offender
with the right code, and keeps serving everyone else.
"""

import base64
import http.client
import json
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import SyncDaemon

MAX_BODY = 65536


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with SyncDaemon(
        "--max-api-body", str(MAX_BODY), "--max-message-size", "4096", cwd=tmp_path_factory.mktemp("hostile")
    ) as daemon:
        yield daemon
        assert daemon.alive()


def request(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
FIELDS = ["payload", "conn_id", "users", "tokens", "users_access_type", "conns"]
api_objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)
bodies = (
    api_objects.map(lambda o: json.dumps(o).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=300)
    | st.integers(0, MAX_BODY + 100).map(lambda n: b'{"payload":"' + b"x" * n + b'","users":["u"]}')
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]) | st.from_regex(
    r"[A-Z]{1,8}", fullmatch=True
)
segments = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/?#%"), max_size=12)
paths = st.sampled_from(["send", "close", "list", ""]) | segments
PROPERTIES = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_json_answer(status, raw):
    assert status < 500, raw
    assert b"Traceback" not in raw
    answer = json.loads(raw)
    assert isinstance(answer["code"], int) and isinstance(answer["message"], str)
    assert (answer["code"] == 0) == (status == 200)
    return answer


@PROPERTIES
@given(method=methods, path=paths, body=bodies)
def test_any_request_gets_a_json_answer_never_a_5xx(daemon, method, path, body):
    from urllib.parse import quote

    status, raw = request(daemon.port, method, "/tapr/ws/conn/" + quote(path), body)
    if method != "HEAD":
        assert_json_answer(status, raw)


WRONG = {
    "conn_id": st.sampled_from([1, True, [], {}, 2.5]),
    "users": st.sampled_from(["alice", 1, {"a": 1}, [1], ["a", None]]),
    "tokens": st.sampled_from(["t", 3, [False], [["t"]]]),
    "users_access_type": st.sampled_from([3, -1, "0", 1.5, True, [0]]),
    "conns": st.sampled_from(["c", 7, [1], [{}]]),
}


@PROPERTIES
@given(endpoint=st.sampled_from(["send", "close"]), data=st.data())
def test_a_wrong_field_is_named(daemon, endpoint, data):
    fields = ["users", "tokens", "users_access_type"] + (["conn_id"] if endpoint == "send" else ["conns"])
    field = data.draw(st.sampled_from(fields))
    body = {"users": ["alice"], field: data.draw(WRONG[field])}
    status, raw = request(daemon.port, "POST", f"/tapr/ws/conn/{endpoint}", json.dumps(body).encode())
    answer = assert_json_answer(status, raw)
    assert status == 400
    assert field in answer["message"]


# -- raw WebSocket -------------------------------------------------------------


class Raw:
    """A WebSocket client at the byte level, to misbehave on purpose."""

    def __init__(self, port, user="raw"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: "
            + key
            + b"\r\nSec-WebSocket-Version: 13\r\nX-Bfl-User: "
            + user.encode()
            + b"\r\n\r\n"
        )
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the gateway")
        self.buffer += chunk

    def _take(self, n):
        while len(self.buffer) < n:
            self._read()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self, opcode, payload, fin=True, mask=True, length=None):
        length = len(payload) if length is None else length
        head = bytes([(0x80 if fin else 0) | opcode])
        mask_bit = 0x80 if mask else 0
        if length < 126:
            head += bytes([mask_bit | length])
        elif length < 1 << 16:
            head += bytes([mask_bit | 126]) + struct.pack("!H", length)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def receive(self):
        """(opcode, payload) of the next frame from the gateway."""
        b0, b1 = self._take(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._take(8))
        return b0 & 0x0F, self._take(length)

    def close_code(self):
        """The code of the gateway's close frame (skipping other frames)."""
        while True:
            opcode, payload = self.receive()
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0]

    def ping(self):
        self.frame(1, b'{"event":"ping"}')
        return self.receive()

    def close(self):
        self.sock.close()


def listed(port):
    _, raw = request(port, "GET", "/tapr/ws/conn/list")
    return {entry["name"]: entry["conns_number"] + entry["public_conns_number"] for entry in json.loads(raw)["data"]}


ATTACKS = {
    "unmasked frame": (lambda c: c.frame(1, b"hello", mask=False), 1002),
    "invalid UTF-8 text": (lambda c: c.frame(1, b"\xff\xfe\xc3\x28"), 1007),
    "reserved opcode": (lambda c: c.frame(3, b"x"), 1002),
    "oversized control frame": (lambda c: c.frame(9, b"x" * 126), 1002),
    "fragmented control frame": (lambda c: c.frame(9, b"x", fin=False), 1002),
    "continuation without start": (lambda c: c.frame(0, b"x"), 1002),
    "huge declared length": (lambda c: c.frame(2, b"", length=1 << 40), 1009),
    "message over the limit": (lambda c: c.frame(1, b"x" * 5000), 1009),
    "endless fragments": (
        lambda c: [c.frame(1 if n == 0 else 0, b"y" * 100, fin=False) for n in range(60)],
        1009,
    ),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_broken_frames_close_the_offender_with_the_right_code(daemon, attack):
    bystander = Raw(daemon.port, "bystander")
    offender = Raw(daemon.port, "offender")
    send, expected = ATTACKS[attack]
    send(offender)
    assert offender.close_code() == expected
    offender.close()
    assert bystander.ping() == (1, b'{"event":"pong"}')
    assert "offender" not in listed(daemon.port)
    bystander.close()


@pytest.mark.parametrize(
    "handshake",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # no key
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(600)) + b"\r\n",
    ],
)
def test_malformed_handshakes_are_refused(daemon, handshake):
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        sock.sendall(handshake)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and not answer.startswith(b"HTTP/1.1 101"):
                break
    except ConnectionResetError:
        answer = b""
    finally:
        sock.close()
    assert not answer.startswith(b"HTTP/1.1 101")
    assert not answer.startswith(b"HTTP/1.1 5")
    bystander = Raw(daemon.port)
    assert bystander.ping() == (1, b'{"event":"pong"}')
    bystander.close()


def test_half_closed_client_is_cleaned_up(daemon):
    client = Raw(daemon.port, "halfway")
    assert listed(daemon.port).get("halfway") == 1
    client.sock.shutdown(socket.SHUT_WR)
    client.sock.settimeout(10)
    while True:  # the gateway ends the connection: no frames, then EOF
        try:
            if not client.sock.recv(65536):
                break
        except ConnectionResetError:
            break
    client.close()
    assert "halfway" not in listed(daemon.port)


def test_handshake_flood_from_one_peer_is_limited(tmp_path):
    with SyncDaemon("--rate-limit", "5", cwd=tmp_path) as daemon:
        # A burst of 10, then 5 a second: however fast this machine sends
        # handshakes, they are refused once the peer has had what that allows.
        started = time.monotonic()
        accepted = refused = 0
        while not refused and accepted < 1000:
            source = socket.create_connection(("127.0.0.1", daemon.port), timeout=10, source_address=("127.0.0.2", 0))
            source.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            status = source.recv(64)
            if status.startswith(b"HTTP/1.1 429"):
                refused += 1
            else:
                assert status.startswith(b"HTTP/1.1 101"), status
                accepted += 1
            source.close()
        elapsed = time.monotonic() - started
        assert refused == 1
        assert accepted <= 10 + 5 * elapsed + 1
        client = Raw(daemon.port)  # another peer (127.0.0.1) is served
        assert client.ping() == (1, b'{"event":"pong"}')
        client.close()
