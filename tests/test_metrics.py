"""
Operators see what happens: each metric moves when it should, and health
and readiness say whether the gateway can serve.
"""

import json

import pytest_twisted
import treq
from twisted.internet.task import LoopingCall

from harness import eventually, free_port, py_client, scrape, start_daemon, upgrade_request


@pytest_twisted.ensureDeferred
async def test_metrics_move_when_they_should(app, tmp_path):
    daemon = await start_daemon(
        "--app-url",
        app.url,
        "--ping-timeout",
        "1",
        "--ping-check-interval",
        "0.1",
        "--allowed-origin",
        "https://ok.example",
        cwd=tmp_path,
    )
    try:
        before = await scrape(daemon)
        assert before["wsgw_connections|access=private"] == 0
        assert before["wsgw_connections_opened_total"] == 0

        private = await py_client(daemon.ws_url, {"X-Bfl-User": "alice", "Cookie": "auth_token=t"})
        public = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        await app.wait_for(lambda: len(app.events) >= 2, "two opens")
        private.send_text('{"event":"ping"}')
        await private.next_message()
        # Keep the private one alive with WebSocket pings (not counted as
        # messages) while the public one stays silent.
        keepalive = LoopingCall(private.sendPing)
        keepalive.start(0.2)
        private.send_text('{"event":"hello"}')
        await app.wait_for_action("message")
        response = await treq.post(
            daemon.base + "/tapr/ws/conn/send", data=json.dumps({"payload": "hi", "users": ["alice"]}).encode()
        )
        await treq.content(response)
        await private.next_message()
        await public.next_message()
        status, _ = await upgrade_request(daemon.base, headers={"Origin": "https://evil.example"})
        assert status == 403

        now = await scrape(daemon)
        assert now["wsgw_connections|access=private"] == 1
        assert now["wsgw_connections|access=public"] == 1
        assert now["wsgw_connections_opened_total"] == 2
        assert now["wsgw_frames_received_total"] == 2  # ping and hello
        assert now["wsgw_bytes_received_total"] == len('{"event":"ping"}') + len('{"event":"hello"}')
        assert now["wsgw_frames_sent_total"] == 3  # pong and two deliveries of "hi"
        assert now["wsgw_bytes_sent_total"] == len('{"event":"pong"}') + 2 * len('"hi"')
        assert now["wsgw_app_events_delivered_total"] == 3
        assert now["wsgw_app_request_seconds_count"] == 3
        assert now["wsgw_handshakes_refused_total|reason=origin"] == 1

        # The silent one expires; the other closes itself.
        await public.closed
        keepalive.stop()
        private.sendClose()
        await private.closed
        await app.wait_for(lambda: [e["action"] for e in app.events].count("close") == 2, "two closes")
        after = await scrape(daemon)
        assert after["wsgw_connections_closed_total|reason=ping_timeout"] == 1
        assert after["wsgw_connections_closed_total|reason=client"] == 1
        assert after["wsgw_connections|access=private"] == 0
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_retries_drops_backlog_and_readiness_when_the_app_is_down(tmp_path):
    daemon = await start_daemon(
        "--app-url",
        f"http://127.0.0.1:{free_port()}/ws/message",
        "--retry-window",
        "1",
        "--app-down-after",
        "0.5",
        cwd=tmp_path,
    )
    try:
        response = await treq.get(daemon.base + "/readyz")
        assert response.code == 200
        assert (await treq.json_content(response))["app"] == "unknown"

        client = await py_client(daemon.ws_url)
        for n in range(3):
            client.send_text(json.dumps({"n": n}))

        samples = await scrape(daemon)
        assert samples["wsgw_app_backlog_events"] >= 1

        async def dropped():
            return (await scrape(daemon)).get("wsgw_app_events_dropped_total", 0) >= 1

        await eventually(dropped, "the retry window to pass")
        samples = await scrape(daemon)
        assert samples["wsgw_app_retries_total"] >= 1
        assert samples["wsgw_app_events_dropped_total"] >= 1

        async def unready():
            return (await treq.get(daemon.base + "/readyz")).code == 503

        await eventually(unready, "failures for --app-down-after to make the app down")
        response = await treq.get(daemon.base + "/readyz")
        assert response.code == 503
        body = await treq.json_content(response)
        assert body["app"] == "down" and body["listening"] is True
        response = await treq.get(daemon.base + "/healthz")
        assert (response.code, (await treq.json_content(response))["code"]) == (200, 0)
        client.dropConnection(abort=True)
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_json_logs_carry_fields(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, "--log-connections", cwd=tmp_path, log_format="json")
    try:
        client = await py_client(daemon.ws_url, {"X-Bfl-User": "alice"})
        opened = await app.wait_for_action("open")
        client.sendClose(1000, "bye")
        await app.wait_for_action("close")
    finally:
        await daemon.terminate()
    # Every line is one JSON object (after the RFC 7464 record separator).
    events = [json.loads(line.lstrip("\x1e")) for line in daemon.log_lines() if line.strip("\x1e ")]
    opens = [e for e in events if e.get("log_format", "").startswith("open ")]
    closes = [e for e in events if e.get("log_format", "").startswith("close ")]
    assert opens[0]["conn_id"] == opened["conn_id"] and opens[0]["user_name"] == "alice"
    assert (closes[0]["conn_id"], closes[0]["code"], closes[0]["reason"]) == (opened["conn_id"], 1000, "bye")
