"""
The lean API channel (L{wsgw.apiserver}) answers exactly as the site's own
twisted.web channel: the same raw HTTP, fed to both in memory with time on
a Clock, gets the same bytes back (the C{Date} aside), the same closing of
the connection and the same log lines.  Last, the daemon serves them so
over TCP and TLS alike.
"""

import json
import re
import socket
import ssl

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security import make_certificate
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harness import start_daemon
from wsgw.apiserver import ApiChannel, LeanRequest, parse_head
from wsgw.config import Config
from wsgw.service import make_node
from wsgw.web import GatewaySite, make_resource

LOCAL = IPv4Address("TCP", "127.0.0.1", 5555)
REMOTE = IPv4Address("TCP", "10.1.2.3", 5555)
MAX_BODY = 300
HANDSHAKE_TIMEOUT = 5.0
_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")

CONFIGS = {
    "default": Config(max_api_body=MAX_BODY, handshake_timeout=HANDSHAKE_TIMEOUT),
    "token": Config(max_api_body=MAX_BODY, handshake_timeout=HANDSHAKE_TIMEOUT, admin_token="s3cret"),
    "rate": Config(max_api_body=MAX_BODY, handshake_timeout=HANDSHAKE_TIMEOUT, rate_limit=1.0),
}


class Served:
    """One connection to a node's site, through the lean channel or the site's own."""

    def __init__(self, config: Config, lean: bool, peer=LOCAL):
        self.clock = Clock()
        node = make_node(config, reactor=self.clock)
        self.site = GatewaySite(make_resource(node), config, reactor=self.clock)
        self.channel = self.site.api_channel(peer) if lean else self.site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.transport.protocol = self.channel  # as a TCP transport has it (the hand-over sets it)
        self.channel.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        # After a hand-over the transport's protocol is the site's channel.
        if not (self.transport.disconnecting or self.transport.disconnected):
            self.transport.protocol.dataReceived(data)

    def close(self) -> None:
        if not self.transport.disconnected:
            self.transport.protocol.connectionLost(None)

    def output(self) -> bytes:
        return _DATE.sub(b"\r\nDate: -\r\n", self.transport.value())


def run_both(config: Config, chunks, peer=LOCAL):
    """(output, closing, log lines) of each channel fed the same chunks."""
    results = []
    for lean in (True, False):
        lines = []

        def observer(event, lines=lines):
            if event.get("log_namespace", "").startswith("wsgw"):
                lines.append(_ADDRESS.sub("", formatEvent(event)))

        globalLogPublisher.addObserver(observer)
        served = Served(config, lean, peer)
        try:
            for chunk in chunks:
                served.feed(chunk)
            results.append((served.output(), served.transport.disconnecting, lines))
        finally:
            served.close()
            globalLogPublisher.removeObserver(observer)
    return results


def request(method=b"POST", path=b"/tapr/ws/conn/send", version=b"HTTP/1.1", headers=(), body=b"", length=True):
    head = [b"%s %s %s" % (method, path, version), b"Host: localhost"]
    head.extend(headers)
    if length:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(body: bytes) -> bytes:
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


BODIES = [
    b'{"conn_id":"c1","payload":{"a":1}}',
    b'{"users":["u"],"text":"hi"}',
    b'{"tokens":["t"],"binary":"aGk="}',
    b'{"conn_id":"c1","binary":"!!"}',
    b'{"conn_id":"c1","text":1}',
    b'{"payload":1}',
    b'{"conns":["a",""]}',
    b'{"conn_id":"c1","users_access_type":3}',
    b"[1,2]",
    b"{nope",
    b"",
    b'{"conn_id":"' + b"x" * MAX_BODY + b'"}',
]
PATHS = [
    b"/tapr/ws/conn/send",
    b"/tapr/ws/conn/close",
    b"/tapr/ws/conn/list",
    b"/tapr/ws/conn/list?x=1",
    b"/tapr/ws/conn/%73end",
    b"/tapr/ws/conn/nope",
    b"/tapr/ws/conn",
    b"/tapr/ws/conn/",
    b"/tapr/",
    b"/tapr/ws",
    b"/tapr/ws/conn/send/more",
    b"/readyz",
    b"/healthz",
    b"/nope",
]
HEADERS = [
    b"Connection: close",
    b"Connection: keep-alive",
    b"connection: Keep-Alive close",
    b"Authorization: Bearer s3cret",
    b"Authorization: Bearer wrong",
    b"Content-Type: application/json",
    b"Content-Type: application/x-www-form-urlencoded",
    b"X-Odd:   spaced value \t",
    b"X-Twice: 1",
    b"X-Twice: 2",
    b"Expect: 100-continue",
    b"Upgrade: h2c",
    b"Bad Name: x",
    b" folded",
    b"Content-Length: 3",
    b"Content-Length: x1",
]


@st.composite
def requests(draw):
    method = draw(st.sampled_from([b"POST", b"POST", b"GET", b"PUT", b"HEAD", b"DELETE"]))
    body = draw(st.sampled_from(BODIES))
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=3, unique=True))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    path = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 9)) == 0:
        return request(method, path, version, [*headers, b"Transfer-Encoding: chunked"], chunked(body), length=False)
    return request(method, path, version, headers, body)


def split(data: bytes, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(sorted(CONFIGS)),
    pipelined=st.lists(requests(), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    remote=st.booleans(),
)
def test_both_channels_answer_the_same_bytes(config, pipelined, cuts, remote):
    """Whatever the requests (pipelined, cut anywhere, served or handed
    over), the lean channel's answers are the site channel's to the byte."""
    data = b"".join(pipelined)
    lean, site = run_both(CONFIGS[config], split(data, cuts), REMOTE if remote else LOCAL)
    assert lean == site


@pytest.mark.parametrize(
    "data",
    [
        request(body=BODIES[0]),
        request(body=BODIES[0], headers=[b"Connection: close"]),
        request(b"GET", b"/tapr/ws/conn/list", b"HTTP/1.0"),
        request(body=BODIES[-1]),
        request(b"GET", b"/tapr/ws/conn/list") + request(body=BODIES[1]) + request(b"PUT", b"/tapr/ws/conn/send"),
        request(body=BODIES[0], headers=[b"Transfer-Encoding: chunked"], length=False) + chunked(BODIES[0]),
        b"\r\n" + request(body=BODIES[0]),
        b"GET /tapr/ws/conn/list HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"GET /tapr/ws/conn/list HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n",
        b"GET /tapr/ws/conn/list HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxx",
        b"GET  /tapr/ws/conn/list HTTP/1.1\r\n\r\n",
        b"GET /tapr/ws/conn/list HTTP/2.0\r\n\r\n",
        b"GET /tapr/ws/conn/list\r\n\r\n",
    ],
)
def test_chosen_requests_get_the_same_answer(data):
    for config in CONFIGS.values():
        lean, site = run_both(config, [data])
        assert lean == site
        lean, site = run_both(config, [data[i : i + 1] for i in range(len(data))])
        assert lean == site


class Answers(Resource):
    """Answers with C{code} and C{body} and no C{Content-Type}, returned or written."""

    isLeaf = True

    def __init__(self, code, body, written):
        super().__init__()
        self.code, self.body, self.written = code, body, written

    def render(self, request):
        request.setResponseCode(self.code)
        if not self.written:
            return self.body
        request.write(self.body)
        request.finish()
        return NOT_DONE_YET


@pytest.mark.parametrize("code", [200, 204, 304, 404])
@pytest.mark.parametrize("body", [b"", b"x"])
@pytest.mark.parametrize("written", [False, True])
def test_an_answer_without_a_type_gets_twisted_webs_default_or_none_alike(code, body, written):
    """twisted.web adds C{text/html} unless the answer is a 204, a 304 or empty; so does the lean channel."""
    outputs = []
    for lean in (True, False):
        served = Served(CONFIGS["default"], lean)
        served.site.resource.children[b"tapr"].putChild(b"extra", Answers(code, body, written))
        served.feed(request(b"GET", b"/tapr/extra"))
        if lean:
            assert served.transport.protocol is served.channel  # served there, not handed over
        outputs.append(served.output())
        served.close()
    assert outputs[0] == outputs[1]


def test_the_send_path_is_served_without_twisted_web():
    """A plain call is served by the lean channel itself (no hand-over)."""
    served = Served(CONFIGS["default"], lean=True)
    served.feed(request(body=BODIES[0]) * 3)
    assert served.transport.protocol is served.channel
    assert served.output().count(b"HTTP/1.1 200 OK\r\n") == 3
    served.close()


def test_anything_else_is_handed_to_the_site_from_that_request_on():
    served = Served(CONFIGS["default"], lean=True)
    served.feed(request(body=BODIES[0]) + request(b"GET", b"/healthz") + request(body=BODIES[0]))
    assert not isinstance(served.transport.protocol, ApiChannel)
    assert served.output().count(b"HTTP/1.1 200 OK\r\n") == 3
    served.close()


def test_http10_and_connection_close_end_the_connection_and_drop_what_follows():
    for headers, version in (([b"Connection: close"], b"HTTP/1.1"), ([], b"HTTP/1.0")):
        served = Served(CONFIGS["default"], lean=True)
        served.feed(request(version=version, headers=headers, body=BODIES[0]) + request(body=BODIES[0]))
        assert served.transport.disconnecting
        assert served.output().count(b" 200 OK\r\n") == 1
        served.close()


@pytest.mark.parametrize("lean", [True, False])
def test_a_connection_that_sends_nothing_is_dropped_at_the_deadline(lean):
    served = Served(CONFIGS["default"], lean)
    served.feed(b"POST /tapr/ws/conn/send HTTP/1.1\r\n")
    served.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not served.transport.disconnecting
    served.clock.advance(0.1)
    assert served.transport.disconnecting and served.transport.disconnected  # aborted
    served.close()


@pytest.mark.parametrize("lean", [True, False])
def test_an_api_connection_idle_a_minute_is_closed(lean):
    served = Served(CONFIGS["default"], lean)
    served.feed(request(body=BODIES[0]))
    served.clock.advance(59)
    served.feed(request(body=BODIES[0]))
    served.clock.advance(59)
    assert not served.transport.disconnecting
    served.clock.advance(1.5)
    assert served.transport.disconnecting
    served.close()


def test_a_later_answer_holds_back_the_pipelined_requests():
    """A resource that answers later (a cluster's send) is written before
    what was pipelined behind it, and the connection is not read meanwhile."""
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    class Later(Resource):
        isLeaf = True

        def __init__(self):
            super().__init__()
            self.waiting = []

        def render(self, request):
            self.waiting.append(request)
            return NOT_DONE_YET

    later = Later()
    clock = Clock()
    config = CONFIGS["default"]
    site = GatewaySite(make_resource(make_node(config, reactor=clock)), config, reactor=clock)
    site.resource.children[b"tapr"].putChild(b"later", later)
    channel = site.api_channel(LOCAL)
    transport = StringTransport(peerAddress=LOCAL)
    channel.makeConnection(transport)
    channel.dataReceived(request(b"GET", b"/tapr/later") + request(b"GET", b"/tapr/ws/conn/list"))
    assert transport.value() == b"" and transport.producerState == "paused"
    pending = later.waiting.pop()
    pending.setHeader(b"Content-Type", b"application/json")
    pending.write(b'{"late":1}')
    pending.finish()
    first, _, rest = transport.value().partition(b"0\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in first and first.endswith(b'{"late":1}\r\n')
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and transport.producerState == "producing"
    channel.connectionLost(None)


def test_the_head_parser_takes_only_what_it_serves_as_twisted_web_would():
    method, target, version, headers, length = parse_head(
        b"POST /tapr/ws/conn/send HTTP/1.1\r\nHost: a\r\nX-A:  1 \r\nx-a: 2\r\nContent-Length: 12", MAX_BODY
    )
    assert (method, target, version, length) == (b"POST", b"/tapr/ws/conn/send", b"HTTP/1.1", 12)
    assert headers == {b"host": [b"a"], b"x-a": [b"1", b"2"], b"content-length": [b"12"]}
    for refused in (
        b"PUT /tapr/ws/conn/send HTTP/1.1",
        b"GET /ws HTTP/1.1",
        b"GET /tapr/ws/conn/send HTTP/1.1\r\nContent-Length: %d" % (MAX_BODY + 1),
        b"GET /tapr/ws/conn/send HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /tapr/ws/conn/send HTTP/1.1\r\nX: a\r\n b",
    ):
        assert parse_head(refused, MAX_BODY) is None


def test_answers_are_json_as_before():
    served = Served(CONFIGS["default"], lean=True)
    served.feed(request(body=b'{"conn_id":"c1","payload":1}'))
    head, _, body = served.output().partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[1:] == [
        b"Server: " + __import__("twisted.web.server").web.server.version,
        b"Date: -",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
    ]
    assert json.loads(body) == {"code": 0, "message": "success", "data": {"matched": 0}}
    served.close()


PIPELINE = (
    request(body=b'{"conn_id":"c1","payload":1}')
    + request(b"GET", b"/tapr/ws/conn/list")
    + request(body=b"{nope")
    + request(b"GET", b"/healthz")  # handed to twisted.web from here on
    + request(body=b'{"conn_id":"c1","payload":1}', headers=[b"Connection: close"])
)


def _exchange(port: int, context=None) -> bytes:
    """PIPELINE on one connection, in one write; every byte until the daemon closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        conn = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        conn.sendall(PIPELINE)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
        return _DATE.sub(b"\r\nDate: -\r\n", out)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_daemon_serves_pipelined_calls_alike_over_tcp_and_tls(tmp_path):
    key_path, cert_path = make_certificate(tmp_path)
    daemon = await start_daemon(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
        cwd=tmp_path,
        listeners=2,
    )
    try:
        context = ssl.create_default_context(cafile=str(cert_path))
        plain = await deferToThread(_exchange, daemon.ports[0])
        secure = await deferToThread(_exchange, daemon.ports[1], context)
    finally:
        await daemon.terminate()
    assert plain == secure
    assert plain.count(b"HTTP/1.1 ") == 5
    assert plain.split(b"HTTP/1.1 ")[1:] and [a.split(b" ")[0] for a in plain.split(b"HTTP/1.1 ")[1:]] == [
        b"200",
        b"200",
        b"400",
        b"200",
        b"200",
    ]


class FailingConnections:
    """Connections whose send fails at once (a bug below the API)."""

    def send(self, payload, targets, binary):
        from twisted.internet.defer import fail

        return fail(RuntimeError("boom"))


def test_a_send_that_failed_at_once_is_a_json_500_logged_once():
    import gc

    from wsgw.api import JsonTree, conn_api

    root = JsonTree()
    root.putChild(b"tapr", conn_api(FailingConnections(), MAX_BODY))
    outputs = []
    for lean in (True, False):
        failures = []

        def observer(event, failures=failures):
            if "log_failure" in event:
                failures.append(event["log_failure"])

        globalLogPublisher.addObserver(observer)
        try:
            site = GatewaySite(root, CONFIGS["default"], reactor=Clock())
            channel = site.api_channel(LOCAL) if lean else site.buildProtocol(LOCAL)
            transport = StringTransport(peerAddress=LOCAL)
            channel.makeConnection(transport)
            channel.dataReceived(request(path=b"/tapr/send", body=BODIES[0]))
            channel.connectionLost(None)
            gc.collect()
        finally:
            globalLogPublisher.removeObserver(observer)
        assert [f.value.args for f in failures] == [("boom",)]
        outputs.append(_DATE.sub(b"", transport.value()))
    assert outputs[0] == outputs[1]
    head, _, body = outputs[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert json.loads(body) == {"code": 500, "message": "internal error; see the gateway's log"}


@st.composite
def one_head_many_lengths(draw):
    """Requests with one head but for their Content-Length (spelt and spaced in any way), bodies of any length."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT"]))
    path = draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    before = draw(st.lists(st.sampled_from(HEADERS), max_size=2, unique=True))
    after = draw(st.lists(st.sampled_from(HEADERS), max_size=2, unique=True))
    name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
    space = draw(st.sampled_from([b"", b" ", b"  ", b"\t"]))
    trail = draw(st.sampled_from([b"", b"", b" "]))
    made = []
    for body in draw(st.lists(st.sampled_from(BODIES) | st.binary(max_size=40), min_size=1, max_size=3)):
        digits = draw(st.sampled_from([b"%d" % len(body), b"0%d" % len(body)]))
        lines = [b"%s %s %s" % (method, path, version), *before, name + b":" + space + digits + trail, *after]
        made.append(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return made


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(sorted(CONFIGS)),
    pool=st.lists(requests(), min_size=1, max_size=3) | one_head_many_lengths(),
    order=st.lists(st.integers(0, 2), min_size=2, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
)
def test_a_head_read_again_is_answered_as_the_first_time(config, pool, order, cuts):
    """The lean channel reads a head that repeats the one before it, its
    length aside, without parsing it again; requests repeated in any
    order, cut anywhere, are answered as the site channel answers them."""
    data = b"".join(pool[i % len(pool)] for i in order)
    lean, site = run_both(CONFIGS[config], split(data, cuts))
    assert lean == site


def test_the_same_head_is_parsed_once_per_run_of_it(monkeypatch):
    """A keep-alive client's calls with the same head are not parsed again; a different head is."""
    import wsgw.apiserver

    parsed = []
    real = wsgw.apiserver.parse_head
    monkeypatch.setattr(wsgw.apiserver, "parse_head", lambda head, limit: parsed.append(head) or real(head, limit))
    one, other = request(body=BODIES[0]), request(b"GET", b"/tapr/ws/conn/list")
    longer = request(body=BODIES[0][:-1] + b',"users":["u"]}')
    served = Served(Config(), True)
    for data in (one, longer, one, other, one):
        served.feed(data)
    assert len(parsed) == 3
    assert served.output().count(b"HTTP/1.1 200 OK") == 5
    served.close()


def test_a_known_head_is_read_again_as_parse_head_reads_it():
    """Its length's digits changed (and nothing else), a head is read as
    parse_head reads it; changed in any other way, or spaced so that
    parse_head would strip its value, it is parsed again."""
    from wsgw.apiserver import KnownHead

    first = b"POST /tapr/ws/conn/send HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nX-A: b"
    known = KnownHead.of(first, parse_head(first, 1000))
    for raw in (first, first.replace(b": 12", b": 7"), first.replace(b": 12", b": 0999")):
        assert known.again(raw, 1000) == parse_head(raw, 1000)
    for raw in (
        first.replace(b": 12", b": 1001"),  # over the limit: twisted.web answers it
        first.replace(b": 12", b": 1 2"),
        first.replace(b": 12", b": 12 "),
        first.replace(b": 12", b": "),
        first.replace(b"X-A: b", b"X-A: c"),
        first.replace(b"Host: h", b"Host: i"),
    ):
        assert known.again(raw, 1000) is None
    last = b"POST /tapr/ws/conn/send HTTP/1.1\r\ncontent-length:5"
    assert KnownHead.of(last, parse_head(last, 10)).again(last[:-1] + b"9", 10) == parse_head(last[:-1] + b"9", 10)
    bodiless = b"GET /tapr/ws/conn/list HTTP/1.1\r\nHost: h"
    assert KnownHead.of(bodiless, parse_head(bodiless, 10)).again(bodiless + b"x", 10) is None


@given(
    uri=st.builds(
        lambda parts, query: b"/" + b"/".join(parts) + query,
        st.lists(st.sampled_from([b"tapr", b"ws", b"", b"%73end", b"a%2Fb", b"%", b"x%zz", b"send"]), max_size=5),
        st.sampled_from([b"", b"?", b"?a=1", b"?a/b%20"]),
    )
)
def test_a_target_is_split_as_before_it_was_remembered(uri):
    """A request's path and postpath are what splitting its target per request made, and each request has its own postpath."""
    from urllib.parse import unquote_to_bytes

    path = uri.split(b"?", 1)[0]
    segments = path[1:].split(b"/")
    expected = [unquote_to_bytes(p) for p in segments] if b"%" in path else segments
    first, second = (LeanRequest(None, b"GET", uri, b"HTTP/1.1", {}, b"") for _ in range(2))
    assert (first.path, first.postpath) == (path, expected)
    first.postpath.pop()
    assert (second.path, second.postpath) == (path, expected)


@pytest.mark.parametrize(
    "value", [b"close", b"Close", b"keep-alive", b"keep-alive close", b"x,close", b"", b"CLOSE  x"]
)
def test_a_connection_header_asks_to_close_as_before(value):
    from wsgw.apiserver import asks_to_close

    assert asks_to_close(value) == (b"close" in value.lower().split(b" "))
