"""
The chat page opened straight from the app's port, as examples/README.rst
tells a first try to do, in headless Chromium: against a gateway without
``--allowed-origin`` it says it cannot connect and what to check (instead of
"connecting…" for ever); against one started as examples/README.rst says
(``--allowed-origin http://127.0.0.1:PORT``) it connects.
"""

import shutil
import sys

import pytest
import pytest_twisted
from test_browser import BROWSER_DIR, CHROMIUM, EXAMPLES, Driver, LineProcess, playwright_core, spawn
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from harness import bounded, free_port, start_daemon


class RefuseThenHang(Protocol):
    """The first handshake is refused (403); later ones never get an answer."""

    def connectionMade(self):
        self.factory.seen += 1
        if self.factory.seen == 1:
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()
        else:
            self.factory.hanging.append(self.transport)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium"
    ),
]

__all__ = ["playwright_core"]  # the fixture, shared with test_browser.py


@pytest_twisted.ensureDeferred
async def test_page_says_why_it_cannot_connect_and_connects_with_the_allowed_origin(tmp_path, playwright_core, node_ws):
    app_port = free_port()
    page_origin = f"http://127.0.0.1:{app_port}"
    app_url = f"{page_origin}/ws/message"
    strict = await start_daemon("--app-url", app_url, cwd=tmp_path)
    allowing = await start_daemon("--allowed-origin", page_origin, "--app-url", app_url, cwd=tmp_path)
    app = driver = None
    try:
        app = spawn(
            LineProcess("the chat app"),
            [sys.executable, "-u", str(EXAMPLES / "chat_app.py"), "--port", str(app_port), "--gateway", allowing.base],
        )
        await app.wait_line(r"chat app listening on", "the chat app to listen")
        node_bin = shutil.which("node") or "/usr/bin/node"
        driver = spawn(Driver(), [node_bin, str(BROWSER_DIR / "driver.js"), str(CHROMIUM)], cwd=BROWSER_DIR)
        launched = await bounded(driver.ready, 40, "Chromium to start")
        assert launched["ready"], launched

        # The gateway refuses the page's origin (403): the page says so, in its error state.
        await driver.call("open", name="refused", url=f"{page_origin}/?ws={strict.ws_url}")
        status = await driver.wait(
            "refused", "document.body.dataset.state === 'error' && document.getElementById('status').textContent"
        )
        assert status.startswith(f"cannot connect to {strict.ws_url}: refused or unreachable"), status
        assert f"--allowed-origin {page_origin}" in status, status
        # Through the next attempt (after 1 s, refused again) the error stays in view.
        again = await driver.wait(
            "refused",
            "document.body.dataset.state === 'error' && document.getElementById('status').textContent.endsWith("
            "'; reconnecting in 2 s') && document.getElementById('status').textContent",
        )
        assert again.startswith(f"cannot connect to {strict.ws_url}"), again

        # While the next attempt is under way, the last error stays in view.
        factory = Factory.forProtocol(RefuseThenHang)
        factory.seen, factory.hanging = 0, []
        hang = reactor.listenTCP(0, factory, interface="127.0.0.1")
        hang_url = f"ws://127.0.0.1:{hang.getHost().port}/ws"
        try:
            await driver.call("open", name="retrying", url=f"{page_origin}/?ws={hang_url}")
            retrying = await driver.wait(
                "retrying",
                "document.body.dataset.state === 'error' && document.getElementById('status').textContent"
                ".startsWith('connecting… (last attempt:') && document.getElementById('status').textContent",
            )
            assert retrying.startswith(f"connecting… (last attempt: cannot connect to {hang_url}"), retrying
        finally:
            for transport in factory.hanging:
                transport.abortConnection()
            await hang.stopListening()

        # Started with --allowed-origin, the same page connects (as anonymous: no proxy names it).
        await driver.call("open", name="allowed", url=f"{page_origin}/?ws={allowing.ws_url}")
        connected = await driver.wait(
            "allowed", "document.body.dataset.state === 'open' && document.getElementById('status').textContent"
        )
        assert connected in ("connected", "connected as anonymous")
        await driver.wait("allowed", "document.getElementById('status').textContent === 'connected as anonymous'")
    finally:
        if driver is not None:
            if driver.status is None:
                driver.transport.closeStdin()
            await driver.stop(None)
        await strict.terminate()
        await allowing.terminate()  # while the app is up to take the close event
        if app is not None:
            await app.stop()
