"""
Access control against the real daemon: the API's door, browser origins,
required identity, TLS, secrets kept out of logs, and per-peer rate limits.
"""

import datetime
import http.client
import json
import time

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import py_client, start_daemon, tls_round_trip, upgrade_request


@pytest_twisted.ensureDeferred
async def test_browser_origins(tmp_path):
    daemon = await start_daemon("--allowed-origin", "https://*.alice.example", cwd=tmp_path)
    try:
        status, body = await upgrade_request(daemon.base, headers={"Origin": "https://evil.example"})
        assert (status, body["code"]) == (403, 403)
        assert "origin" in body["message"]
        same_origin = await py_client(daemon.ws_url, origin=f"http://127.0.0.1:{daemon.port}")
        allowed = await py_client(daemon.ws_url, origin="https://desk.alice.example")
        no_origin = await py_client(daemon.ws_url)
        for client in (same_origin, allowed, no_origin):
            client.send_text('{"event":"ping"}')
            assert await client.next_message() == '{"event":"pong"}'
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_require_user(tmp_path):
    daemon = await start_daemon("--require-user", cwd=tmp_path)
    try:
        status, body = await upgrade_request(daemon.base)
        assert (status, body["code"]) == (401, 401)
        assert "X-Bfl-User" in body["message"]
        await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_separate_admin_listener_with_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-0123456789\n")
    daemon = await start_daemon(
        "--admin-listen",
        "tcp:0:interface=127.0.0.1",
        "--admin-token-file",
        str(token_file),
        cwd=tmp_path,
        listeners=2,
    )
    public, admin = daemon.ports
    try:
        # The public listener serves /ws, not the API.
        response = await treq.get(f"http://127.0.0.1:{public}/tapr/ws/conn/list")
        assert response.code == 404
        client = await py_client(f"ws://127.0.0.1:{public}/ws", {"X-Bfl-User": "alice"})
        # The admin listener serves the API, not /ws, and wants the token.
        response = await treq.get(f"http://127.0.0.1:{admin}/tapr/ws/conn/list")
        assert response.code == 401
        assert response.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="wsgw"']
        response = await treq.get(f"http://127.0.0.1:{admin}/ws")
        assert response.code == 404
        response = await treq.post(
            f"http://127.0.0.1:{admin}/tapr/ws/conn/send",
            data=json.dumps({"payload": "hi", "users": ["alice"]}).encode(),
            headers={"Authorization": "Bearer tok-0123456789"},
        )
        assert (await treq.json_content(response))["data"] == {"matched": 1}
        assert json.loads(await client.next_message()) == "hi"
    finally:
        await daemon.terminate()


def make_certificate(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_node_clients(app, tmp_path, node_ws):
    key_path, cert_path = make_certificate(tmp_path)
    daemon = await start_daemon(
        "--listen",
        f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
        "--app-url",
        app.url,
        cwd=tmp_path,
    )
    try:
        await tls_round_trip(daemon, app, cert_path)
    finally:
        await daemon.terminate()


SECRETS = ["TOKENSECRET0123456789", "SESSIONSECRET987", "MESSAGEBODYSECRET", "PAYLOADSECRET"]


async def exchange_secrets(daemon, app):
    client = await py_client(
        daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": f"auth_token={SECRETS[0]}; session={SECRETS[1]}"}
    )
    opened = await app.wait_for_action("open")
    client.send_text(json.dumps({"event": "chat", "data": SECRETS[2]}))
    await app.wait_for_action("message")
    response = await treq.post(
        daemon.base + "/tapr/ws/conn/send",
        data=json.dumps({"payload": SECRETS[3], "conn_id": opened["conn_id"]}).encode(),
    )
    await treq.content(response)
    await client.next_message()
    await treq.content(await treq.post(daemon.base + "/tapr/ws/conn/send", data=b'{"payload":"x"}'))
    client.sendClose()
    await app.wait_for_action("close")


@pytest.mark.parametrize("level", ["info", "debug"])
@pytest_twisted.ensureDeferred
async def test_logs_hold_no_secrets(app, tmp_path, level):
    daemon = await start_daemon("--app-url", app.url, "--log-connections", cwd=tmp_path, log_level=level)
    try:
        await exchange_secrets(daemon, app)
    finally:
        await daemon.terminate()
    log = "\n".join(daemon.log_lines())
    assert "open " in log and "close " in log  # the log did record the connection
    for secret in SECRETS:
        assert secret not in log, f"{secret} leaked into the {level} log"
    if level == "debug":
        assert SECRETS[0][:4] + "…" in log  # shortened, enough to tell tokens apart


def get_status(port, source):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        connection.request("GET", "/tapr/ws/conn/list")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_rate_limit_degrades_only_the_flooding_peer(tmp_path):
    daemon = await start_daemon("--rate-limit", "5", cwd=tmp_path)
    try:
        # A burst of 10, then 5 a second: however fast this machine sends,
        # the flooder is refused once it has had what that allows.
        started = time.monotonic()
        flood = []
        while 429 not in flood and len(flood) < 1000:
            flood.append(get_status(daemon.port, "127.0.0.2"))
        elapsed = time.monotonic() - started
        assert flood[-1] == 429
        assert flood[:5] == [200] * 5
        assert len(flood) - 1 <= 10 + 5 * elapsed + 1
        assert get_status(daemon.port, "127.0.0.3") == 200
        assert get_status(daemon.port, "127.0.0.1") == 200
    finally:
        await daemon.terminate()
