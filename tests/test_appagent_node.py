"""
The app client against a real Node app whose idle keep-alive connections
close after a short while (Node's own is 5 s): no event fails because a
pooled connection went stale.  Real processes and sockets.
"""

from __future__ import annotations

import json
import os
from typing import Any, List

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from harness import NODE_DIR, OutputLines, _node, bounded
from wsgw.eventpost import EventPoster, build_http_client
from wsgw.events import Event


class _App(OutputLines):
    """tests/node/keepalive_app.js: one JSON line per report."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: List[dict] = []

    def line(self, line: bytes) -> None:
        if line.strip():
            self.reports.append(json.loads(line))

    @property
    def connections(self) -> int:
        return max([report["connections"] for report in self.reports if "connections" in report], default=0)


async def _start(*args: str) -> Any:
    app = _App()
    process = reactor.spawnProcess(
        app, _node(), [_node(), str(NODE_DIR / "keepalive_app.js"), *args], env=dict(os.environ), path=str(NODE_DIR)
    )
    port = await app.waiters.wait(
        lambda: next((report["listening"] for report in app.reports if "listening" in report), None),
        "the Node app to listen",
    )
    return app, process, f"http://127.0.0.1:{port}/ws/message"


async def _stop(app: _App, process: Any) -> None:
    process.signalProcess("KILL")
    await bounded(app.ended, what="the Node app to exit")


def _event(seq: int) -> Event:
    return Event("c1", seq, "message", b'{"data":1}', remote_addr="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_idle_connections_closed_by_the_app_cost_no_event() -> None:
    """Node closes each idle connection 200 ms after its last answer and
    does not say so: requests sent just as it closes are retried at once on
    a new connection, so every attempt succeeds."""
    app, process, url = await _start("200", "nohint")
    try:
        poster = EventPoster(build_http_client(reactor, 4), url, reactor, timeout=5.0)
        results = []
        for seq, gap in enumerate([0.0, 0.19, 0.2, 0.21, 0.195, 0.205, 0.2, 0.199, 0.201, 0.2] * 2):
            await deferLater(reactor, gap, lambda: None)
            results.append(await bounded(poster.post(_event(seq)), what=f"event {seq}"))
        assert results == [None] * len(results)  # every one delivered
        assert app.connections > 1  # the app did close idle connections
    finally:
        await _stop(app, process)


@pytest_twisted.ensureDeferred
async def test_keep_alive_timeout_from_node_is_honoured() -> None:
    """Node's http server with keepAliveTimeout 1200 ms says
    `Keep-Alive: timeout=1`: a connection is reused within half a second,
    and never after."""
    app, process, url = await _start("1200")
    try:
        poster = EventPoster(build_http_client(reactor, 4), url, reactor, timeout=5.0)
        assert await poster.post(_event(0)) is None
        await deferLater(reactor, 0.2, lambda: None)
        assert await poster.post(_event(1)) is None
        assert app.connections == 1
        await deferLater(reactor, 0.7, lambda: None)
        assert await poster.post(_event(2)) is None
        assert app.connections == 2
    finally:
        await _stop(app, process)


@pytest_twisted.ensureDeferred
async def test_a_short_keep_alive_timeout_means_no_reuse() -> None:
    """keepAliveTimeout 200 ms: Node says `timeout=0`, so no connection is
    kept for a later event, and none goes stale."""
    app, process, url = await _start("200")
    try:
        poster = EventPoster(build_http_client(reactor, 4), url, reactor, timeout=5.0)
        for seq, gap in enumerate([0.0, 0.1, 0.2, 0.25]):
            await deferLater(reactor, gap, lambda: None)
            assert await poster.post(_event(seq)) is None
        assert app.connections == 4
    finally:
        await _stop(app, process)
