"""
Real peers for integration tests: the daemon as a `twist wsgw` process, an
app HTTP server, a Python (Autobahn) client and a Node `ws` client.

Every wait is for a specific event and bounded by a timeout.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import ProcessProtocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import wsgw

NODE_DIR = Path(__file__).parent / "node"
WAIT = 15.0  # seconds any single expected event may take


def bounded(d, seconds=WAIT, what="event"):
    """C{d}, failing with a clear message if it takes longer than C{seconds}."""

    def timed_out(failure, timeout):
        from twisted.internet.defer import CancelledError, TimeoutError

        # addTimeout turns its own cancellation into TimeoutError.
        if failure.check(CancelledError, TimeoutError):
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        return failure

    d.addTimeout(seconds, reactor)
    d.addErrback(timed_out, seconds)
    return d


class Waiters:
    """Deferreds fired when a predicate over some growing state holds."""

    def __init__(self):
        self._waiting = []

    def wait(self, predicate, what, seconds=WAIT):
        result = predicate()
        if result:
            return _fired(result)
        d = Deferred()
        self._waiting.append((predicate, d))
        return bounded(d, seconds, what)

    def check(self):
        still = []
        for predicate, d in self._waiting:
            if d.called:
                continue
            result = predicate()
            if result:
                d.callback(result)
            else:
                still.append((predicate, d))
        self._waiting = still


def _fired(value):
    d = Deferred()
    d.callback(value)
    return d


class RecordingApp(Resource):
    """
    The app: records each event POST with its headers.  C{behaviour(event)}
    returns C{(status, delay)} for an answer; C{delay} is seconds or a
    L{Deferred} to answer when it fires.
    """

    isLeaf = True

    def __init__(self, keep=True):
        super().__init__()
        self.keep = keep  # False: only count actions (long runs)
        self.counts = Counter()
        self.events = []
        self.headers = []
        self.behaviour = lambda event: (200, 0)
        self.waiters = Waiters()

    def render_POST(self, request):
        event = json.loads(request.content.read())
        status, delay = self.behaviour(event)
        if status < 300:
            self.counts[event["action"]] += 1
            if self.keep:
                self.events.append(event)
                self.headers.append(
                    {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
                )
        request.setResponseCode(status)
        self.waiters.check()
        if not delay:
            return b"{}"

        def answer():
            if not request._disconnected:
                request.write(b"{}")
                request.finish()
            self.waiters.check()

        if isinstance(delay, Deferred):
            delay.addCallback(lambda _: answer())
        else:
            reactor.callLater(delay, answer)
        return NOT_DONE_YET

    def of(self, conn_id):
        return [e for e in self.events if e["conn_id"] == conn_id]

    def actions(self, conn_id):
        return [e["action"] for e in self.of(conn_id)]

    def wait_for(self, predicate, what="app events", seconds=WAIT):
        return self.waiters.wait(predicate, what, seconds)

    def wait_for_action(self, action, conn_id=None, seconds=WAIT):
        def found():
            for e in self.events:
                if e["action"] == action and (conn_id is None or e["conn_id"] == conn_id):
                    return e
            return None

        return self.wait_for(found, f"{action} event", seconds)


def start_app(keep=True):
    app = RecordingApp(keep)
    port = reactor.listenTCP(0, Site(app), interface="127.0.0.1")
    app.port = port
    app.url = f"http://127.0.0.1:{port.getHost().port}/ws/message"
    return app


class OutputLines(ProcessProtocol):
    """
    A child process's output, read line by line as it comes: each whole
    line is kept as text in C{lines} and handed to L{line}, then whatever
    waits on the child (C{waiters}) looks again.  Its standard error is
    read the same way unless a subclass says otherwise.
    """

    def __init__(self):
        self.lines = []
        self.buffer = b""
        self.waiters = Waiters()
        self.ended = Deferred()
        self.status = None

    def outReceived(self, data):
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        for line in complete:
            self.lines.append(line.decode("utf-8", "replace"))
            self.line(line)
        self.waiters.check()

    errReceived = outReceived

    def line(self, line):
        """One whole line of output, without its newline."""

    def processEnded(self, reason):
        # (exit code, None) or (None, the signal that killed it)
        self.status = (reason.value.exitCode, reason.value.signal)
        self.ended.callback(self.status)
        self.waiters.check()


class Daemon:
    """A `twist wsgw` process listening on an ephemeral loopback port."""

    def __init__(self, process, proto, port):
        self.process = process
        self.proto = proto
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"

    def log_lines(self):
        return self.proto.lines

    def terminate(self, sig=signal.SIGTERM):
        if self.proto.status is None:
            self.process.signalProcess({signal.SIGTERM: "TERM", signal.SIGINT: "INT", signal.SIGKILL: "KILL"}[sig])
        return bounded(self.proto.ended, 30, "the daemon to exit")


async def start_daemon(*args, env=None, cwd, listeners=1, log_level="info", log_format="text", wrapper=()):
    """
    `twist wsgw ARGS` on an ephemeral loopback port (unless ARGS give
    --listen); waits until C{listeners} ports listen.  C{Daemon.ports}
    holds them in the order they started, C{Daemon.port} the first.
    C{wrapper}: a command that runs the daemon's command line (its argv
    follows), e.g. tests/unit_exec.py to apply a unit's restrictions.
    """
    proto = OutputLines()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_"))}
    # The daemon runs the same wsgw as the tests import, installed or not.
    environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
    environment.update(env or {})
    argv = [sys.executable, "-m", "twisted", f"--log-format={log_format}", f"--log-level={log_level}", "wsgw"]
    if not any(a.startswith("--listen") for a in args):
        argv += ["--listen", "tcp:0:interface=127.0.0.1"]
    argv += list(args)
    argv = [*wrapper, *argv]
    process = reactor.spawnProcess(proto, argv[0], argv, env=environment, path=str(cwd))
    pattern = re.compile(r"starting on (\d+)")

    def listening():
        ports = [int(m.group(1)) for m in map(pattern.search, proto.lines) if m]
        return ports if len(ports) >= listeners else None

    def died():
        return proto.status is not None

    try:
        ports = await proto.waiters.wait(lambda: listening() or (died() and -1), "the daemon to listen", 30)
    except Exception:
        process.signalProcess("KILL")
        raise
    if ports == -1:
        raise AssertionError("daemon exited before listening:\n" + "\n".join(proto.lines))
    daemon = Daemon(process, proto, ports[0])
    daemon.ports = ports
    return daemon


class Child:
    """A process started by L{start_process}: its output lines, and a way to stop it."""

    def __init__(self, process, proto, ready):
        self.process = process
        self.proto = proto
        self.ready = ready  # the match of the line it was waited for

    @property
    def lines(self):
        return self.proto.lines

    def wait_line(self, pattern, what=None, seconds=WAIT):
        """The match of the first output line matching C{pattern}, once there is one."""
        regex = re.compile(pattern)
        return self.proto.waiters.wait(
            lambda: next((m for m in map(regex.search, self.proto.lines) if m), None), what or pattern, seconds
        )

    def terminate(self, sig="TERM"):
        if self.proto.status is None:
            self.process.signalProcess(sig)
        return bounded(self.proto.ended, 30, f"{self.process.argv[:2]} to exit")


async def start_process(argv, ready, *, cwd, env=None, seconds=30):
    """
    C{argv} as a child process (stdout and stderr kept by line); returns a
    L{Child} once a line matches the regular expression C{ready}, or fails
    with its output if it exits first.
    """
    proto = OutputLines()
    process = reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ if env is None else env), path=str(cwd))
    process.argv = argv
    regex = re.compile(ready)

    def started():
        found = next((m for m in map(regex.search, proto.lines) if m), None)
        return found or (proto.status is not None and "exited")

    try:
        found = await proto.waiters.wait(started, f"{argv[:2]} to print {ready!r}", seconds)
    except Exception:
        process.signalProcess("KILL")
        raise
    if found == "exited":
        raise AssertionError(f"{argv} exited {proto.status} before printing {ready!r}:\n" + "\n".join(proto.lines))
    return Child(process, proto, found)


class PyClient(WebSocketClientProtocol):
    """An Autobahn client recording what it receives."""

    def __init__(self):
        super().__init__()
        self.messages = DeferredQueue()
        self.opened = Deferred()
        self.closed = Deferred()
        self.close_info = None

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.messages.put(payload if isBinary else payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        self.close_info = (code, reason)
        if not self.opened.called:
            self.opened.errback(AssertionError(f"handshake failed: {reason}"))
        self.closed.callback((code, reason))

    def next_message(self, seconds=WAIT):
        return bounded(self.messages.get(), seconds, "a message")

    def send_text(self, text):
        self.sendMessage(text.encode("utf-8"))


async def py_client(url, headers=None, protocols=None, origin=None):
    headers = dict(headers or {})
    agent = headers.pop("User-Agent", "wsgw-tests")
    factory = WebSocketClientFactory(url, headers=headers, protocols=protocols, useragent=agent, origin=origin)
    factory.protocol = PyClient
    host, port = re.match(r"ws://([^:/]+):(\d+)", url).groups()
    connected = Deferred()

    def build(addr):
        proto = PyClient()
        proto.factory = factory
        connected.callback(proto)
        return proto

    factory.buildProtocol = build
    reactor.connectTCP(host, int(port), factory, timeout=5)
    proto = await bounded(connected, what="TCP connection")
    return await bounded(proto.opened, what="WebSocket open")


class NodeProtocol(OutputLines):
    """tests/node/client.js: one JSON event per line; its standard error kept apart."""

    def __init__(self):
        super().__init__()
        self.events = []
        self.stderr = b""

    def line(self, line):
        self.events.append(json.loads(line))

    def errReceived(self, data):
        self.stderr += data


class NodeClient:
    """The Node `ws` library as a client, driven through tests/node/client.js."""

    def __init__(self, process, proto):
        self.process = process
        self.proto = proto

    def messages(self):
        return [e["message"] for e in self.proto.events if "message" in e]

    def command(self, **cmd):
        self.process.write(json.dumps(cmd).encode() + b"\n")

    def send(self, text):
        self.command(send=text)

    def wait(self, predicate, what):
        return self.proto.waiters.wait(lambda: predicate(self.proto.events), what)

    def wait_messages(self, n):
        return self.wait(lambda events: len(self.messages()) >= n and self.messages(), f"{n} node messages")

    def wait_close(self):
        return self.wait(lambda events: next((e for e in events if "close" in e), None), "node close")

    def stop(self):
        if not self.proto.ended.called:
            self.process.signalProcess("KILL")
        return bounded(self.proto.ended, what="node to exit")


async def node_client(url, headers=None, env=None):
    proto = NodeProtocol()
    argv = ["node", str(NODE_DIR / "client.js"), url, json.dumps(headers or {})]
    process = reactor.spawnProcess(proto, _node(), argv, env={**os.environ, **(env or {})}, path=str(NODE_DIR))
    client = NodeClient(process, proto)
    first = await client.wait(lambda events: events[0] if events else None, "node client to open")
    if "open" not in first:
        await client.stop()
        raise AssertionError(f"node client failed: {first} {proto.stderr!r}")
    return client


def _node():
    from shutil import which

    return which("node") or "/usr/bin/node"


def ensure_node_modules():
    """Install the Node `ws` library the tests use, once."""
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)


class AppProcessProtocol(OutputLines):
    """tests/app_server.py: one JSON line per accepted event, to C{sink}."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def line(self, line):
        self.sink.received(json.loads(line))

    def errReceived(self, data):
        sys.stderr.write(data.decode("utf-8", "replace"))


class AppProcess:
    """
    The app as a separate process (tests/app_server.py) that can be killed
    and started again on the same port; events it accepted survive here.
    """

    def __init__(self):
        self.events = []  # (event id, event)
        self.port = None
        self.process = None
        self.proto = None
        self.waiters = Waiters()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/ws/message"

    def received(self, item):
        if "listening" in item:
            self.port = item["listening"]
        else:
            self.events.append((item["id"], item["event"]))
        self.waiters.check()

    async def start(self, *args, port=0):
        self.proto = AppProcessProtocol(self)
        self.port = None
        argv = [sys.executable, str(Path(__file__).parent / "app_server.py"), str(port), *args]
        self.process = reactor.spawnProcess(self.proto, sys.executable, argv, env=dict(os.environ))
        await self.waiters.wait(lambda: self.port, "the app to listen")
        return self

    async def kill(self):
        self.process.signalProcess("KILL")
        await bounded(self.proto.ended, what="the app to die")

    def wait_for(self, predicate, what, seconds=WAIT):
        return self.waiters.wait(predicate, what, seconds)

    def unique(self):
        """Accepted events, first delivery of each event id only, in order."""
        seen, result = set(), []
        for event_id, event in self.events:
            if event_id not in seen:
                seen.add(event_id)
                result.append(event)
        return result


def rss_kib(pid):
    """Resident memory of process C{pid} in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def free_port():
    """A loopback port nothing listens on (for an app that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def upgrade_request(base, user="", headers=None):
    """
    A WebSocket upgrade request that is expected to be refused: returns the
    HTTP status and the JSON body.
    """
    import treq

    response = await treq.get(
        base + "/ws",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "X-Bfl-User": user,
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )
    assert response.code != 101, "the upgrade was accepted"
    return response.code, await treq.json_content(response)


class SocketActivated:
    """
    `twist wsgw` started as systemd starts a socket-activated service: a
    listening loopback socket, opened here before the daemon runs, arrives
    as fd 3 with C{LISTEN_PID}, C{LISTEN_FDS} and C{LISTEN_FDNAMES}; C{env}
    adds the unit's C{WSGW_*} settings.  A context manager: C{port} is the
    socket's, C{log_path} the daemon's output; the daemon is stopped by PID
    on exit.
    """

    def __init__(self, tmp_path, env, name="wsgw.socket"):
        self.tmp_path, self.env, self.name = tmp_path, env, name
        self.log_path = Path(tmp_path) / "daemon.log"

    def __enter__(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))}
        environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
        environment.update(self.env, FD=str(sock.fileno()), FDNAME=self.name)
        script = 'exec 3<&"$FD"; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES="$FDNAME"; exec "$@"'
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", script, "bash", sys.executable, "-m", "twisted", "--log-format=text", "wsgw"],
                env=environment,
                cwd=self.tmp_path,
                pass_fds=(sock.fileno(),),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        sock.close()  # only the daemon holds it now
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc_info):
        self.process.terminate()
        self.process.wait(timeout=30)


class SyncDaemon:
    """
    `twist wsgw` for tests that talk to it with plain blocking sockets
    (raw frames, property-based tests); a context manager.  Its log goes to
    a file, so a chatty daemon never blocks on a full pipe.
    """

    def __init__(self, *args, cwd):
        self.args = args
        self.log_path = Path(cwd) / "daemon.log"
        self.cwd = cwd

    def __enter__(self):
        import time

        environment = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_"))}
        environment["PYTHONPATH"] = str(Path(wsgw.__file__).resolve().parent.parent)
        argv = [
            sys.executable,
            "-m",
            "twisted",
            "--log-format=text",
            "wsgw",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            *self.args,
        ]
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv, cwd=self.cwd, env=environment, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.alive():
            match = re.search(rb"starting on (\d+)", self.log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                return self
            time.sleep(0.05)  # polling a file the daemon writes, bounded above
        self.__exit__()
        raise AssertionError("daemon did not start:\n" + self.log_path.read_text(errors="replace"))

    def alive(self):
        return self.process.poll() is None

    def log(self):
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc_info):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log_file.close()


async def api(daemon, path, body=None):
    """The API at C{path}: GET without a body, else POST it as JSON; (status, answer)."""
    if body is None:
        response = await treq.get(daemon.base + "/tapr/ws/conn/" + path)
    else:
        response = await treq.post(daemon.base + "/tapr/ws/conn/" + path, data=json.dumps(body).encode())
    answer = await treq.json_content(response)
    return response.code, answer


async def scrape(daemon):
    """C{/metrics} as {name|label=value...: value}, read with Prometheus's own parser."""
    response = await treq.get(daemon.base + "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    samples = {}
    for family in text_string_to_metric_families(await treq.text_content(response)):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


def ctl(daemon, *args, token=None):
    """`wsgw-ctl --url DAEMON ARGS` in a thread; its CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(Path(wsgw.__file__).resolve().parent.parent))
    env.pop("WSGW_ADMIN_TOKEN", None)
    if token:
        env["WSGW_ADMIN_TOKEN"] = token
    return threads.deferToThread(
        subprocess.run,
        [sys.executable, "-m", "wsgw.cli", "--url", daemon.base, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def eventually(check, what, seconds=WAIT, every=0.1):
    """
    Re-run the async C{check} until it returns something true, at most
    C{seconds}: for state only visible by asking (a metrics page).
    """
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + seconds
    while True:
        result = await check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await deferLater(reactor, every, lambda: None)


class RedisServer:
    """
    A private `redis-server` on a loopback port, without persistence, so a
    restart comes back empty (as a Redis that lost its data does).
    """

    def __init__(self, port):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proto = None
        self.process = None

    async def start(self):
        from shutil import which

        self.proto = proto = OutputLines()
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        self.process = reactor.spawnProcess(
            proto, which("redis-server") or "/usr/bin/redis-server", argv, env={}, path="/"
        )
        await proto.waiters.wait(
            lambda: any("Ready to accept connections" in line for line in proto.lines) or proto.ended.called,
            "redis-server to start",
        )
        if proto.ended.called:
            raise AssertionError("redis-server exited:\n" + "\n".join(proto.lines))

    def stop(self):
        if not self.proto.ended.called:
            self.process.signalProcess("TERM")
        return bounded(self.proto.ended, 30, "redis-server to exit")


async def redis_command(redis, *command):
    """One command to C{redis} on a connection of its own (the state a test inspects)."""
    import txredisapi

    connection = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
    try:
        return await connection.execute_command(*command)
    finally:
        await connection.disconnect()


async def start_redis():
    server = RedisServer(free_port())
    await server.start()
    return server


async def tls_round_trip(daemon, app, cert_path):
    """
    A Node client over wss:// (trusting C{cert_path}) is answered a ping
    and its message reaches C{app}: the TLS listener serves end to end.
    """
    client = await node_client(
        f"wss://localhost:{daemon.port}/ws", {"X-Bfl-User": "tls"}, env={"WS_CA_FILE": str(cert_path)}
    )
    client.send('{"event":"ping"}')
    assert await client.wait_messages(1) == ['{"event":"pong"}']
    client.send('{"event":"secure"}')
    message = await app.wait_for_action("message")
    assert message["data"] == {"event": "secure"} and message["user_name"] == "tls"
    await client.stop()
