"""
TLS from --tls-cert and --tls-key in the real daemon: Node's wss:// client
end to end; a certificate renewed in place and SIGHUP, with no connection
dropped, or no SIGHUP at all (--tls-watch-interval); a socket passed as
systemd passes it, served with TLS; and Chromium, which offers ALPN in its
TLS handshake.
"""

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from test_security import make_certificate
from twisted.internet.threads import deferToThread

from harness import SocketActivated, node_client, start_daemon

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")


def certificate_pair(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    return make_certificate(folder)


def install(key_path, cert_path, live):
    """Copies a key and certificate where the daemon reads them, as a renewal does."""
    live.mkdir(exist_ok=True)
    shutil.copy(key_path, live / "key.pem")
    shutil.copy(cert_path, live / "cert.pem")


def https_get(port, path="/healthz", alpn=("h2", "http/1.1")):
    """
    (the certificate served, in DER; the protocol ALPN agreed; the answer)
    for one GET over TLS, offering C{alpn} as browsers do.  Blocking: run
    it in a thread.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # which certificate it is, is what the test looks at
    context.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        return tls.getpeercert(binary_form=True), tls.selected_alpn_protocol(), answer


def plain_get(port):
    """What a plain-HTTP GET to C{port} is answered, until the connection closes.  Blocking."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        return answer


def der(cert_path):
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


@pytest_twisted.ensureDeferred
async def test_tls_options_serve_node_clients_alpn_and_a_plain_admin_listener(app, tmp_path, node_ws):
    key_path, cert_path = make_certificate(tmp_path)
    daemon = await start_daemon(
        "--tls-cert",
        str(cert_path),
        "--tls-key",
        str(key_path),
        "--app-url",
        app.url,
        # The API on a plain loopback listener of its own (README, "TLS under systemd").
        "--admin-listen",
        "tcp:0:interface=127.0.0.1",
        listeners=2,
        cwd=tmp_path,
    )
    try:
        tls_port, admin_port = daemon.ports
        # The listeners' lines come once every port listens, after the ports' own.
        await daemon.proto.waiters.wait(
            lambda: any(" ready, engine " in line for line in daemon.log_lines()), "the start-up lines"
        )
        assert any(f"serving /ws at wss://127.0.0.1:{tls_port}/ws" in line for line in daemon.log_lines())
        assert any(f"the API alone at http://127.0.0.1:{admin_port}/" in line for line in daemon.log_lines())
        client = await node_client(
            f"wss://localhost:{tls_port}/ws", {"X-Bfl-User": "tls"}, env={"WS_CA_FILE": str(cert_path)}
        )
        client.send('{"event":"secure"}')
        message = await app.wait_for_action("message")
        assert message["data"] == {"event": "secure"} and message["user_name"] == "tls"
        listed = await treq.json_content(await treq.get(f"http://127.0.0.1:{admin_port}/tapr/ws/conn/list"))
        [user] = listed["data"]
        assert user["name"] == "tls" and user["conns_number"] + user["public_conns_number"] == 1
        metrics = await treq.text_content(await treq.get(f"http://127.0.0.1:{admin_port}/metrics"))
        assert "wsgw_tls_certificate_expiry_timestamp_seconds " in metrics
        await client.stop()
        served, agreed, answer = await deferToThread(https_get, tls_port)
        assert served == der(cert_path)
        assert agreed == "http/1.1"
        assert answer.startswith(b"HTTP/1.1 200")
        # http:// to the wss:// port: told what to do, not dropped unanswered.
        plain = await deferToThread(plain_get, tls_port)
        assert plain.startswith(b"HTTP/1.1 400") and b"this port speaks TLS: use https:// or wss://" in plain
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_sighup_serves_a_renewed_certificate_and_keeps_connections(app, tmp_path, node_ws):
    old_key, old_cert = certificate_pair(tmp_path, "old")
    new_key, new_cert = certificate_pair(tmp_path, "new")
    live = tmp_path / "live"
    install(old_key, old_cert, live)
    daemon = await start_daemon(
        "--tls-cert", str(live / "cert.pem"), "--tls-key", str(live / "key.pem"), "--app-url", app.url, cwd=tmp_path
    )
    client = None
    try:
        client = await node_client(f"wss://localhost:{daemon.port}/ws", env={"WS_CA_FILE": str(old_cert)})
        assert (await deferToThread(https_get, daemon.port))[0] == der(old_cert)

        install(new_key, new_cert, live)
        daemon.process.signalProcess("HUP")
        await daemon.proto.waiters.wait(
            lambda: any("reloaded the TLS certificate" in line for line in daemon.log_lines()), "the reload"
        )
        assert (await deferToThread(https_get, daemon.port))[0] == der(new_cert)
        client.send('{"event":"ping"}')  # opened before the reload, still served
        assert await client.wait_messages(1) == ['{"event":"pong"}']

        (live / "key.pem").write_bytes(old_key.read_bytes())  # a renewal half done
        daemon.process.signalProcess("HUP")
        await daemon.proto.waiters.wait(
            lambda: any("cannot reload the TLS certificate" in line for line in daemon.log_lines()), "the refusal"
        )
        assert (await deferToThread(https_get, daemon.port))[0] == der(new_cert)
        assert daemon.proto.status is None
    finally:
        if client is not None:
            await client.stop()
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_renewed_files_are_served_without_a_sighup(app, tmp_path):
    old_key, old_cert = certificate_pair(tmp_path, "old")
    new_key, new_cert = certificate_pair(tmp_path, "new")
    live = tmp_path / "live"
    install(old_key, old_cert, live)
    daemon = await start_daemon(
        "--tls-cert",
        str(live / "cert.pem"),
        "--tls-key",
        str(live / "key.pem"),
        "--tls-watch-interval",
        "0.2",
        "--app-url",
        app.url,
        cwd=tmp_path,
    )
    try:
        assert (await deferToThread(https_get, daemon.port))[0] == der(old_cert)
        install(new_key, new_cert, live)  # copied over the old files, as `cp` does
        await daemon.proto.waiters.wait(
            lambda: any("reloaded the TLS certificate" in line for line in daemon.log_lines()), "the reload"
        )
        assert (await deferToThread(https_get, daemon.port))[0] == der(new_cert)
        assert any("the TLS certificate or key file changed" in line for line in daemon.log_lines())
    finally:
        await daemon.terminate()


def test_a_socket_passed_by_systemd_serves_tls(tmp_path):
    """As systemd would pass wsgw-tls.socket: fd 3 with LISTEN_FDS/LISTEN_PID, TLS from the variables."""
    key_path, cert_path = make_certificate(tmp_path)
    settings = {
        "WSGW_LISTEN": "systemd:domain=INET:index=0",
        "WSGW_TLS_CERT": str(cert_path),
        "WSGW_TLS_KEY": str(key_path),
    }
    with SocketActivated(tmp_path, settings, "wsgw-tls.socket") as daemon:
        try:
            served, agreed, answer = https_get(daemon.port)
        except OSError:
            raise AssertionError(daemon.log()) from None
        assert served == der(cert_path), daemon.log()
        assert agreed == "http/1.1"
        assert answer.startswith(b"HTTP/1.1 200") and b'"ok"' in answer
        assert "serving /ws at wss://" in daemon.log()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
@pytest_twisted.ensureDeferred
async def test_chromium_gets_through_the_tls_handshake(tmp_path):
    """Chromium offers h2 and http/1.1 over ALPN; a listener that agreed to neither failed its handshake."""
    key_path, cert_path = make_certificate(tmp_path)
    daemon = await start_daemon("--tls-cert", str(cert_path), "--tls-key", str(key_path), cwd=tmp_path)
    try:
        page = await deferToThread(
            subprocess.run,
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--ignore-certificate-errors",  # the test's own certificate
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--dump-dom",
                f"https://localhost:{daemon.port}/healthz",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert '{"code":0,"message":"ok"}' in page.stdout, page.stderr[-2000:]
    finally:
        await daemon.terminate()
