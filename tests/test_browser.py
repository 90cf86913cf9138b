"""
End to end in a real browser: the example chat (examples/chat_app.py and its
page) behind the real daemon, driven in headless Chromium by two users.

    browser (alice) --+                 +-- /ws ----> twist wsgw --POST--> chat app
    browser (bob) ----+--> test proxy --+                ^                    |
                                        +-- / ------> chat app (page)        |
                                                         +-- /tapr/ws/conn/send

A browser cannot set the X-Bfl-User header on a WebSocket, and in production
it does not have to: the platform's authenticating proxy, in front of both
the page and /ws, sets it from the user's session.  The test does the same
with a tiny reverse proxy (AuthProxy below): each browser context holds an
``auth_token`` session cookie, the proxy maps it to a user name, strips any
user header the client sent and sets X-Bfl-User, then splices the bytes
(a WebSocket upgrade included).  The page and /ws are thus same-origin, as
in production, so the gateway's Origin check passes without
--allowed-origin, and the gateway runs with --require-user, so a
connection that arrived without an identity would be refused.

Chromium is Debian's (``apt-get install -y chromium``), driven through
playwright-core (tests/browser/driver.js), which never downloads a browser.
Without /usr/bin/chromium the test is skipped.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from harness import OutputLines, bounded, free_port, start_daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/wsgw-browser.png")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium",
)

SESSIONS = {"tok-alice": "alice", "tok-bob": "bob"}  # auth_token cookie -> user


@pytest.fixture(scope="session")
def playwright_core():
    """playwright-core from npm (tests/browser/package-lock.json), installed on first use."""
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BROWSER_DIR, check=True, timeout=300
        )


# --- the authenticating proxy ------------------------------------------------


class ProxyFront(Protocol):
    """One browser connection: reads its request head, routes it, splices."""

    MAX_HEAD = 65536

    def __init__(self, proxy):
        self.proxy = proxy
        self.head = b""
        self.routed = False
        self.back = None

    def connectionMade(self):
        self.proxy.fronts.add(self)
        self.deadline = reactor.callLater(10, self.transport.abortConnection)

    def dataReceived(self, data):
        if self.back is not None:
            self.back.transport.write(data)
            return
        self.head += data  # before the backend answers, everything waits here
        if self.routed:
            return
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > self.MAX_HEAD:
                self.transport.abortConnection()
            return
        self.routed = True
        self.deadline.cancel()
        head, self.head = self.head[:end].decode("latin-1"), self.head[end + 4 :]
        self.route(head)

    def route(self, head):
        request_line, *lines = head.split("\r\n")
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines if ":" in line]
        cookie = "; ".join(value for name, value in headers if name.lower() == "cookie")
        session = re.search(r"(?:^|;\s*)auth_token=([^;]*)", cookie)
        user = SESSIONS.get(session.group(1)) if session else None
        if user is None:
            self.refuse(401, "sign in first")
            return
        path = request_line.split(" ")[1] if request_line.count(" ") == 2 else "/"
        upgrade = any(name.lower() == "upgrade" and value.lower() == "websocket" for name, value in headers)
        to_gateway = path == "/ws" or path.startswith(("/ws?", "/ws/"))
        # Clients never choose their identity; one request per connection
        # unless it becomes a WebSocket, so every request is routed here.
        dropped = {"x-bfl-user", "x-original-forwarded-for"}
        if not upgrade:
            dropped |= {"connection", "keep-alive", "proxy-connection"}
        kept = [(name, value) for name, value in headers if name.lower() not in dropped]
        kept.append(("X-Bfl-User", user))
        kept.append(("X-Original-Forwarded-For", self.transport.getPeer().host))
        if not upgrade:
            kept.append(("Connection", "close"))
        self.rewritten = "\r\n".join([request_line] + [f"{n}: {v}" for n, v in kept]).encode("latin-1") + b"\r\n\r\n"
        self.proxy.routed.append((user, path, "gateway" if to_gateway else "app"))
        port = self.proxy.gateway_port if to_gateway else self.proxy.app_port
        self.transport.pauseProducing()
        connecting = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), ProxyBack(self))
        connecting.addErrback(lambda failure: self.refuse(502, f"backend unreachable: {failure.value}"))

    def refuse(self, status, text):
        body = text.encode()
        self.transport.write(
            b"HTTP/1.1 %d Refused\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, len(body), body)
        )
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.proxy.fronts.discard(self)
        if self.deadline.active():
            self.deadline.cancel()
        if self.back is not None:
            self.back.transport.loseConnection()


class ProxyBack(Protocol):
    """The proxy's connection to the gateway or the app for one front."""

    def __init__(self, front):
        self.front = front

    def connectionMade(self):
        front = self.front
        if not front.transport.connected:
            self.transport.loseConnection()
            return
        front.back = self
        self.transport.write(front.rewritten + front.head)
        # Back-pressure both ways: a side that does not read pauses the other.
        self.transport.registerProducer(front.transport, True)
        front.transport.registerProducer(self.transport, True)
        front.transport.resumeProducing()

    def dataReceived(self, data):
        self.front.transport.write(data)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


class AuthProxy(Factory):
    def __init__(self, gateway_port, app_port):
        self.gateway_port = gateway_port
        self.app_port = app_port
        self.fronts = set()
        self.routed = []  # (user, path, backend), for the record

    def buildProtocol(self, addr):
        return ProxyFront(self)

    def start(self):
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self):
        for front in list(self.fronts):
            front.transport.abortConnection()
        await self.port.stopListening()


# --- processes: the chat app, the browser driver, the Node client ------------


class LineProcess(OutputLines):
    """A named child process whose output lines can be waited for."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    async def wait_line(self, pattern, what, seconds=15):
        regex = re.compile(pattern)

        def found():  # never raises: it also runs inside outReceived and processEnded
            match = next(filter(None, map(regex.search, self.lines)), None)
            return match or (self.status is not None and "exited")

        result = await self.waiters.wait(found, what, seconds)
        if result == "exited":
            raise AssertionError(f"{self.name} exited {self.status} before {what}:\n" + self.log())
        return result

    def log(self):
        return "\n".join(self.lines[-200:])

    def exited(self, what, seconds=10):
        return self.waiters.wait(lambda: self.status is not None, what, seconds)

    async def stop(self, sig="TERM"):
        """Ends the process: SIG (None: it is already on its way out), then KILL after 10 s."""
        if self.status is None and sig is not None:
            self.transport.signalProcess(sig)
        try:
            await self.exited(f"{self.name} to exit")
        except AssertionError:
            if self.status is None:
                self.transport.signalProcess("KILL")
                await self.exited(f"{self.name} to die")


def spawn(proto, argv, cwd=ROOT):
    proto.transport = reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ), path=str(cwd))
    return proto


class Driver(LineProcess):
    """tests/browser/driver.js: commands in, one JSON answer per command out."""

    def __init__(self):
        super().__init__("the browser driver")
        self.answers = {}
        self.ready = Deferred()
        self.next_id = 0

    def line(self, raw):
        try:
            message = json.loads(raw)
        except ValueError:
            return  # Chromium's own chatter on stderr
        if not isinstance(message, dict):
            return
        if "ready" in message and not self.ready.called:
            self.ready.callback(message)
        elif "id" in message:
            self.answers[message["id"]] = message

    def processEnded(self, reason):
        super().processEnded(reason)
        if not self.ready.called:
            self.ready.callback({"ready": False, "error": f"exited {self.status}:\n" + self.log()})

    async def call(self, cmd, seconds=20, **args):
        self.next_id += 1
        ident = self.next_id
        self.transport.write(json.dumps({"id": ident, "cmd": cmd, **args}).encode() + b"\n")

        def answered():
            if self.status is not None and ident not in self.answers:
                return {"ok": False, "error": f"the driver exited {self.status}:\n" + self.log()}
            return self.answers.get(ident)

        answer = await self.waiters.wait(answered, f"the browser to {cmd}", seconds)
        if not answer["ok"]:
            raise AssertionError(f"browser {cmd} {args} failed: {answer['error']}")
        return answer["value"]

    def wait(self, name, expression, seconds=10):
        return self.call("wait", name=name, expression=expression, timeout=int(seconds * 1000), seconds=seconds + 10)

    async def chat_lines(self, name):
        return await self.call("evaluate", name=name, expression=CHAT_LINES)

    def wait_chat(self, name, sender, text):
        """Until the page shows SENDER: TEXT; all its chat lines."""
        return self.wait(
            name,
            f"(() => {{ const lines = {CHAT_LINES}; return lines.some(l => "
            f"l[0] === {json.dumps(sender)} && l[1] === {json.dumps(text)}) && lines; }})()",
        )


CHAT_LINES = (
    "Array.from(document.querySelectorAll('#messages li'))"
    ".map(li => [li.querySelector('.from').textContent, li.querySelector('.text').textContent])"
)


async def api(daemon, path, body):
    response = await treq.post(daemon.base + "/tapr/ws/conn/" + path, json.dumps(body).encode(), timeout=10)
    return await treq.json_content(response)


# --- the test ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_browsers_chat_through_the_gateway(tmp_path, playwright_core, node_ws):
    started = time.monotonic()
    app_port = free_port()
    daemon = await start_daemon("--app-url", f"http://127.0.0.1:{app_port}/ws/message", "--require-user", cwd=tmp_path)
    app = driver = node = proxy = None
    try:
        app = spawn(
            LineProcess("the chat app"),
            [sys.executable, "-u", str(EXAMPLES / "chat_app.py"), "--port", str(app_port), "--gateway", daemon.base],
        )
        await app.wait_line(r"chat app listening on http://127\.0\.0\.1:(\d+)/", "the chat app to listen")
        proxy = AuthProxy(daemon.port, app_port).start()

        node_bin = shutil.which("node") or "/usr/bin/node"
        driver = spawn(Driver(), [node_bin, str(BROWSER_DIR / "driver.js"), str(CHROMIUM)], cwd=BROWSER_DIR)
        launched = await bounded(driver.ready, 40, "Chromium to start")
        assert launched["ready"], launched.get("error")

        for user in ("alice", "bob"):
            status = await driver.call(
                "open", name=user, url=proxy.base + "/", cookies=[{"name": "auth_token", "value": f"tok-{user}"}]
            )
            assert status == 200
        # Both greeted by the app (so it tracks both), both see each other online.
        for user in ("alice", "bob"):
            await driver.wait(
                user,
                f"document.body.dataset.user === {json.dumps(user)} && "
                "document.getElementById('online').textContent === 'online: alice, bob'",
            )

        await driver.call("say", name="alice", text="Hi Bob, alice here")
        await driver.wait_chat("bob", "alice", "Hi Bob, alice here")
        await driver.wait_chat("alice", "alice", "Hi Bob, alice here")

        await driver.call("say", name="bob", text="Hello Alice! <b>not bold</b>")
        await driver.wait_chat("alice", "bob", "Hello Alice! <b>not bold</b>")
        await driver.wait_chat("bob", "bob", "Hello Alice! <b>not bold</b>")

        # The example Node client joins the same chat (a non-browser client
        # outside the proxy names itself; the gateway requires a name).
        node = spawn(
            LineProcess("node_client.js"),
            [
                node_bin,
                str(EXAMPLES / "node_client.js"),
                "--url",
                daemon.ws_url,
                "--user",
                "carol",
                "carol",
                "from",
                "node",
            ],
        )
        await node.wait_line(r"^carol: carol from node$", "the Node client to see its own line")
        for user in ("alice", "bob"):
            await driver.wait_chat(user, "carol", "carol from node")
        await node.stop("INT")  # closes with 1000 and exits
        for user in ("alice", "bob"):
            await driver.wait(user, "document.getElementById('online').textContent === 'online: alice, bob'")

        # The app drops bob's connection: his page reconnects after 1 s, on its own.
        closed_at = time.monotonic()
        answer = await api(daemon, "close", {"users": ["bob"]})
        assert answer["data"] == {"matched": 1}
        waiting = await driver.wait(
            "bob", "document.body.dataset.state === 'waiting' && document.getElementById('status').textContent"
        )
        assert waiting == "closed (4000); reconnecting in 1 s"
        await driver.wait(
            "bob",
            "document.body.dataset.opens === '2' && "
            "document.getElementById('status').textContent === 'connected as bob'",
        )
        assert time.monotonic() - closed_at >= 0.9
        await driver.call("say", name="alice", text="Still there?")
        await driver.wait_chat("bob", "alice", "Still there?")
        await driver.wait_chat("alice", "alice", "Still there?")

        expected = [
            ["alice", "Hi Bob, alice here"],
            ["bob", "Hello Alice! <b>not bold</b>"],
            ["carol", "carol from node"],
            ["alice", "Still there?"],
        ]
        assert await driver.chat_lines("alice") == expected
        assert await driver.chat_lines("bob") == expected
        # Markup a user types stays text.
        bold = await driver.call("evaluate", name="alice", expression="document.querySelectorAll('#messages b').length")
        assert bold == 0
        for user in ("alice", "bob"):
            assert await driver.call("errors", name=user) == []

        # Every request went through the proxy with its user's identity.
        assert {(user, backend) for user, _, backend in proxy.routed} == {
            ("alice", "app"),
            ("alice", "gateway"),
            ("bob", "app"),
            ("bob", "gateway"),
        }

        for user in ("alice", "bob"):
            await driver.call("screenshot", name=user, path=str(tmp_path / f"{user}.png"))
        shutil.copyfile(tmp_path / "bob.png", SCREENSHOT_COPY)
        print(
            f"screenshots: {tmp_path}/alice.png, {tmp_path}/bob.png (copied to {SCREENSHOT_COPY}); "
            f"{time.monotonic() - started:.1f} s"
        )
    finally:
        if driver is not None:
            if driver.status is None:
                driver.transport.closeStdin()  # the driver closes Chromium and exits
            await driver.stop(None)
        for process in (driver, node, app):
            if process is not None:
                await process.stop()
                print(f"--- {process.name} ---\n{process.log()}")
        if proxy is not None:
            await proxy.stop()
        await daemon.terminate()
        print("--- daemon ---\n" + "\n".join(daemon.log_lines()[-100:]))
