"""
Running under systemd: readiness and stopping notifications, watchdog
pings, socket activation, clear bind failures, and unit files that verify.
"""

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

from harness import SocketActivated, SyncDaemon, Waiters, py_client, start_daemon

ROOT = Path(__file__).resolve().parent.parent


class NotifySocket(DatagramProtocol):
    """The NOTIFY_SOCKET systemd would own: records each message."""

    def __init__(self):
        self.messages = []
        self.waiters = Waiters()

    def datagramReceived(self, data, addr):
        self.messages.append(data.decode())
        self.waiters.check()

    def wait_for(self, prefix, seconds=15):
        return self.waiters.wait(lambda: any(m.startswith(prefix) for m in self.messages), prefix, seconds)


@pytest_twisted.ensureDeferred
async def test_ready_after_listening_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    notifications = NotifySocket()
    listener = reactor.listenUNIXDatagram(path, notifications)
    daemon = None
    try:
        daemon = await start_daemon(cwd=tmp_path, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        await notifications.wait_for("READY=1")
        # Ready means the port answers.
        response = await treq.get(daemon.base + "/healthz")
        assert response.code == 200
        assert any("STATUS=serving on" in m for m in notifications.messages)
        # WatchdogSec=0.4 s: pings every 0.2 s while the reactor runs.
        await notifications.waiters.wait(lambda: notifications.messages.count("WATCHDOG=1") >= 3, "watchdog pings")
        client = await py_client(daemon.ws_url)
        exit_status = await daemon.terminate(signal.SIGTERM)
        assert exit_status == (0, None)
        assert any(m.startswith("STOPPING=1") for m in notifications.messages)
        assert (await client.closed)[0] == 1001
    finally:
        await listener.stopListening()


def test_socket_activation_serves_an_inherited_socket(tmp_path):
    """As systemd would: the listening socket arrives as fd 3 with
    LISTEN_FDS/LISTEN_PID, and the daemon serves it without --listen."""
    # As wsgw.service sets it.
    with SocketActivated(tmp_path, {"WSGW_LISTEN": "systemd:domain=INET:index=0"}) as daemon:
        # The socket was listening before the daemon started: connecting
        # succeeds at once, and the daemon answers once it runs.
        try:
            connection = socket.create_connection(("127.0.0.1", daemon.port), timeout=20)
        except OSError:
            raise AssertionError(daemon.log()) from None
        connection.settimeout(20)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
        connection.close()
        assert answer.startswith(b"HTTP/1.1 200"), daemon.log()
        assert b'"ok"' in answer


def test_bind_failure_says_why(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with (
            pytest.raises(AssertionError) as failed,
            SyncDaemon("--listen", f"tcp:{port}:interface=127.0.0.1", cwd=tmp_path),
        ):
            pass
    finally:
        taken.close()
    message = str(failed.value)
    assert "cannot listen on" in message
    assert "ip_local_reserved_ports" in message and "socket activation" in message


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_unit_files_verify(tmp_path):
    service = (ROOT / "systemd" / "wsgw.service").read_text()
    assert "Type=notify" in service and "WatchdogSec=" in service
    assert "Environment=WSGW_LISTEN=systemd:domain=INET:index=0" in service
    assert "ListenStream=0.0.0.0:40010" in (ROOT / "systemd" / "wsgw.socket").read_text()
    # verify checks that ExecStart exists; point it at a binary that does.
    (tmp_path / "wsgw.service").write_text(service.replace("/opt/wsgw/bin/twist", shutil.which("true")))
    shutil.copy(ROOT / "systemd" / "wsgw.socket", tmp_path / "wsgw.socket")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "wsgw.socket"), str(tmp_path / "wsgw.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "wsgw" in line]
    assert problems == []
