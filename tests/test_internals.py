"""
Each private field of Twisted or Autobahn that wsgw relies on
(wsgw/internals.py), checked: when a release changes one, a test here
fails and names it, rather than the gateway slowing down or misbehaving
quietly.
"""

import inspect
from collections import deque
from types import SimpleNamespace

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.internet import ClientService
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from fakes import tcp_pair
from wsgw import internals


def test_autobahn_copies_settings_from_a_list_the_protocol_can_empty():
    """The settings live on a protocol subclass instead of being copied to
    each connection (Autobahn's copy pretty-prints them all): Autobahn must
    still read the list from CONFIG_ATTRS, and the list must hold the
    settings the gateway sets."""
    assert "maxMessagePayloadSize" in internals.PROTOCOL_SETTINGS
    assert "openHandshakeTimeout" in internals.PROTOCOL_SETTINGS

    from autobahn.websocket.protocol import WebSocketProtocol

    assert "self.CONFIG_ATTRS" in inspect.getsource(WebSocketProtocol._connectionMade)

    class Empty(WebSocketServerProtocol):
        CONFIG_ATTRS = ()

    factory = WebSocketServerFactory()
    factory.setProtocolOptions(maxMessagePayloadSize=7, perMessageCompressionAccept=lambda offers: "declined")
    protocol = internals.with_settings(Empty, factory)()
    assert isinstance(protocol, Empty)
    assert protocol.maxMessagePayloadSize == 7
    assert all(getattr(protocol, name) == getattr(factory, name) for name in internals.PROTOCOL_SETTINGS)
    assert not any(name in vars(protocol) for name in internals.PROTOCOL_SETTINGS)  # none per connection
    # A function setting is called as Autobahn calls it, without the protocol.
    assert protocol.perMessageCompressionAccept(["offer"]) == "declined"


def test_autobahn_builds_its_debug_arguments_with_the_helpers_deferred():
    """Every call of the deferred helpers in Autobahn's modules is a keyword
    argument of a log call (so it may return something that renders only
    when formatted), and deferring them keeps their text."""
    import re

    from autobahn import util

    internals.defer_debug_arguments()
    internals.defer_debug_arguments()  # idempotent: wrapped once
    for module, names in internals.DEBUG_ARGUMENT_HELPERS.items():
        source = inspect.getsource(module)
        for name in names:
            helper = getattr(module, name)
            assert helper.__wrapped__ is getattr(util, name)
            calls = re.findall(rf"(.{{0,40}})\b{name}\(", source)
            assert calls, (module.__name__, name)
            assert all(re.search(r"\w+=$", before) for before in calls), (module.__name__, name, calls)
    from autobahn.websocket import protocol as autobahn_protocol

    rendered = autobahn_protocol.hltype(WebSocketServerProtocol.onConnect)
    assert str(rendered) == util.hltype(WebSocketServerProtocol.onConnect)
    assert f"{autobahn_protocol.hlval(42)}" == util.hlval(42)
    assert "{x}".format(x=autobahn_protocol.hlval("peer")) == util.hlval("peer")


def test_a_prepared_frame_carries_its_wire_bytes():
    frame = internals.prepare_frame(b'"hi"')
    assert isinstance(frame, PreparedMessage)
    assert internals.frame_bytes(frame) == b'\x81\x04"hi"'  # FIN+text, unmasked, 4 bytes


def test_the_direct_path_reads_autobahns_send_queue_and_compression_fields():
    """send_now leaves to Autobahn a frame that compression or Autobahn's own
    send queue must handle, and a protocol without those fields."""
    transport = StringTransport()
    assert not internals.send_now(WebSocketServerProtocol(), b"x")  # not connected: no such fields yet
    queued = SimpleNamespace(_perMessageCompress=None, send_queue=deque([(b"queued", False)]), transport=transport)
    assert not internals.send_now(queued, b"x")
    compressed = SimpleNamespace(_perMessageCompress=object(), send_queue=deque(), transport=transport)
    assert not internals.send_now(compressed, b"x")
    assert transport.value() == b""


def test_the_close_frame_call_sends_1001_which_sendClose_refuses():
    sent = []

    class Recording(WebSocketServerProtocol):
        def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
            sent.append((code, reasonUtf8, isReply))

    internals.send_close_frame(Recording(), 1001, "going away")
    assert sent == [(1001, b"going away", False)]
    # What the call stands in for: the public API refuses 1001.
    with pytest.raises(Exception, match="invalid close code 1001"):
        WebSocketServerProtocol().sendClose(code=1001)


def test_a_quiet_client_service_logs_its_retries_below_warnings_nowhere():
    """ClientService logs through its class's private _log: the quiet one
    must swallow its 'Scheduling retry' lines (info) and nothing else."""
    assert isinstance(ClientService.__dict__.get("_log"), type(internals.quiet_client_service()._log))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        reactor = MemoryReactorClock()
        quiet = internals.quiet_client_service()(
            TCP4ClientEndpoint(reactor, "127.0.0.1", 1), Factory.forProtocol(Protocol), clock=reactor
        )
        quiet.startService()
        _host, _port, factory, _timeout, _bind = reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(OSError("refused")))
        reactor.advance(10)
        quiet.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    retries = [e for e in seen if "Scheduling retry" in e.get("log_format", "")]
    assert retries == []
    assert len(reactor.tcpClients) >= 2  # it did retry, silently


def _send(transport, data):
    """send_now as the protocol calls it, for a connection with nothing
    queued in Autobahn and no compression."""
    protocol = SimpleNamespace(_perMessageCompress=None, send_queue=deque(), transport=transport)
    assert internals.send_now(protocol, data)


def test_frames_go_out_at_once_when_nothing_waits():
    """With nothing buffered, a frame is sent during the call, without the
    reactor watching the socket for writing."""
    transport, peer, reactor = tcp_pair()
    _send(transport, b"frame-1")
    assert peer.recv(100) == b"frame-1"
    assert transport not in reactor.getWriters()
    transport.socket.close()
    peer.close()


def test_frames_queue_behind_buffered_bytes():
    """Bytes already buffered by the transport go first: a frame written
    after them waits behind them, in order."""
    transport, peer, reactor = tcp_pair()
    transport.write(b"buffered;")
    _send(transport, b"frame-2")

    try:
        early = peer.recv(100)
    except (OSError, BlockingIOError):
        early = b""
    assert early == b""
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert peer.recv(100) == b"buffered;frame-2"
    transport.socket.close()
    peer.close()


def test_what_the_socket_does_not_take_is_buffered_in_order():
    """A frame larger than the socket takes at once: the rest is buffered
    and follows, before anything written later."""
    transport, peer, reactor = tcp_pair()
    big = bytes(range(256)) * 40000  # ~10 MB: more than a socket pair buffers
    _send(transport, big)
    _send(transport, b"after")
    assert transport in reactor.getWriters()
    received = bytearray()
    while len(received) < len(big) + 5:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            chunk = b""
        received += chunk
        if not chunk:
            transport.doWrite()
    assert bytes(received) == big + b"after"
    transport.socket.close()
    peer.close()


def test_transports_that_are_not_twisteds_tcp_always_take_write():
    transport = StringTransport()
    _send(transport, b"x")
    assert transport.value() == b"x"


def test_the_wsgw_command_runs_on_twists_private_runner():
    """The wsgw command runs twist under its own name through Twist's
    private runner and options classes, and exits the way they exit."""
    from twisted.application.runner import _exit
    from twisted.application.twist import _options, _twist

    assert hasattr(_twist.Twist, "main") and hasattr(_twist.Twist, "options")
    assert hasattr(_options.TwistOptions, "parseOptions")
    assert _exit.ExitStatus.EX_USAGE == 64 and callable(_exit.exit)
    with pytest.raises(SystemExit) as ended:
        internals.run_twist(["wsgw", "--no-such-option"], "run 'wsgw --help' for all options")
    assert ended.value.code == 64


def test_a_debug_line_of_autobahns_reads_as_before_when_debug_is_on():
    """With Autobahn's debug lines switched on, a deferred argument is
    written as the text the helper makes."""
    from autobahn.twisted import websocket as autobahn_websocket
    from autobahn.util import hltype, hlval
    from twisted.logger import formatEvent

    internals.defer_debug_arguments()
    protocol = WebSocketServerProtocol()
    log = protocol.log
    level = log._log_level
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        log._set_log_level("debug")
        protocol.peer = "tcp:127.0.0.1:5555"
        protocol._dataReceived = lambda data: None
        autobahn_websocket.WebSocketAdapterProtocol.dataReceived(protocol, b"abc")
    finally:
        log._set_log_level(level)
        globalLogPublisher.removeObserver(seen.append)
    lines = [formatEvent(event) for event in seen if "received" in event.get("log_format", "")]
    assert len(lines) == 1
    assert hltype(protocol.dataReceived) in lines[0]  # the colours and all
    assert f"received {hlval(3)} bytes" in lines[0]


def test_autobahns_server_reads_the_handshake_leftovers_only_during_the_handshake():
    """drop_handshake_leftovers clears fields Autobahn's server side reads
    only while it answers the opening handshake."""
    import re

    from autobahn.websocket.protocol import WebSocketProtocol
    from autobahn.websocket.protocol import WebSocketServerProtocol as Server

    during = {"processHandshake", "succeedHandshake", "failHandshake", "sendServerStatus", "sendRedirect"}
    for cls in (WebSocketProtocol, Server, WebSocketServerProtocol):
        for name, member in vars(cls).items():
            if name in during or not callable(member):
                continue
            source = inspect.getsource(member) if inspect.isfunction(member) else ""
            for field in internals.HANDSHAKE_LEFTOVERS:
                assert not re.search(rf"self\.{field}\b", source), (cls.__name__, name, field)
    protocol = WebSocketServerProtocol()
    protocol.http_headers = {"host": "x"}
    internals.drop_handshake_leftovers(protocol)
    assert protocol.http_headers is None
    assert "http_response_data" not in vars(protocol)  # what it never had stays unset


def test_write_now_takes_the_ordinary_path_on_anything_but_plain_tcp():
    """The API channel's answers: a transport that is not Twisted's TCP
    connection (TLS, a test's) gets them through write(), whole."""
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    internals.write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 200 OK\r\n\r\n"


def test_the_one_pass_handshake_finds_autobahns_and_txaios_private_helpers():
    """read_handshake calls Autobahn's origin helpers and recognises txaio's
    no-op debug method; without them it would leave every handshake to
    Autobahn (correct, but no longer cheaper)."""
    from autobahn.websocket import protocol as autobahn_protocol

    assert internals._url_to_origin is autobahn_protocol._url_to_origin
    assert internals._is_same_origin is autobahn_protocol._is_same_origin
    assert callable(internals._no_op)
    assert internals.debug_is_off(WebSocketServerProtocol())  # the default level is info


def test_autobahn_prints_the_settings_it_copied_with_a_pformat_that_knows_the_empty_list():
    """Autobahn's pformat, once debug arguments are deferred, prints
    everything as pprint does and the empty list of settings (which wsgw's
    protocols copy) at once."""
    import pprint
    import re

    from autobahn.websocket import protocol as autobahn_protocol

    internals.defer_debug_arguments()
    internals.defer_debug_arguments()  # idempotent: wrapped once
    printed = autobahn_protocol.pformat
    assert printed.__wrapped__ is pprint.pformat
    for value in ([], [("a", 1, "B")], {}, {"k": [1, 2]}, (), "x", [[]]):
        assert printed(value) == pprint.pformat(value)
    assert printed([], width=1) == pprint.pformat([], width=1)
    # what it is used for: that settings line, and the text of Timings
    source = inspect.getsource(autobahn_protocol)
    assert re.findall(r"pformat\((\w+)", source) == ["self", "configAttrLog", "self"]


def test_autobahns_prepared_frame_has_the_fields_prepare_frame_sets():
    """prepare_frame sets PreparedMessage's fields itself only while the
    constructor sets exactly these; otherwise it calls the constructor."""
    assert internals._FRAME_FIELDS_KNOWN
    frame = PreparedMessage(b"abc", False, False, False)
    assert sorted(vars(frame)) == sorted(internals.PREPARED_FRAME_FIELDS)


def test_a_frame_to_a_transport_that_is_not_tcp_is_written_whole_through_write():
    """send_now hands a frame for any other transport (TLS, a test's) to write() at once."""
    written = []
    transport = SimpleNamespace(write=written.append)
    protocol = SimpleNamespace(_perMessageCompress=None, send_queue=deque(), transport=transport)
    assert internals.send_now(protocol, b"frame")
    assert written == [b"frame"]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(
    "state", ["idle", "buffered", "disconnecting", "write_disconnected", "tls", "no_fields", "no_socket", "full"]
)
def test_write_now_sends_at_once_exactly_when_the_transport_is_idle(state, side):
    """Straight to the socket when nothing waits in the transport's buffers,
    otherwise through write(); a client's connection to the gateway and the
    gateway's to the app alike.  What a full socket does not take goes to
    write(), behind nothing.  TLS, or a release without one of the private
    fields read, takes write()."""
    transport, peer, _reactor = tcp_pair(client=side == "client")
    if state == "buffered":
        transport.write(b"before;")
    elif state == "disconnecting":
        transport.disconnecting = True
    elif state == "write_disconnected":
        transport._writeDisconnected = True
    elif state == "tls":
        transport.TLS = True
    elif state == "no_fields":
        del transport._tempDataBuffer
    elif state == "no_socket":
        real = transport.socket
        del transport.socket
    elif state == "full":
        # A send buffer that takes part of a large frame only.
        import socket

        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = b"f" * (1 << 20) if state == "full" else b"frame"
    writes = []
    transport.write = writes.append
    internals.write_now(transport, data)
    received = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        received += chunk
    if state == "idle":
        assert (received, writes) == (data, [])
    elif state == "full":
        assert received and len(writes) == 1 and received + writes[0] == data
    else:
        assert (received, writes) == (b"", [data])
    if state == "no_socket":
        transport.socket = real
    transport.socket.close()
    peer.close()
