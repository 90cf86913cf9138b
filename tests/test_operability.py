"""
What an operator and a client library see at the edges: the build and
process metrics, Retry-After on refusals that clear with time, answers that
end in a newline, and IPv6 listeners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import Agent

import wsgw
from harness import PyClient, bounded, py_client, scrape, start_daemon


@pytest_twisted.ensureDeferred
async def test_metrics_tell_the_version_and_the_process(tmp_path: Path) -> None:
    daemon = await start_daemon(cwd=tmp_path)
    try:
        samples = await scrape(daemon)
        assert samples[f"wsgw_build_info|version={wsgw.__version__}"] == 1
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
            assert samples[name] > 0, name
    finally:
        await daemon.terminate()


def retry_after(response: Any) -> List[bytes]:
    return response.headers.getRawHeaders(b"retry-after") or []


async def upgrade(base: str, user: str, origin: str = "") -> Any:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "X-Bfl-User": user,
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    if origin:
        headers["Origin"] = origin
    return await treq.get(base + "/ws", headers=headers)


@pytest_twisted.ensureDeferred
async def test_handshake_refusals_that_clear_with_time_say_when_to_retry(tmp_path: Path) -> None:
    daemon = await start_daemon("--max-connections", "2", "--max-connections-per-user", "1", cwd=tmp_path)
    try:
        await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        response = await upgrade(daemon.base, "alice")
        assert response.code == 429
        assert [int(value) >= 1 for value in retry_after(response)] == [True]
        await treq.content(response)
        await py_client(daemon.ws_url, {"X-Bfl-User": "bob"})
        response = await upgrade(daemon.base, "carol")
        assert response.code == 503
        assert [int(value) >= 1 for value in retry_after(response)] == [True]
        await treq.content(response)
        # A refusal that time does not clear says nothing of the kind.
        response = await upgrade(daemon.base, "dave", origin="https://elsewhere.test")
        assert response.code == 403 and retry_after(response) == []
        await treq.content(response)
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_rate_limited_requests_say_when_to_retry(tmp_path: Path) -> None:
    # 0.5 a second, bursts of 1: the first request takes the burst.
    daemon = await start_daemon("--rate-limit", "0.5", cwd=tmp_path)
    try:
        response = await treq.get(daemon.base + "/tapr/ws/conn/list")
        assert response.code == 200
        await treq.content(response)
        for response in (await upgrade(daemon.base, "alice"), await treq.get(daemon.base + "/tapr/ws/conn/list")):
            assert response.code == 429
            assert [int(value) >= 1 for value in retry_after(response)] == [True]
            await treq.content(response)
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_api_answers_end_with_a_newline(tmp_path: Path) -> None:
    daemon = await start_daemon(cwd=tmp_path)
    try:
        for response in (
            await treq.get(daemon.base + "/tapr/ws/conn/list"),
            await treq.post(daemon.base + "/tapr/ws/conn/send", data=b"{not json"),
            await treq.get(daemon.base + "/tapr/ws/conn/nowhere"),
            await treq.get(daemon.base + "/healthz"),
        ):
            body = await treq.content(response)
            assert body.endswith(b"}\n") and body.count(b"\n") == 1, body
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_an_ipv6_listener_serves_ws_and_the_api_on_loopback(tmp_path: Path) -> None:
    daemon = await start_daemon("--listen", "tcp6:0:interface=\\:\\:1", cwd=tmp_path)
    try:
        # treq cannot take an IPv6 literal (it IDNA-encodes the host); Agent can.
        agent = Agent(reactor)
        list_url = f"http://[::1]:{daemon.port}/tapr/ws/conn/list".encode()
        response = await agent.request(b"GET", list_url)
        assert response.code == 200
        assert json.loads(await treq.content(response)) == {"code": 0, "message": "success", "data": []}
        factory = WebSocketClientFactory(f"ws://[::1]:{daemon.port}/ws", headers={"X-Bfl-User": "alice"})
        opened: Deferred[PyClient] = Deferred()

        def build(addr: Any) -> PyClient:
            proto = PyClient()
            proto.factory = factory
            proto.opened.chainDeferred(opened)
            return proto

        factory.buildProtocol = build  # type: ignore[method-assign]
        reactor.connectTCP("::1", daemon.port, factory, timeout=5)
        client = await bounded(opened, what="WebSocket open over IPv6")
        response = await agent.request(b"GET", list_url)
        [entry] = json.loads(await treq.content(response))["data"]
        assert entry["name"] == "alice"
        client.sendClose()
        await bounded(client.closed, what="close")
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_a_dual_stack_listener_serves_ipv4_and_ipv6_loopback(tmp_path: Path) -> None:
    """tcp6 on :: takes IPv4 clients too (Linux maps them), as the README says."""
    daemon = await start_daemon("--listen", "tcp6:0:interface=\\:\\:", cwd=tmp_path)
    try:
        agent = Agent(reactor)
        for host in ("127.0.0.1", "[::1]"):
            response = await agent.request(b"GET", f"http://{host}:{daemon.port}/healthz".encode())
            assert response.code == 200, host
            await treq.content(response)
    finally:
        await daemon.terminate()
