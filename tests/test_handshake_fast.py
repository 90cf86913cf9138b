"""
The opening handshake read in one pass (L{wsgw.internals.read_handshake})
does what Autobahn's own C{processHandshake} does: the same answer, byte
for byte, the same state left on the protocol, the same connection in the
registry, for well-formed and malformed requests alike; in memory.
"""

import hashlib
import inspect

import pytest
from autobahn.websocket.protocol import WebSocketServerProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wsgw import internals
from wsgw.config import Config
from wsgw.service import make_node
from wsgw.web import websocket_factory

PEER = IPv4Address("TCP", "127.0.0.1", 5555)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="

#: What Autobahn's processHandshake leaves on the protocol.
FIELDS = (
    "state",
    "data",
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_version",
    "websocket_protocols",
    "websocket_origin",
    "websocket_extensions",
    "websocket_protocol_in_use",
    "_wskey",
    "wasNotCleanReason",
    "peer",
)


def _factory(**settings):
    config = Config(max_connections=0, max_connections_per_user=0, **settings)
    node = make_node(config, reactor=Clock())
    return node, websocket_factory(node)


def _connected(factory, fast: bool, patch=None):
    """A protocol of C{factory} on a transport, reading handshakes in one pass (C{fast}) or by Autobahn alone."""
    protocol = factory.buildProtocol(PEER)
    if not fast:
        protocol.processHandshake = lambda p=protocol: WebSocketServerProtocol.processHandshake(p)
    if patch is not None:
        patch(protocol)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def _shake(request: bytes, fast: bool, **settings):
    """Answer C{request} with the one-pass reading (C{fast}) or Autobahn's alone."""
    node, factory = _factory(**settings)
    protocol, transport = _connected(factory, fast)
    protocol.dataReceived(request)
    missing = "<unset>"
    # onOpen lets go of the request's fields (drop_handshake_leftovers); both paths alike.
    state = {name: getattr(protocol, name, missing) for name in FIELDS}
    users = sorted(c.user_name for c in node.gateway.registry)
    return transport.value(), transport.disconnecting, state, users


def _request(line: str, headers, tail: bytes = b"") -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("iso-8859-1") + tail


GOOD = [
    "Host: localhost:40010",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
    "X-Bfl-User: alice",
]


def test_a_plain_upgrade_is_read_in_one_pass(monkeypatch):
    """The usual handshake never reaches Autobahn's parser, and is answered
    with 101 as before."""
    from autobahn.websocket import protocol as autobahn_protocol

    parsed = []
    real = autobahn_protocol.parseHttpHeader
    monkeypatch.setattr(autobahn_protocol, "parseHttpHeader", lambda data: parsed.append(data) or real(data))
    answer, _, state, users = _shake(_request("GET /ws HTTP/1.1", GOOD), fast=True)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert parsed == []
    assert users == ["alice"]
    assert state["state"] == WebSocketServerProtocol.STATE_OPEN


def test_a_refused_handshake_is_left_to_autobahn(monkeypatch):
    """A request Autobahn refuses is read by Autobahn, which says why."""
    from autobahn.websocket import protocol as autobahn_protocol

    parsed = []
    real = autobahn_protocol.parseHttpHeader
    monkeypatch.setattr(autobahn_protocol, "parseHttpHeader", lambda data: parsed.append(data) or real(data))
    headers = [h for h in GOOD if not h.startswith("Sec-WebSocket-Key")] + ["Sec-WebSocket-Key: short=="]
    answer, disconnecting, _, users = _shake(_request("GET /ws HTTP/1.1", headers), fast=True)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"bad Sec-WebSocket-Key" in answer
    assert disconnecting and users == [] and len(parsed) == 1


def test_with_autobahns_debug_lines_on_autobahn_reads_the_handshake():
    """Debug logging on: Autobahn's own path runs, so its debug lines are written."""
    _node, factory = _factory()
    protocol = factory.buildProtocol(PEER)
    level = protocol.log._log_level
    try:
        protocol.log._set_log_level("debug")
        assert not internals.debug_is_off(protocol)
        protocol.makeConnection(StringTransport(peerAddress=PEER))
        protocol.data = _request("GET /ws HTTP/1.1", GOOD)
        assert internals.read_handshake(protocol) is False
        assert protocol.data == _request("GET /ws HTTP/1.1", GOOD)  # nothing was taken
    finally:
        protocol.log._set_log_level(level)
    assert internals.debug_is_off(protocol)


def test_an_incomplete_head_is_left_as_it_is():
    _node, factory = _factory()
    protocol = factory.buildProtocol(PEER)
    protocol.makeConnection(StringTransport(peerAddress=PEER))
    protocol.data = _request("GET /ws HTTP/1.1", GOOD)[:-2]
    assert internals.read_handshake(protocol) is False
    assert not hasattr(protocol, "http_headers")


@pytest.mark.parametrize("edge", ["\xa0", "\x85"])
def test_a_value_with_other_whitespace_at_an_edge_is_left_to_autobahn(edge):
    """Autobahn releases disagree on stripping NBSP and NEL: whichever is
    installed reads such a head itself."""
    _node, factory = _factory()
    protocol = factory.buildProtocol(PEER)
    protocol.makeConnection(StringTransport(peerAddress=PEER))
    protocol.data = _request("GET /ws HTTP/1.1", [*GOOD, f"X-Trailing: a{edge}"])
    assert internals.read_handshake(protocol) is False
    assert not hasattr(protocol, "http_headers")
    request = _request("GET /ws HTTP/1.1", [f"Host: a{edge}", *GOOD[1:]])
    assert _shake(request, fast=True) == _shake(request, fast=False)


def test_autobahns_handshake_is_the_one_the_fast_reading_was_checked_against():
    """
    read_handshake repeats every check of this processHandshake (and of
    parseHttpHeader): a release that changes either must be read again, and
    read_handshake brought in line, before this hash is updated.
    """
    from autobahn.websocket import protocol as autobahn_protocol

    source = inspect.getsource(WebSocketServerProtocol.processHandshake) + inspect.getsource(
        autobahn_protocol.parseHttpHeader
    )
    assert hashlib.sha256(source.encode()).hexdigest()[:16] in PROCESS_HANDSHAKE_SHA256, (
        "Autobahn's processHandshake or parseHttpHeader changed: check wsgw.internals.read_handshake"
    )


#: The sources read against read_handshake: Autobahn 26.11.1's (which
#: refuses header names that are not tokens and values with control
#: characters, as read_handshake does), and 26.10.2's and the oldest
#: supported 22.12.1's (the same checks as each other, looser: what they
#: take beyond read_handshake, Autobahn reads itself; only how their error
#: messages are formatted differs).
PROCESS_HANDSHAKE_SHA256 = {"5fcbb87d7c6961dc", "5a4e978cbf8ac833", "4c6e9e6fc8667bed"}


# -- both paths on the same requests ---------------------------------------------

LINE_CHOICES = [
    "GET /ws HTTP/1.1",
    "GET /ws?a=1&b=2&a=3 HTTP/1.1",
    "GET /ws?x=%20y&empty= HTTP/1.1",
    "GET /ws?q HTTP/1.1",
    "GET /ws#frag HTTP/1.1",
    "GET /ws;p=1 HTTP/1.1",
    "GET //host/ws HTTP/1.1",
    "GET http://localhost/ws HTTP/1.1",
    "GET /ws HTTP/1.0",
    "GET /ws HTTP/2",
    "POST /ws HTTP/1.1",
    "GET  /ws HTTP/1.1",
    " GET /ws HTTP/1.1",
    "GET /ws HTTP/1.1 ",
    "GET /w\xe9 HTTP/1.1",
    "GET /ws\xa0x HTTP/1.1",
    "GET /ws\x85 HTTP/1.1",
    "GET /ws\x01 HTTP/1.1",
    "GET /a:b HTTP/1.1",
    "GET * HTTP/1.1",
    "GET /ws HTTP/1.1 extra",
]

HEADER_CHOICES = {
    "host": [
        "Host: localhost:40010",
        "Host: localhost",
        "host:localhost:80",
        "Host: [::1]:8080",
        "Host: [::1]",
        "Host: localhost:x",
        "Host: localhost: 81 ",
        "Host:  example.com\t",
        "Host: a\xa0",
        None,
    ],
    "upgrade": ["Upgrade: websocket", "Upgrade: WebSocket", "upgrade: h2c, websocket", "Upgrade: foo", None],
    "connection": ["Connection: Upgrade", "Connection: keep-alive, upgrade", "Connection: close", None],
    "key": [
        f"Sec-WebSocket-Key: {KEY}",
        f"Sec-WebSocket-Key:  {KEY}\t",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ",
        "Sec-WebSocket-Key: dGhl!HNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=x",
        None,
    ],
    "version": [
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Version:  13 ",
        "Sec-WebSocket-Version: 8",
        "Sec-WebSocket-Version: 12",
        "Sec-WebSocket-Version: x",
        "Sec-WebSocket-Version: +13",
        "Sec-WebSocket-Version: 1_3",
        None,
    ],
    "protocol": [
        None,
        "Sec-WebSocket-Protocol: chat",
        "Sec-WebSocket-Protocol: chat, superchat",
        "Sec-WebSocket-Protocol: a, a",
        "Sec-WebSocket-Protocol: ",
    ],
    "origin": [
        None,
        "Origin: http://localhost:40010",
        "Origin: https://app.example.com",
        "Origin: null",
        "Origin: file://",
        "Origin: http://",
        "Origin: http://[::1",
        "Origin: http://h:99999",
        "Sec-WebSocket-Origin: http://localhost",
    ],
    "extensions": [
        None,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        'Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="10", x-foo',
        "Sec-WebSocket-Extensions: permessage-deflate; bogus",
    ],
    "user": ["X-Bfl-User: alice", "X-Bfl-User: bob", None],
    "other": [
        "X-Forwarded-For: 10.0.0.1, 10.0.0.2",
        "Accept-Language: en;q=0.9",
        "x-dup: 1",
        "X-Dup: 2",
        "Cookie: a=b; c=d",
        "User-Agent: t\xe9st/1.0",
        "X-Empty:",
        "X-Tab:\tv\t",
        "X-Colon: a:b:c",
        None,
    ],
    "malformed": [
        " folded",
        "\tfolded",
        "Bad Name: x",
        "NoColon",
        "X-Ctl: a\x01b",
        "X-Del: a\x7f",
        ": empty name",
    ],
}


def _mostly_first(draw, choices):
    """The first (well-formed) choice five times in six, else any."""
    return choices[0] if draw(st.integers(0, 5)) else draw(st.sampled_from(choices))


@st.composite
def requests(draw):
    """Handshakes near a well-formed one: each part is sometimes missing, repeated or malformed."""
    headers = []
    for name, choices in HEADER_CHOICES.items():
        if name == "other":
            headers += draw(st.lists(st.sampled_from(choices[:-1]), max_size=3))
            continue
        if name == "malformed":
            headers += [draw(st.sampled_from(choices))] if draw(st.integers(0, 4)) == 0 else []
            continue
        times = 2 if draw(st.integers(0, 9)) == 0 else 1
        for _ in range(times):
            choice = _mostly_first(draw, choices)
            if choice is not None:
                headers.append(choice)
    headers = draw(st.permutations(headers))
    tail = draw(st.sampled_from([b"", b"\x81\x85\x00\x00\x00\x00hello", b"GET /ws HTTP/1.1\r\n"]))
    return _request(_mostly_first(draw, LINE_CHOICES), headers, tail)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.sampled_from([{}, {"allowed_origins": ("https://app.example.com",)}]))
def test_both_readings_answer_every_request_alike(request, options):
    assert _shake(request, fast=True, **options) == _shake(request, fast=False, **options)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["Origin: http://localhost:40010"],
        ["Sec-WebSocket-Protocol: chat, superchat"],
        ["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
        ["X-Dup: 1", "x-dup: 2"],
    ],
)
def test_browser_like_handshakes_are_answered_alike(extra):
    request = _request("GET /ws?token=abc HTTP/1.1", [*GOOD, *extra])
    fast = _shake(request, fast=True)
    assert fast[0].startswith(b"HTTP/1.1 101 ")
    assert fast == _shake(request, fast=False)


class _Boom(Exception):
    pass


def _shake_logged(request: bytes, fast: bool, patch):
    """Like L{_shake}, with C{patch(protocol)} applied first; also the log lines' formats."""
    import gc

    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        _node, factory = _factory()
        protocol, transport = _connected(factory, fast, patch)
        protocol.dataReceived(request)
        del protocol
        gc.collect()  # an unhandled failure in a Deferred is logged when collected
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return transport.value(), transport.disconnecting, [e.get("log_format") for e in seen]


def test_an_onconnect_that_fails_is_answered_alike():
    """An unexpected exception in onConnect: the same 500 and warnings as Autobahn's."""

    def patch(protocol):
        def on_connect(request):
            raise _Boom("no")

        protocol.onConnect = on_connect

    request = _request("GET /ws HTTP/1.1", GOOD)
    fast = _shake_logged(request, True, patch)
    assert fast[0].startswith(b"HTTP/1.1 500 ")
    assert fast == _shake_logged(request, False, patch)


def test_a_handshake_answer_that_fails_is_an_unhandled_error_alike():
    """succeedHandshake failing is an unhandled error in a Deferred, on both paths."""

    def patch(protocol):
        def succeed(result):
            raise _Boom("no")

        protocol.succeedHandshake = succeed

    request = _request("GET /ws HTTP/1.1", GOOD)
    fast = _shake_logged(request, True, patch)
    assert "Unhandled error in Deferred:" in fast[2]
    assert fast == _shake_logged(request, False, patch)


def test_an_onconnect_that_answers_later_is_answered_alike():
    """A Deferred from onConnect (the connect hook's way) is waited for on both paths."""
    from twisted.internet.defer import Deferred

    pending = []

    def patch(protocol):
        real = protocol.onConnect

        def on_connect(request):
            d = Deferred()
            pending.append((d, real(request)))
            return d

        protocol.onConnect = on_connect

    request = _request("GET /ws HTTP/1.1", GOOD)
    answers = []
    for fast in (True, False):
        node, factory = _factory()
        protocol, transport = _connected(factory, fast, patch)
        protocol.dataReceived(request)
        assert transport.value() == b""  # nothing until the answer
        d, result = pending.pop()
        d.callback(result)
        answers.append(transport.value())
        assert [c.user_name for c in node.gateway.registry] == ["alice"]
    assert answers[0].startswith(b"HTTP/1.1 101 ") and answers[0] == answers[1]


def test_an_onconnect_that_returns_a_failure_is_refused_alike():
    """maybeDeferred takes a returned Failure as an error: so does the one-pass reading."""
    from autobahn.websocket.types import ConnectionDeny
    from twisted.python.failure import Failure

    def patch(protocol):
        protocol.onConnect = lambda request: Failure(ConnectionDeny(403, "not you"))

    request = _request("GET /ws HTTP/1.1", GOOD)
    fast = _shake_logged(request, True, patch)
    assert fast[0].startswith(b"HTTP/1.1 403 ")
    assert fast == _shake_logged(request, False, patch)
