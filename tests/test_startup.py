"""
The daemon's start and stop as an operator sees them, through `twist wsgw`
as a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred

import wsgw
from harness import RecordingApp, py_client, start_daemon


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_and_exits_0_even_when_repeated(app: RecordingApp, tmp_path: Path) -> None:
    """
    What tap.StopOnSignal buys.  Without it, `twist` re-raises SIGTERM once
    the reactor stops, so a clean, complete drain ends as "killed by
    SIGTERM" (status 143 to a shell, a supervisor or a container runtime),
    and a second SIGTERM during the drain logs a ReactorNotRunning
    traceback.  (systemd counts a SIGTERM death as a clean stop, so under
    the shipped unit the two behave alike.)
    """
    hold: Deferred[None] = Deferred()

    def behaviour(event: Any) -> Tuple[int, Union[int, Deferred[None]]]:
        return (200, hold) if event["action"] == "close" else (200, 0)

    app.behaviour = behaviour
    daemon = await start_daemon("--app-url", app.url, "--drain-timeout", "20", cwd=tmp_path)
    client = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
    await app.wait_for_action("open")
    daemon.process.signalProcess("TERM")
    await app.wait_for_action("close")  # the drain has begun, and waits for the app
    daemon.process.signalProcess("TERM")
    await daemon.proto.waiters.wait(
        lambda: any("received SIGTERM again" in line or "Received SIGTERM" in line for line in daemon.log_lines()),
        "the second SIGTERM to be noticed",
    )
    hold.callback(None)
    assert await daemon.terminate() == (0, None), "\n".join(daemon.log_lines())
    assert (await client.closed)[0] == 1001
    log = "\n".join(daemon.log_lines())
    assert "Traceback" not in log and "ReactorNotRunning" not in log, log
    assert sum("closing connections and draining" in line for line in daemon.log_lines()) == 1, log


@pytest_twisted.ensureDeferred
async def test_sigint_is_a_requested_stop_too(tmp_path: Path) -> None:
    daemon = await start_daemon(cwd=tmp_path)
    # Served: the reactor runs, and StopOnSignal has its handlers (a signal
    # before that gets twist's own handling).
    assert (await treq.get(daemon.base + "/healthz")).code == 200
    assert await daemon.terminate(signal.SIGINT) == (0, None)
    assert any("received SIGINT; closing connections and draining" in line for line in daemon.log_lines())


@pytest_twisted.ensureDeferred
async def test_start_up_says_where_it_serves_and_where_events_go(app: RecordingApp, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    daemon = await start_daemon(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--admin-listen",
        f"unix:{sock}",
        "--app-url",
        app.url,
        cwd=tmp_path,
        listeners=1,
    )
    try:
        ready = await daemon.proto.waiters.wait(
            lambda: [line for line in daemon.log_lines() if "[wsgw.tap#" in line and " ready" in line],
            "the ready line",
        )
        lines = [line.split("] ", 1)[1] for line in daemon.log_lines() if "[wsgw.tap#" in line]
        assert lines == [
            f"serving /ws at ws://127.0.0.1:{daemon.port}/ws (tcp:0:interface=127.0.0.1)",
            f"serving the API alone at http://localhost/tapr/ws/conn/ on unix:{sock} (unix:{sock})",
            f"posting client events to {app.url}",
            f"wsgw {wsgw.__version__} ready, engine memory",
        ], ready
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_start_up_warns_when_events_go_nowhere(tmp_path: Path) -> None:
    daemon = await start_daemon(cwd=tmp_path)
    try:
        await daemon.proto.waiters.wait(lambda: any(" ready, engine" in line for line in daemon.log_lines()), "ready")
        lines = [line.split(" ", 1)[1] for line in daemon.log_lines() if "[wsgw.tap#" in line]
        assert lines[0] == (
            f"[wsgw.tap#info] serving /ws at ws://127.0.0.1:{daemon.port}/ws and the API at"
            f" http://127.0.0.1:{daemon.port}/tapr/ws/conn/ (tcp:0:interface=127.0.0.1)"
        )
        assert lines[1] == (
            "[wsgw.tap#warn] no app URL is set (--app-url, or WS_PORT/WS_URL): client events go nowhere,"
            " only the API can reach clients"
        )
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_json_log_records_carry_the_rendered_message(tmp_path: Path) -> None:
    daemon = await start_daemon(cwd=tmp_path, log_format="json")
    try:
        records = await daemon.proto.waiters.wait(
            lambda: [r for r in map(json_record, daemon.log_lines()) if r and " ready, engine" in r.get("text", "")],
            "the ready record",
        )
        assert records[0]["log_format"] == "wsgw {version} ready, engine {engine}"
        assert records[0]["text"] == f"wsgw {wsgw.__version__} ready, engine memory"
        assert records[0]["version"] == wsgw.__version__
    finally:
        await daemon.terminate()


def json_record(line: str) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(line.strip("\x1e"))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def held_port(ephemeral: bool) -> socket.socket:
    """A listening socket on a loopback port inside (or outside) Linux's ephemeral range."""
    if ephemeral:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # the kernel picks from the ephemeral range
        sock.listen()
        return sock
    for port in range(20000, 20200):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    raise AssertionError("no free port in 20000-20199")


def start_on(port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))}
    environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "twisted", "--log-format=text", "wsgw", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environment,
    )


@pytest.mark.parametrize("ephemeral", [True, False])
def test_a_port_in_use_is_one_line_without_a_traceback(ephemeral: bool, tmp_path: Path) -> None:
    sock = held_port(ephemeral)
    port = sock.getsockname()[1]
    try:
        result = start_on(port, tmp_path)
    finally:
        sock.close()
    assert result.returncode == 1
    output = (result.stderr + result.stdout).strip().splitlines()
    assert len(output) == 1, "\n".join(output)
    line = output[0]
    assert line.startswith(f"cannot listen on tcp:{port}:interface=127.0.0.1: port {port} is in use"), line
    assert f"find it with: ss -ltnp 'sport = :{port}'" in line
    if ephemeral:
        assert f"sysctl -w net.ipv4.ip_local_reserved_ports={port}" in line and "socket activation" in line
        assert "ephemeral range" in line
    else:
        assert "ephemeral" not in line and "ip_local_reserved_ports" not in line
    if port != 40010:
        assert "40010" not in line  # the port asked for, not the default


@pytest_twisted.ensureDeferred
async def test_factories_are_not_announced_at_info(app: RecordingApp, tmp_path: Path) -> None:
    """No "Starting factory" / "Stopping factory" per app connection (or per listener)."""
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    client = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
    opened = await app.wait_for_action("open")
    client.sendClose()
    await app.wait_for_action("close", opened["conn_id"])
    assert await daemon.terminate() == (0, None)
    noise = [line for line in daemon.log_lines() if "Starting factory" in line or "Stopping factory" in line]
    assert noise == []
