"""
The service wiring in memory: listeners on a MemoryReactor, the heartbeat
and drain on a Clock, and sd_notify to a datagram socket the test holds
(as systemd would).  Until these, only the daemon tests reached them.
"""

import os
import socket

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from fakes import FakeApp, make_gateway, open_conn
from wsgw.config import Config
from wsgw.gateway import CLOSE_GOING_AWAY, CLOSE_PING_TIMEOUT
from wsgw.service import GatewayService, ListenerService, make_node, make_service
from wsgw.systemd import SystemdNotifier, notify, watchdog_interval

# -- ListenerService -------------------------------------------------------------


def test_a_listener_listens_while_running_and_says_where():
    reactor = MemoryReactorClock()
    listener = ListenerService("tcp:40010:interface=127.0.0.1", Factory(), reactor)
    listener.startService()
    [(port_number, _factory, _backlog, interface)] = reactor.tcpServers
    assert (port_number, interface) == (40010, "127.0.0.1")
    port = listener.ready.result
    assert port.getHost().port == 40010
    stopped = _spy_on_stop(port)
    listener.stopService()
    assert stopped == [port]


def _spy_on_stop(*ports):
    stopped = []
    for port in ports:
        port.stopListening = lambda port=port: stopped.append(port)
    return stopped


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_a_listener_that_cannot_listen_fails_the_start_and_says_why(log_events):
    listener = ListenerService("tcp:40010", Factory(), RefusingReactor())
    with pytest.raises(CannotListenError):
        listener.startService()
    failures = []
    listener.ready.addErrback(failures.append)
    assert failures and failures[0].check(CannotListenError)
    [critical] = [event for event in log_events if "cannot listen" in event["log_format"]]
    assert critical["endpoint"] == "tcp:40010"
    assert "port 40010 is in use" in critical["error"] and "ss -ltnp" in critical["error"]


# -- GatewayService: heartbeat sweep and drain --------------------------------------


def _gateway(reactor, **options):
    app = FakeApp()
    return make_gateway(reactor, app, **options), app


def test_the_gateway_service_sweeps_silent_connections_on_its_interval():
    reactor = MemoryReactorClock()
    gateway = make_node(Config(ping_timeout=10.0), reactor).gateway
    sweeps = []
    expire_silent = gateway.expire_silent
    gateway.expire_silent = lambda: sweeps.append(reactor.seconds()) or expire_silent()
    service = GatewayService(gateway, 1.0, 5.0, reactor)
    service.startService()
    conn = open_conn(gateway, "quiet")
    reactor.pump([1.0] * 10)
    assert conn.channel.closed_with is None  # not silent for longer than 10 s yet
    reactor.advance(1.0)
    assert conn.channel.closed_with == CLOSE_PING_TIMEOUT
    assert sweeps == [float(n) for n in range(1, 12)]
    service.stopService()
    reactor.pump([1.0] * 10)
    assert len(sweeps) == 11  # the sweep stopped with the service


def test_stopping_the_gateway_service_closes_clients_with_1001_and_waits_for_their_close_events():
    reactor = MemoryReactorClock()
    gateway, app = _gateway(reactor)
    service = GatewayService(gateway, 1.0, 5.0, reactor)
    service.startService()
    conn = open_conn(gateway, "a")
    app.answer_all()
    stopped = service.stopService()
    assert conn.channel.closed_with == CLOSE_GOING_AWAY
    assert not stopped.called  # the socket is not gone yet
    gateway.closed(conn, *CLOSE_GOING_AWAY)
    app.answer_all()  # the close event reached the app
    assert stopped.called


def test_the_drain_gives_up_after_its_timeout():
    reactor = MemoryReactorClock()
    gateway, _app = _gateway(reactor)
    service = GatewayService(gateway, 1.0, 5.0, reactor)
    service.startService()
    open_conn(gateway, "stuck")
    stopped = service.stopService()
    reactor.advance(4.9)
    assert not stopped.called
    reactor.advance(0.1)
    assert stopped.called


# -- make_service: the whole tree ------------------------------------------------


def test_make_service_listens_on_every_endpoint_and_then_accepts():
    reactor = MemoryReactorClock()
    config = Config(listen=["tcp:40010", "tcp:40011"], admin_listen=["tcp:40020:interface=127.0.0.1"])
    service = make_service(config, reactor=reactor)
    ports = []
    service.listening.addCallback(ports.extend)
    assert not service.gateway.accepting
    service.startService()
    assert sorted(port.getHost().port for port in ports) == [40010, 40011, 40020]
    assert service.gateway.accepting
    stopped_ports = _spy_on_stop(*ports)
    stopped = service.stopService()
    assert stopped.called
    assert sorted(stopped_ports, key=ports.index) == ports


def test_api_only_listeners_start_connections_on_the_lean_api_channel():
    from twisted.internet.address import IPv4Address

    from wsgw.apiserver import ApiChannel

    reactor = MemoryReactorClock()
    config = Config(listen=["tcp:40010"], admin_listen=["tcp:40020:interface=127.0.0.1"])
    make_service(config, reactor=reactor).startService()
    admin = next(factory for port, factory, *_ in reactor.tcpServers if port == 40020)
    assert isinstance(admin.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)), ApiChannel)


# -- SystemdNotifier: sd_notify over a datagram socket --------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    """The NOTIFY_SOCKET systemd would own; yields (environ, receive)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)

    def received():
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    yield {"NOTIFY_SOCKET": path}, received
    sock.close()


def test_notify_sends_one_datagram(notify_socket):
    environ, received = notify_socket
    assert notify("READY=1", environ)
    assert received() == ["READY=1"]


def test_notify_without_systemd_is_a_no_op():
    assert notify("READY=1", {}) is False


def test_notify_to_an_abstract_socket():
    name = f"wsgw-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_notify_to_a_socket_that_is_gone_says_so_and_goes_on(tmp_path):
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_watchdog_timeout(environ, interval):
    assert watchdog_interval(environ) == interval


def test_the_notifier_says_ready_once_listening_pings_and_says_stopping(notify_socket):
    environ, received = notify_socket
    environ = {**environ, "WATCHDOG_USEC": "2000000"}
    reactor = MemoryReactorClock()
    service = make_service(Config(listen=["tcp:40010"]), reactor=reactor)
    notifier = SystemdNotifier(service.listening, reactor, environ)
    notifier.setServiceParent(service)
    service.startService()
    ready = [m for m in received() if m != "WATCHDOG=1"]
    assert ready == ["READY=1\nSTATUS=serving on IPv4Address(type='TCP', host='0.0.0.0', port=40010)"]
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert received() == ["WATCHDOG=1", "WATCHDOG=1"]
    service.stopService()
    assert received() == ["STOPPING=1\nSTATUS=closing connections and draining"]
    reactor.advance(5.0)
    assert received() == []  # the watchdog stopped with it


def test_the_notifier_does_nothing_outside_systemd(monkeypatch):
    import wsgw.systemd

    sent = []
    monkeypatch.setattr(wsgw.systemd, "notify", lambda *args: sent.append(args))
    reactor = MemoryReactorClock()
    service = make_service(Config(listen=["tcp:40010"]), reactor=reactor)
    SystemdNotifier(service.listening, reactor, {"WATCHDOG_USEC": "2000000"}).setServiceParent(service)
    service.startService()
    reactor.pump([1.0] * 5)
    service.stopService()
    assert sent == []


def test_a_failed_listener_is_never_reported_ready(notify_socket):
    environ, received = notify_socket
    reactor = RefusingReactor()
    service = make_service(Config(listen=["tcp:40010"]), reactor=reactor)
    SystemdNotifier(service.listening, reactor, environ).setServiceParent(service)
    with pytest.raises(CannotListenError):
        service.startService()
    errors = []
    service.listening.addErrback(errors.append)
    assert errors and isinstance(errors[0], Failure)
    assert not [m for m in received() if m.startswith("READY=1")]


def test_tcp_listeners_queue_a_reconnect_storm():
    """A restarted gateway's clients all come back at once: the listen
    backlog must hold them (Twisted's 50 drops the rest's SYNs)."""
    from wsgw.service import LISTEN_BACKLOG, with_backlog

    assert with_backlog("tcp:40010") == f"tcp:40010:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp6:0:interface=\\:\\:1").endswith(f":backlog={LISTEN_BACKLOG}")
    assert with_backlog("tcp:40010:backlog=10") == "tcp:40010:backlog=10"
    assert with_backlog("unix:/run/wsgw.sock") == "unix:/run/wsgw.sock"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
