"""
The minimal example apps, each a real process behind the real gateway
(`twist wsgw`) with a real Node `ws` client, on loopback ephemeral ports:
examples/node_app.js (Node's plain http module) and examples/flask_app.py
(Flask) receive the open, message and close events and answer a message
through /tapr/ws/conn/send.  Also examples/node_client.js --help.
"""

import json
import subprocess
import sys
from pathlib import Path
from shutil import which

import pytest
import pytest_twisted

from harness import free_port, node_client, start_daemon, start_process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.integration

APPS = {
    "node http": lambda port, gateway: [which("node"), str(EXAMPLES / "node_app.js"), str(port), gateway],
    "flask": lambda port, gateway: [sys.executable, str(EXAMPLES / "flask_app.py"), str(port), gateway],
}
LISTENING = r"app listening on http://127\.0\.0\.1:\d+/|Running on http://127\.0\.0\.1:\d+"


@pytest.mark.parametrize("name", sorted(APPS))
@pytest_twisted.ensureDeferred
async def test_example_app_gets_events_and_answers(name, tmp_path, node_ws):
    if name == "flask":
        pytest.importorskip("flask", reason="Flask is in the test extra: .venv/bin/pip install '.[test]'")
    app_port = free_port()
    daemon = await start_daemon("--app-url", f"http://127.0.0.1:{app_port}/ws/message", cwd=tmp_path)
    app = client = None
    try:
        app = await start_process(APPS[name](app_port, daemon.base), LISTENING, cwd=ROOT)
        client = await node_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        conn_id = (await app.wait_line(r"^open (\S+) alice \{\}$", "the open event")).group(1)

        client.send('{"event":"ping","data":{}}')  # answered by the gateway, never forwarded
        client.send('{"event":"chat","data":{"text":"hi"}}')
        replies = await client.wait_messages(2)
        assert replies[0] == '{"event":"pong"}'
        assert json.loads(replies[1]) == {"event": "echo", "data": {"event": "chat", "data": {"text": "hi"}}}
        await app.wait_line(rf'^message {conn_id} alice {{"event": ?"chat", ?"data": ?{{"text": ?"hi"}}}}$')

        client.command(close=[1000, "bye"])
        await client.wait_close()
        await app.wait_line(rf"^close {conn_id} alice \{{\}}$", "the close event")
        assert not [line for line in app.lines if line.startswith("ping")]
    finally:
        if client is not None:
            await client.stop()
        if app is not None:
            await app.terminate()
        await daemon.terminate()


def test_node_client_help_prints_usage_and_sends_nothing():
    """--help prints the usage and exits 0 without connecting (no gateway runs here)."""
    for flag in ("--help", "-h"):
        result = subprocess.run(
            ["node", str(EXAMPLES / "node_client.js"), flag], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: node examples/node_client.js"), result.stdout
        assert "--url" in result.stdout and "--user" in result.stdout
        assert "connected" not in result.stderr and "error" not in result.stderr


def test_node_client_refuses_an_unknown_option():
    result = subprocess.run(
        ["node", str(EXAMPLES / "node_client.js"), "--uesr", "bob", "hi"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "unknown option --uesr" in result.stderr and "--help" in result.stderr
