"""
--trusted-proxy: forwarding headers are believed only from trusted peers;
the address the app sees (remote_addr, X-Forwarded-For) is the nearest
untrusted one.  Against the real daemon and a real app server.
"""

import pytest_twisted

from harness import py_client, start_daemon


async def opened_from(daemon, app, headers):
    client = await py_client(daemon.ws_url, {"X-Bfl-User": "pat", **headers})
    event = await app.wait_for_action("open")
    client.dropConnection(abort=True)
    await app.wait_for_action("close")
    return event["remote_addr"], app.headers[app.events.index(event)]["x-forwarded-for"]


@pytest_twisted.ensureDeferred
async def test_a_trusted_proxys_forwarded_address_is_the_clients(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, "--trusted-proxy", "127.0.0.0/8", cwd=tmp_path)
    try:
        seen = await opened_from(daemon, app, {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"})
        assert seen == ("203.0.113.5", "203.0.113.5")
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_peers_forwarding_headers_are_not_believed(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, "--trusted-proxy", "10.0.0.0/8", cwd=tmp_path)
    try:
        seen = await opened_from(daemon, app, {"X-Original-Forwarded-For": "203.0.113.5"})
        assert seen == ("127.0.0.1", "127.0.0.1")
    finally:
        await daemon.terminate()


@pytest_twisted.ensureDeferred
async def test_by_default_the_first_original_forwarded_address_is_believed(app, tmp_path):
    daemon = await start_daemon("--app-url", app.url, cwd=tmp_path)
    try:
        seen = await opened_from(daemon, app, {"X-Original-Forwarded-For": "203.0.113.5, 10.0.0.2"})
        assert seen == ("203.0.113.5", "203.0.113.5")
    finally:
        await daemon.terminate()
