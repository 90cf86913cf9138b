"""
The reverse-proxy recipe, examples/nginx/wsgw.conf, as shipped, in a real
nginx (Debian's package) started by the test on a free loopback port, in
front of the real gateway and the example chat app:

    Node ws client --wss--> nginx --/ws, X-Bfl-User set--> twist wsgw --POST--> chat app
                                  --/ -----------------------------------------> chat app (page)
                                  --/tapr/ --> 404

Only the ports, the certificate paths and the listen address are changed.
"""

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import pytest_twisted
from test_security import make_certificate
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from harness import api, free_port, node_client, start_daemon, start_process

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "nginx" / "wsgw.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        NGINX is None and os.environ.get("CI") != "true",
        reason="nginx is not installed (apt-get install -y nginx-light); under CI=true this test runs",
    ),
]


def recipe_for(port, gateway_port, app_port, key_path, cert_path):
    """The shipped recipe, pointed at this test's ports and certificate."""
    text = RECIPE.read_text()
    replacements = [
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("server 127.0.0.1:40010;", f"server 127.0.0.1:{gateway_port};"),
        ("server 127.0.0.1:8888;", f"server 127.0.0.1:{app_port};"),
        ("/etc/nginx/wsgw/cert.pem", str(cert_path)),
        ("/etc/nginx/wsgw/key.pem", str(key_path)),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"the recipe no longer says {old!r}"
        text = text.replace(old, new)
    return text


def readme_gateway_flags():
    """The flags of the gateway command under "Behind nginx" in README.rst, but its --listen and --app-url."""
    text = (ROOT / "README.rst").read_text()
    section = text[text.index("Behind nginx\n") : text.index("Troubleshooting\n")]
    command = next(line.strip() for line in section.splitlines() if line.strip().startswith(".venv/bin/twist wsgw"))
    words, flags = shlex.split(command)[2:], []
    while words:
        word = words.pop(0)
        if word in ("--listen", "--app-url"):
            words.pop(0)
        else:
            flags.append(word)
    assert "--require-user" in flags and "--trusted-proxy" in flags, command
    return flags


def nginx_conf(prefix, site):
    """A whole nginx.conf around the recipe (it belongs in http {})."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers read the test's private files
    return f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    include {site};
}}
"""


@pytest_twisted.ensureDeferred
async def test_nginx_recipe_in_front_of_the_gateway(tmp_path, node_ws):
    assert NGINX is not None, "CI=true: nginx must be installed (.ci/run installs nginx-light)"
    key_path, cert_path = make_certificate(tmp_path)
    app_port, proxy_port = free_port(), free_port()
    daemon = await start_daemon(
        *readme_gateway_flags(), "--app-url", f"http://127.0.0.1:{app_port}/ws/message", cwd=tmp_path
    )
    app = proxy = None
    try:
        app = await start_process(
            [sys.executable, str(ROOT / "examples" / "chat_app.py"), "--port", str(app_port), "--gateway", daemon.base],
            r"chat app listening on",
            cwd=ROOT,
        )
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "wsgw.conf").write_text(recipe_for(proxy_port, daemon.port, app_port, key_path, cert_path))
        (prefix / "nginx.conf").write_text(nginx_conf(prefix, prefix / "wsgw.conf"))
        proxy = await start_process(
            [NGINX, "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", "daemon off;"],
            r"start worker process",
            cwd=tmp_path,
        )
        origin = f"https://localhost:{proxy_port}"
        url = f"wss://localhost:{proxy_port}/ws"
        trust = {"WS_CA_FILE": str(cert_path)}

        # Signed in (the demo's cookie), a forged user header replaced, and
        # the page's own origin accepted by the gateway's same-origin check.
        forged = {"X-Bfl-User": "mallory", "X-Original-Forwarded-For": "203.0.113.9"}
        alice = await node_client(url, {"Cookie": "auth_token=tok-alice", "Origin": origin, **forged}, env=trust)
        hello = await alice.wait(
            lambda events: next((e for e in events if "hello" in e.get("message", "")), None), "hello"
        )
        assert '"user":"alice"' in hello["message"].replace(" ", "")
        alice.send('{"event":"ping","data":{}}')  # the gateway's heartbeat, through the proxy
        await alice.wait(lambda events: any(e.get("message") == '{"event":"pong"}' for e in events), "pong")

        # The address is nginx's view of the client, not what the client claimed.
        status, listed = await api(daemon, "list")
        assert status == 200
        (entry,) = listed["data"]
        assert entry["name"] == "alice" and [c["remoteAddr"] for c in entry["conns"]] == ["127.0.0.1"]

        # Not signed in: the proxy refuses; another site's page: the gateway refuses.
        with pytest.raises(AssertionError, match="HTTP 401"):
            await node_client(url, {"Origin": origin}, env=trust)
        with pytest.raises(AssertionError, match="HTTP 403"):
            await node_client(url, {"Cookie": "auth_token=tok-bob", "Origin": "https://evil.example"}, env=trust)

        # The page comes from the app; the gateway's API is not routed.
        trust_root = ssl.Certificate.loadPEM(cert_path.read_bytes())
        agent = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root)))
        page = await agent.get(f"{origin}/", headers={"Cookie": "auth_token=tok-alice"})
        assert page.code == 200 and "wsgw chat" in await page.text()
        for path in ("/tapr/ws/conn/list", "/tapr/ws/conn/send"):
            answer = await agent.post(f"{origin}{path}", data=b'{"payload":"x","users":["alice"]}')
            assert answer.code == 404, path
            await answer.content()
        await alice.stop()
    finally:
        if proxy is not None:
            await proxy.terminate()
        if app is not None:
            await app.terminate()
        await daemon.terminate()
