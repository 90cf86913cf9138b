"""
TLS under the shipped systemd units: the daemon started under the same
kernel restrictions the unit applies (tests/unit_exec.py) serves TLS as the
unit configures it (wsgw-tls.service: --tls-cert and --tls-key from the
credentials directory; wsgw.service: the README's ssl: listener) to a Node
``wss://`` client and posts its events to an ``https://`` app.  And why
the units leave out MemoryDenyWriteExecute: under that rule the same
handshake fails.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from test_security import make_certificate
from twisted.internet import reactor, ssl
from twisted.web.server import Site
from unit_exec import NO_MDWE, mdwe_supported, restrictions, service_settings

from harness import RecordingApp, node_client, py_client, start_daemon, tls_round_trip

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
WRAPPER = Path(__file__).resolve().parent / "unit_exec.py"

pytestmark = [
    pytest.mark.integration,
    # Twisted's PrivateCertificate.options() hands pyOpenSSL its own objects.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]

needs_mdwe = pytest.mark.skipif(
    not mdwe_supported(), reason="the kernel has no PR_SET_MDWE (Linux 6.3 or later), so the rule cannot be applied"
)


def https_app(key_path, cert_path):
    """A recording app served over TLS with the test's certificate."""
    app = RecordingApp()
    pem = key_path.read_bytes() + cert_path.read_bytes()
    options = ssl.PrivateCertificate.loadPEM(pem).options()
    app.port = reactor.listenSSL(0, Site(app), options, interface="127.0.0.1")
    app.url = f"https://localhost:{app.port.getHost().port}/ws/message"
    return app


def unit_tls(unit, tmp_path, key_path, cert_path):
    """
    How the unit serves TLS, on a free loopback port: (listen, environment).
    Both units serve the socket systemd passes (tests/test_tls_daemon.py
    passes one).  wsgw.service's is plain TCP (TLS in the proxy in front, or
    the README's ssl: example, used here); wsgw-tls.service wraps its own in
    TLS from the unit's WSGW_TLS_CERT and WSGW_TLS_KEY, which name the
    credentials directory (%d), substituted here.
    """
    settings = dict(re.findall(r"^Environment=(WSGW_\w+)=(\S+)$", unit.read_text(), re.M))
    assert settings["WSGW_LISTEN"].startswith("systemd:"), settings
    if "WSGW_TLS_CERT" not in settings:
        return f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}", {}
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(key_path, credentials / "key.pem")
    shutil.copy(cert_path, credentials / "cert.pem")
    tls = {name: value.replace("%d", str(credentials)) for name, value in settings.items() if "_TLS_" in name}
    assert set(tls) == {"WSGW_TLS_CERT", "WSGW_TLS_KEY"}, tls
    return "tcp:0:interface=127.0.0.1", tls


async def start_restricted(unit, tmp_path, listen, app, cert_path, mdwe=False, env=None):
    wrapper = [sys.executable, str(WRAPPER), str(unit), *(["--mdwe"] if mdwe else []), "--"]
    return await start_daemon(
        "--listen",
        listen,
        "--app-url",
        app.url,
        "--drain-timeout",
        "1",
        cwd=tmp_path,
        # The daemon trusts the app's certificate as it would a real CA's.
        env={"SSL_CERT_FILE": str(cert_path), **(env or {})},
        wrapper=wrapper,
    )


@pytest.mark.parametrize("unit_name", ["wsgw.service", "wsgw-tls.service"])
@pytest_twisted.ensureDeferred
async def test_tls_works_under_the_units_restrictions(unit_name, tmp_path, node_ws):
    unit = UNITS / unit_name
    if "mdwe" in restrictions(service_settings(unit.read_text())) and not mdwe_supported():
        pytest.skip(f"{unit_name} sets MemoryDenyWriteExecute and this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    key_path, cert_path = make_certificate(tmp_path)
    app = https_app(key_path, cert_path)
    listen, env = unit_tls(unit, tmp_path, key_path, cert_path)
    daemon = await start_restricted(unit, tmp_path, listen, app, cert_path, env=env)
    try:
        applied = next(line for line in daemon.log_lines() if line.startswith("unit_exec: applied"))
        assert "no_new_privs" in applied, applied
        await tls_round_trip(daemon, app, cert_path)
        assert not [line for line in daemon.log_lines() if "write+execute" in line]
    finally:
        await daemon.terminate()
        await app.port.stopListening()


@needs_mdwe
@pytest.mark.parametrize("path", ["ssl listener", "https app"])
@pytest_twisted.ensureDeferred
async def test_memory_deny_write_execute_breaks_tls(path, tmp_path, node_ws):
    """
    Why the units leave MemoryDenyWriteExecute out.  If this fails, cffi no
    longer needs write+execute memory here and the setting can come back.
    """
    unit = UNITS / "wsgw.service"
    key_path, cert_path = make_certificate(tmp_path)
    app = https_app(key_path, cert_path)
    if path == "ssl listener":
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    else:
        listen = "tcp:0:interface=127.0.0.1"
    daemon = await start_restricted(unit, tmp_path, listen, app, cert_path, mdwe=True)
    try:
        if path == "ssl listener":
            with pytest.raises(AssertionError, match="node client failed"):
                await node_client(f"wss://localhost:{daemon.port}/ws", env={"WS_CA_FILE": str(cert_path)})
        else:
            client = await py_client(daemon.ws_url)  # its open event goes to the https app
        await daemon.proto.waiters.wait(
            lambda: any("Cannot allocate write+execute memory" in line for line in daemon.log_lines()),
            "the daemon to log cffi's MemoryError",
        )
        assert app.events == []
        if path == "https app":
            client.dropConnection()
    finally:
        await daemon.terminate()
        await app.port.stopListening()


def test_units_leave_out_memory_deny_write_execute():
    for unit in sorted(UNITS.glob("*.service")):
        settings = service_settings(unit.read_text())
        assert settings.get("MemoryDenyWriteExecute", "no") == "no", unit.name
        assert settings["NoNewPrivileges"] == "yes", unit.name


def test_wrapper_says_when_the_kernel_lacks_the_rule(tmp_path):
    """Without PR_SET_MDWE the wrapper exits 75 instead of running unrestricted."""
    if mdwe_supported():
        pytest.skip("this kernel has PR_SET_MDWE")
    unit = tmp_path / "x.service"
    unit.write_text("[Service]\nMemoryDenyWriteExecute=yes\n")
    result = subprocess.run([sys.executable, str(WRAPPER), str(unit), "--", "/bin/true"], timeout=30)
    assert result.returncode == NO_MDWE


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_tls_units_verify(tmp_path):
    service = (UNITS / "wsgw-tls.service").read_text()
    socket_unit = (UNITS / "wsgw-tls.socket").read_text()
    # systemd binds 443 and passes it: the service keeps no capability.
    assert "Requires=wsgw-tls.socket" in service and "ListenStream=0.0.0.0:443" in socket_unit
    assert "AmbientCapabilities" not in service
    assert re.search(r"^CapabilityBoundingSet=$", service, re.M)
    (tmp_path / "wsgw-tls.service").write_text(service.replace("/opt/wsgw/bin/twist", shutil.which("true")))
    (tmp_path / "wsgw-tls.socket").write_text(socket_unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "wsgw-tls.socket"), str(tmp_path / "wsgw-tls.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in (result.stdout + result.stderr).splitlines() if "wsgw" in line] == []
