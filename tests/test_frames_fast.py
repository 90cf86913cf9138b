"""
Whole frames read in one pass (L{wsgw.internals.read_frames}) do what
Autobahn's own frame reading does: the same events to the app, the same
bytes to the client (pongs, close frames with their codes), the same state
and counters left on the protocol, for well-formed and malformed frames
alike, however the bytes are cut into reads; in memory.
"""

import hashlib
import inspect
import os
import struct

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol as TwistedServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from fakes import FakeApp, make_gateway
from wsgw import internals
from wsgw.websocket import GatewayFactory, prepare_frame

PEER = IPv4Address("TCP", "127.0.0.1", 5555)

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"X-Bfl-User: alice\r\n\r\n"
)

#: What Autobahn's frame reading leaves on the protocol, besides its counters.
FIELDS = (
    "state",
    "data",
    "inside_message",
    "failedByMe",
    "wasClean",
    "closedByMe",
    "localCloseCode",
    "localCloseReason",
    "remoteCloseCode",
    "remoteCloseReason",
    "wasMaxFramePayloadSizeExceeded",
    "wasMaxMessagePayloadSizeExceeded",
)


def frame(opcode, payload, *, fin=True, rsv=0, masked=True, wide=False, mask=b"\x01\x7f\x80\xfe"):
    """One client frame; C{wide}: the length in 16 bits whatever it is."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    flag = 0x80 if masked else 0
    n = len(payload)
    if n < 126 and not wide:
        head = bytes([first, flag | n])
    elif n < 65536:
        head = bytes([first, flag | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, flag | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def _read(chunks, fast, **factory_options):
    """Feed C{chunks} to an open gateway connection; what came of it."""
    clock = Clock()
    app = FakeApp()
    gateway = make_gateway(clock, app, prepare=prepare_frame)
    factory = GatewayFactory(gateway, reactor=clock, **factory_options)
    protocol = factory.buildProtocol(PEER)
    if not fast:
        protocol.dataReceived = lambda data: TwistedServerProtocol.dataReceived(protocol, data)
    on_message = protocol.onMessage

    def closing_on_bye(payload, is_binary):
        # A message the gateway answers by closing: what follows it is
        # read in the closing state.
        on_message(payload, is_binary)
        if payload == b"bye":
            protocol.close_with(4000, "bye")

    protocol.onMessage = closing_on_bye
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    protocol.dataReceived(HANDSHAKE)
    assert protocol.state == protocol.STATE_OPEN
    transport.clear()
    for chunk in chunks:
        if protocol.state == protocol.STATE_CLOSED:
            break
        protocol.dataReceived(chunk)
    clock.advance(5)  # past the closing handshake's deadline
    if protocol.state != protocol.STATE_OPEN:  # the client hangs up (StringTransport never does)
        protocol.connectionLost(Failure(ConnectionDone()))
    app.answer_all()
    events = [(e["action"], e["data"], e.get("close_code")) for e, _, _ in app.attempts]
    state = {name: getattr(protocol, name, None) for name in FIELDS}
    state["current_frame"] = protocol.current_frame is not None
    return events, transport.value(), transport.disconnecting, state, vars(protocol.trafficStats)


def _alike(chunks, **factory_options):
    fast = _read(chunks, True, **factory_options)
    assert fast == _read(chunks, False, **factory_options)
    return fast


def test_whole_text_and_binary_frames_become_events():
    data = frame(1, b'{"a":1}') + frame(2, b"\x00\xff") + frame(1, "é".encode() * 100) + frame(1, b"")
    events, written, _, state, stats = _alike([data])
    assert [action for action, _, _ in events] == ["open", "message", "message", "message", "message"]
    assert events[1][1] == {"a": 1}
    assert written == b""
    assert state["state"] == WebSocketProtocol.STATE_OPEN
    assert stats["incomingWebSocketMessages"] == 4
    assert stats["incomingOctetsWireLevel"] == len(data)


def test_a_frame_cut_by_the_end_of_a_read_is_finished_by_autobahn():
    data = frame(1, b"x" * 300) + frame(1, b"y")
    events, _, _, state, _ = _alike([data[:150], data[150:]])
    assert [action for action, _, _ in events] == ["open", "message", "message"]
    assert state["data"] == b"" and not state["current_frame"]


@pytest.mark.parametrize(
    "bad, code",
    [
        (frame(1, b"\xed\xa0\x80"), 1007),  # a UTF-16 surrogate: not UTF-8
        (frame(1, b"\xc0\x80"), 1007),  # an overlong encoding
        (frame(1, b"abc", masked=False), 1002),
        (frame(1, b"abc", rsv=1), 1002),
        (frame(3, b"abc"), 1002),
        (frame(1, b"abc", wide=True), 1002),  # the length not in its shortest form
        (frame(1, b"x" * 300), 1009),  # over the factory's max_message_size below
    ],
)
def test_a_bad_frame_closes_with_autobahns_code_after_the_good_ones(bad, code):
    events, written, _, state, _ = _alike([frame(1, b"1") + bad + frame(1, b"2")], max_message_size=200)
    assert [action for action, _, _ in events] == ["open", "message", "close"]
    assert events[-1][2] == code
    assert written[0] == 0x88 and struct.unpack("!H", written[2:4])[0] == code  # the close frame
    assert state["state"] == WebSocketProtocol.STATE_CLOSED


def test_frames_after_a_message_that_closes_are_read_as_autobahn_reads_them():
    data = frame(1, b"a") + frame(1, b"bye") + frame(1, b"b") + frame(1, b"c")
    events, written, _, state, stats = _alike([data])
    assert [data for action, data, _ in events if action == "message"] == ["a", "bye", "b", "c"]
    assert written[0] == 0x88 and struct.unpack("!H", written[2:4])[0] == 4000
    assert state["localCloseCode"] == 4000
    assert stats["incomingWebSocketMessages"] == 2  # Autobahn counts in the open state alone


def test_control_frames_between_messages_are_autobahns():
    data = frame(1, b"a") + frame(9, b"hi") + frame(1, b"b") + frame(8, struct.pack("!H", 1000) + b"bye")
    events, written, _, _, _ = _alike([data])
    assert [(action, close) for action, _, close in events] == [
        ("open", None),
        ("message", None),
        ("message", None),
        ("close", 1000),
    ]
    assert written.startswith(b"\x8a\x02hi")  # the pong, before the close's echo


def test_reading_is_autobahns_alone_with_its_debug_lines_on(monkeypatch):
    monkeypatch.setattr(internals, "debug_is_off", lambda protocol: False)
    taken = []
    monkeypatch.setattr(internals, "_unmasked", lambda *args: taken.append(args))
    events, _, _, _, _ = _read([frame(1, b"a")], True)
    assert [action for action, _, _ in events] == ["open", "message"]
    assert taken == []


def test_autobahns_frame_reading_is_the_one_the_fast_reading_was_checked_against():
    """
    read_frames repeats what these Autobahn methods do for a whole data
    frame: a release that changes one must be read again, and read_frames
    brought in line, before the hash is updated.
    """
    names = ("_dataReceived", "consumeData", "processData", "onFrameBegin", "onFrameData", "onFrameEnd")
    source = "".join(inspect.getsource(getattr(WebSocketProtocol, name)) for name in names)
    source += "".join(
        inspect.getsource(getattr(WebSocketProtocol, name))
        for name in ("onMessageBegin", "onMessageFrameBegin", "onMessageFrameData")
    )
    assert hashlib.sha256(source.encode()).hexdigest()[:16] in FRAME_READING_SHA256, (
        "Autobahn's frame reading changed: check wsgw.internals.read_frames"
    )


#: The frame reading of the Autobahn releases read against read_frames:
#: 26.11.1 and 26.10.2 (the same), and the oldest supported, 22.12.1, which
#: differs from them in decompression and the formatting of its messages.
FRAME_READING_SHA256 = {"021b3fb4e618dad3", "cb457bd7e4b6fe29"}


# -- both readings on the same bytes ----------------------------------------------

_INVALID_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98"]


@st.composite
def payloads(draw):
    kind = draw(st.sampled_from(["text", "text", "bytes", "bad", "long", "bye"]))
    if kind == "bye":
        return b"bye"
    if kind == "text":
        return draw(st.text(max_size=40)).encode("utf-8")
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "bad":
        text = draw(st.text(max_size=10)).encode("utf-8")
        return text + draw(st.sampled_from(_INVALID_UTF8)) + text
    return draw(st.sampled_from([b"z" * 125, b"z" * 126, b"z" * 250, b"z" * 70000]))


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["data"] * 6 + ["odd", "control"]))
    payload = draw(payloads())
    mask = os.urandom(4) if draw(st.booleans()) else b"\x00\x00\x00\x00"
    if kind == "data":
        wide = draw(st.sampled_from([False] * 5 + [True]))
        return frame(draw(st.sampled_from([1, 1, 2])), payload, mask=mask, wide=wide)
    if kind == "control":
        opcode = draw(st.sampled_from([9, 10, 8]))
        body = payload[:20] if opcode != 8 else struct.pack("!H", draw(st.sampled_from([1000, 1001, 4000])))
        return frame(opcode, body, mask=mask)
    return frame(
        draw(st.sampled_from([0, 1, 2, 3, 11])),
        payload,
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from([0, 0, 1, 4])),
        masked=draw(st.booleans()),
        wide=draw(st.booleans()),
        mask=mask,
    )


@st.composite
def reads(draw):
    data = b"".join(draw(st.lists(frames(), min_size=1, max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=reads(), limit=st.sampled_from([1024 * 1024, 200, 0]))
def test_both_readings_do_alike_with_any_frames_cut_anywhere(chunks, limit):
    _alike(chunks, max_message_size=limit)
