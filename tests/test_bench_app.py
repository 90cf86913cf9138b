"""
The bench's app (bench/node/app.js) answers every server under test with
the bytes Node's `http` server wrote for the same calls, so that figures
from before and after it moved to plain `net` compare: the status line,
the handler's headers in order, Date, Connection and Keep-Alive, chunked
when no length is given.  It reads requests as the servers send them
(by length or chunked, split anywhere, pipelined, HTTP/1.0), refuses
what it cannot read with a 400, and goes on serving everyone else.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

from harness import _node, ensure_node_modules

APP = Path(__file__).resolve().parent.parent / "bench" / "node" / "app.js"
DATE = re.compile(rb"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")
KEEP = b"Connection: keep-alive\r\nKeep-Alive: timeout=120\r\n"
EVENT = b'{"action":"message","conn_id":"c1","data":{"c":1,"s":0}}'


@pytest.fixture(scope="module")
def app() -> Iterator[int]:
    ensure_node_modules()
    config = {
        "port": 0,
        "wsgwSend": "http://127.0.0.1:9/",
        "pushpinPublish": "http://127.0.0.1:9/",
        "nchanPublish": "http://127.0.0.1:9/",
    }
    proc = subprocess.Popen([_node(), str(APP), json.dumps(config)], stdout=subprocess.PIPE, cwd=APP.parent)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the app says its port once it listens
        yield json.loads(line)["listening"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def exchange(port: int, pieces: List[bytes], answers: int = 1, eof: bool = False) -> bytes:
    """
    Send C{pieces} one write each; read until C{answers} answers came (with
    C{eof}, until the app closes; C{<EOF>} marks that it did).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for piece in pieces:
            sock.sendall(piece)
        got = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return got + b"<EOF>"
            got += data
            if not eof and _complete(got) >= answers:
                return got


def _complete(data: bytes) -> int:
    """How many whole answers C{data} holds (by Content-Length, chunked or bodiless)."""
    count, rest = 0, data
    while True:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            return count
        head, rest = rest[:end], rest[end + 4 :]
        length = re.search(rb"Content-Length: (\d+)", head)
        if length:
            if len(rest) < int(length.group(1)):
                return count
            rest = rest[int(length.group(1)) :]
        elif b"Transfer-Encoding: chunked" in head:
            last = rest.find(b"0\r\n\r\n")
            if last < 0:
                return count
            rest = rest[last + 5 :]
        count += 1


def post(path: bytes, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST %s HTTP/%s\r\nHost: app\r\n%sContent-Length: %d\r\n\r\n%s" % (path, version, extra, len(body), body)


def undated(answer: bytes) -> bytes:
    assert DATE.search(answer), answer
    return DATE.sub(b"", answer, count=1)


def control(port: int, mode: str) -> None:
    exchange(port, [post(b"/control", json.dumps({"mode": mode}).encode())])


def stats(port: int) -> dict:
    answer = exchange(port, [b"GET /stats HTTP/1.1\r\nHost: app\r\n\r\n"])
    body = answer.split(b"\r\n\r\n", 1)[1]
    size, _, rest = body.partition(b"\r\n")
    return json.loads(rest[: int(size, 16)])


def test_answers_are_the_bytes_node_http_wrote(app: int) -> None:
    control(app, "count")
    assert undated(exchange(app, [post(b"/wsgw/ev", EVENT)])) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n" + KEEP + b"\r\n{}"
    )
    assert undated(exchange(app, [post(b"/nchan/x", EVENT)])) == b"HTTP/1.1 204 No Content\r\n" + KEEP + b"\r\n"
    opened = exchange(app, [post(b"/pushpin/x", b"OPEN\r\n", b"Connection-Id: 7\r\n")])
    assert undated(opened) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/websocket-events\r\nSec-WebSocket-Extensions: grip\r\n"
        b"Content-Length: 58\r\n" + KEEP + b'\r\nOPEN\r\nTEXT 29\r\nc:{"type":"subscribe","channel":"conn-7"}\r\n'
    )
    assert undated(exchange(app, [b"GET /nope HTTP/1.1\r\nHost: app\r\n\r\n"])) == (
        b"HTTP/1.1 404 Not Found\r\n" + KEEP + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    mode = exchange(app, [post(b"/control", b'{"mode":"reply"}')])
    assert undated(mode) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + KEEP
        + b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"mode":"reply"}\r\n0\r\n\r\n'
    )
    assert undated(exchange(app, [post(b"/wsgw/ev", EVENT)])) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\nX-Wsgw-Reply: 1\r\n"
        + KEEP
        + b'\r\n{"c":1,"s":0}'
    )
    control(app, "count")


def test_requests_split_anywhere_pipelined_or_chunked_are_all_read_in_order(app: int) -> None:
    control(app, "count")
    events = [post(b"/wsgw/ev", b'{"action":"message","conn_id":"c9","data":{"c":9,"s":%d}}' % s) for s in range(3)]
    chunked = b"POST /wsgw/ev HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b'{"action":"message","conn_id":"c9","data":{"c":9,"s":3}}'
    chunked += b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    wire = b"".join(events) + chunked
    # Three requests in one write, then the last one byte by byte.
    answers = exchange(
        app, [b"".join(events)] + [wire[i : i + 1] for i in range(len(b"".join(events)), len(wire))], answers=4
    )
    assert answers.count(b"HTTP/1.1 200 OK") == 4
    seen = stats(app)
    assert (seen["unique"], seen["dup"], seen["reordered"]) == (4, 0, 0)


def test_http_1_0_closes_unless_asked_to_keep_alive(app: int) -> None:
    closed = exchange(app, [post(b"/wsgw/ev", EVENT, version=b"1.0")], eof=True)
    assert b"Connection: close\r\n" in closed and closed.endswith(b"{}<EOF>")
    kept = exchange(app, [post(b"/wsgw/ev", EVENT, b"Connection: keep-alive\r\n", version=b"1.0")])
    assert KEEP in kept and not kept.endswith(b"<EOF>")
    asked = exchange(app, [post(b"/wsgw/ev", EVENT, b"Connection: close\r\n")], eof=True)
    assert asked.endswith(b"{}<EOF>")


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello\r\n\r\n",
        b"POST /wsgw HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /wsgw HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /wsgw HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /wsgw HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_an_unreadable_request_is_answered_400_and_the_app_serves_on(app: int, garbage: bytes) -> None:
    assert exchange(app, [garbage], eof=True) == b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n<EOF>"
    assert exchange(app, [post(b"/nchan/x", EVENT)]).startswith(b"HTTP/1.1 204 No Content\r\n")
