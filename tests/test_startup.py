"""
The daemon's start and stop as an operator sees them, through `twist wsgw`
as a real process.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Tuple, Union

import pytest_twisted
import treq
from twisted.internet.defer import Deferred

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
