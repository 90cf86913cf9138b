"""
The app agent reads answers as Twisted's own HTTP client does.

Generated answers (status lines, headers with odd whitespace, bare-LF
lines, every framing, Content-Length spelt many ways, chunks with and
without their CRLFs, extensions, trailers, interim 1xx answers, HTTP/1.0,
Connection and Keep-Alive, truncation) go, whole and split at random
points, to L{wsgw.appagent.AppAgent} and to Twisted's
C{HTTP11ClientProtocol}, each over a string transport; both must give the
same verdict: accepted with the same status and body, complete before the
connection ends or only at its end, or rejected.

Where Twisted accepts what RFC 9110/9112 ask a client to refuse or allow
it to, the agent refuses, and the expected verdict is a rejection:

  - C{Content-Length} given twice, even with one value (C{2}, C{2} or
    C{2, 2}): RFC 9110 8.6 allows either; llhttp refuses;
  - C{Content-Length} beside C{Transfer-Encoding} (RFC 9112 6.3: "ought to
    be handled as an error"; Twisted ignores the length);
  - a field value holding NUL (RFC 9110 5.5: reject or replace);
  - a version other than HTTP/1.x;
  - a malformed C{Content-Length} on an answer without a body (to HEAD,
    204, 304), which Twisted never reads and llhttp checks all the same.
"""

from __future__ import annotations

import os
from typing import List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, PotentialDataLoss, Request, ResponseDone
from twisted.web.http_headers import Headers

from wsgw.appagent import AppAgent, AppPool, BytesBody

URL = b"http://127.0.0.1:8888/ws/message"

Verdict = Tuple


class _Collect(Protocol):
    def __init__(self, out: dict) -> None:
        self.out = out
        self.parts: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.out["end"] = (reason, b"".join(self.parts))


def twisted_verdict(method: bytes, pieces: List[bytes]) -> Verdict:
    """What Twisted's HTTP/1.1 client makes of the answer."""
    protocol = HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    out: dict = {}
    d = protocol.request(Request(method, b"/ws/message", Headers({b"host": [b"app"]}), None, persistent=True))

    def got(response):
        out["response"] = response
        response.deliverBody(_Collect(out))

    d.addCallbacks(got, lambda f: out.setdefault("error", f))
    for piece in pieces:
        if "end" in out or "error" in out:
            break
        protocol.dataReceived(piece)
    early = "end" in out or "error" in out
    if not early:
        protocol.connectionLost(Failure(ConnectionDone()))
    if "error" in out:
        return ("rejected",)
    reason, body = out["end"]
    if not reason.check(ResponseDone, PotentialDataLoss):
        return ("rejected",)
    return ("accepted", out["response"].code, body, early)


class _Transport(StringTransport):
    protocol = None

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.loseConnection()


class _Endpoints:
    def __init__(self) -> None:
        self.transports: List[_Transport] = []

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        from twisted.internet.defer import succeed

        protocol = factory.buildProtocol(None)
        transport = _Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


def agent_verdict(method: bytes, pieces: List[bytes]) -> Verdict:
    """What the app agent makes of the answer."""
    clock = Clock()
    endpoints = _Endpoints()
    agent = AppAgent(clock, endpoints, AppPool(clock))
    body = None if method == b"HEAD" else BytesBody(b"{}")
    d = agent.request(method, URL, Headers(), body)
    out: list = []
    d.addBoth(out.append)
    [transport] = endpoints.transports
    for piece in pieces:
        if out:
            break
        transport.protocol.dataReceived(piece)
    early = bool(out)
    if not early:
        transport.loseConnection()
    [result] = out
    if isinstance(result, Failure):
        return ("rejected",)
    return ("accepted", result.code, result.body, early)


# The answers.

EOLS = st.sampled_from([b"\r\n", b"\n"])
TOKENS = st.sampled_from([b"X-A", b"Server", b"Content-Type", b"Date", b"x-lower", b"Keep-Alive"])
VALUES = st.sampled_from([b"v", b"a b", b"", b"timeout=5", b"text/plain; charset=utf-8", b"\xe9t\xe9"])
OWS = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])


@st.composite
def header_line(draw) -> Tuple[bytes, bool]:
    """An ordinary field line, and whether only Twisted would accept it."""
    name = draw(TOKENS)
    value = draw(VALUES)
    odd = draw(st.sampled_from(["plain"] * 12 + ["space-before-colon", "nul"]))
    if odd == "space-before-colon":
        return name + b" :" + value, False  # both refuse
    if odd == "nul":
        return name + b": a\x00" + value, True
    return name + b":" + draw(OWS) + value + draw(OWS), False


def _chunk(draw, data: bytes) -> bytes:
    size = b"%x" % len(data)
    if draw(st.booleans()):
        size = size.upper()
    size = draw(st.sampled_from([b"", b"0", b"00"])) + size if draw(st.integers(0, 4)) == 0 else size
    ext = draw(st.sampled_from([b"", b"", b";a=b", b";x", b' ;q="v"']))
    after = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"", b"XX", b"\r"]))
    return size + ext + b"\r\n" + data + after


@st.composite
def answer(draw) -> Tuple[bytes, bytes, bool]:
    """C{(method, answer, ours_stricter)}."""
    method = draw(st.sampled_from([b"POST", b"POST", b"POST", b"HEAD"]))
    eol = draw(EOLS)
    stricter = False
    interim = b""
    for _ in range(draw(st.integers(0, 2))):
        interim += b"HTTP/1.1 " + draw(st.sampled_from([b"100 Continue", b"102 Processing", b"103 Early Hints"])) + eol
        if draw(st.booleans()):
            interim += b"Link: </a>" + eol
        interim += eol
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/2.0"]))
    if version == b"HTTP/2.0":
        stricter = True
    code = draw(st.sampled_from([200, 201, 202, 204, 301, 304, 400, 404, 408, 429, 500, 503]))
    phrase = draw(st.sampled_from([b" OK", b" ", b"", b" Some Reason"]))
    lines = [version + b" %d" % code + phrase]
    for _ in range(draw(st.integers(0, 3))):
        line, only_twisted = draw(header_line())
        lines.append(line)
        stricter = stricter or only_twisted
    connection = draw(st.sampled_from([None, None, b"close", b"keep-alive", b"Keep-Alive"]))
    if connection is not None:
        lines.append(b"Connection: " + connection)
    body = draw(st.binary(max_size=12))
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked"] * 4 + ["close", "close", "none", "both"]))
    payload = b""
    if framing in ("length", "both"):
        n = len(body)
        spelt = draw(
            st.sampled_from(
                [b"%d" % n] * 8
                + [
                    b"0%d" % n,
                    b"+%d" % n,
                    b"%d_0" % n,
                    b"%d, %d" % (n, n),
                    b"%d,%d" % (n, n + 1),
                    b"",
                    b"-%d" % n,
                    b"%x" % (n + 10),
                ]
            )
        )
        lines.append(b"Content-Length:" + draw(OWS) + spelt + draw(OWS))
        if spelt == b"%d, %d" % (n, n):
            stricter = True
        if not spelt.isdigit() and (method == b"HEAD" or code in (204, 304)):
            stricter = True  # Twisted never reads the length of an answer without a body
        if draw(st.integers(0, 12)) == 0:
            lines.append(b"Content-Length: %d" % n)
            stricter = True
        payload = body
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"chunked", b"Chunked", b"gzip"])))
        if framing == "both":
            stricter = True
        cut = draw(st.integers(0, len(body)))
        payload = b""
        for data in (body[:cut], body[cut:]):
            if data:
                payload += _chunk(draw, data)
        payload += b"0" + draw(st.sampled_from([b"", b";end"])) + b"\r\n"
        if draw(st.booleans()):
            payload += b"X-Trailer: t\r\n"
        payload += b"\r\n"
    if framing == "close":
        payload = body
    head = eol.join(lines) + eol + eol
    data = interim + head + payload
    if draw(st.integers(0, 6)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # the app died mid-answer
    elif draw(st.integers(0, 6)) == 0:
        data += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\n\r\n", b"junk", b"\r\n"]))
    return method, data, stricter


@st.composite
def split(draw, data: bytes) -> List[bytes]:
    points = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [data]


@settings(
    max_examples=int(os.environ.get("WSGW_DIFF_EXAMPLES", "600")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_same_verdict_as_twisted(data) -> None:
    method, raw, stricter = data.draw(answer())
    pieces = data.draw(split(raw))
    expected = ("rejected",) if stricter else twisted_verdict(method, [raw])
    assert agent_verdict(method, [raw]) == expected, raw
    assert agent_verdict(method, pieces) == expected, pieces
    if not stricter:
        # Twisted's own verdict does not depend on the split either.
        assert twisted_verdict(method, pieces) == expected


def test_the_rejections_the_agent_adds_are_accepted_by_twisted() -> None:
    """The divergences listed above are real: Twisted accepts each."""
    for raw in [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ]:
        assert twisted_verdict(b"POST", [raw])[0] == "accepted", raw
        assert agent_verdict(b"POST", [raw]) == ("rejected",), raw
