"""
The cost of one C{/send} in process: W5's calls (keep-alive POSTs as Node
sends them, to one connection by C{conn_id} or to one user's connections by
C{users}) fed to the daemon's lean API channel, with N unrelated
connections open.

The working tree's C{wsgw} and a baseline commit's (its whole package
written from git to a temporary folder as C{wsgw_baseline}) are built side
by side in one process, and measured alternately:

    python -m bench.sendpath                   # process_time µs per call, rounds alternating
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python -m bench.sendpath --callgrind /tmp/cg.%p   # instructions per call

Under callgrind the driver switches instrumentation on for the measured
calls only (C{callgrind_control -i on/off} on its own pid) and reads the
instruction count of each stretch from its dump.

The targeted connections are real L{wsgw.websocket.GatewayProtocol}s,
handshaken over iosim and then moved onto Twisted's own C{tcp.Server}
over a loopback TCP socket, as the daemon's are: each frame takes the
daemon's direct write (or its buffered one), and the driver reads and
drops what arrives at the other end.  The API channel is on one too, so
its answers are written as the daemon writes them.  The unrelated
connections are registry entries only, which is all a send to others
touches of them.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

BASELINE = "63f12ee"
USER_CONNS = 10
PAYLOAD = 100  # W5's message size


def _baseline_package(root: str, commit: str) -> None:
    """The baseline commit's C{wsgw} as package C{wsgw_baseline} under C{root}."""
    package = os.path.join(root, "wsgw_baseline")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    archive = subprocess.run(
        ["git", "-C", top.stdout.strip(), "archive", commit, "wsgw"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    os.rename(os.path.join(root, "wsgw"), package)


def _module(package: str, name: str) -> Any:
    return importlib.import_module(f"{package}.{name}")


class _Port:
    """What C{tcp.Server} asks of its port."""

    _realPortNumber = 40010


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection, both non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    for end in (ours, theirs):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end.setblocking(False)
    return ours, theirs


def _tcp_transport(protocol: Any, reactor: Any) -> tuple[Any, socket.socket]:
    """
    Twisted's C{tcp.Server} for C{protocol} over one end of a loopback
    connection (as the daemon's listener makes it, on a memory reactor),
    and the other end to read what it sends.
    """
    from twisted.internet import tcp

    ours, theirs = _loopback_pair()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 40000), _Port(), 1, reactor)
    return transport, theirs


def _drain(end: socket.socket) -> bytes:
    """Everything that has arrived at C{end} so far."""
    chunks = []
    while True:
        try:
            chunk = end.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _received(end: socket.socket, complete: Callable[[bytes], bool]) -> bytes:
    """What arrives at C{end} until it is C{complete}, waiting on the socket (5 s at most)."""
    import select

    data = _drain(end)
    deadline = time.monotonic() + 5
    while not complete(data) and time.monotonic() < deadline:
        select.select([end], [], [], 0.1)
        data += _drain(end)
    return data


def _whole_answer(data: bytes) -> bool:
    """C{data} holds an HTTP answer's head and its C{Content-Length} of body."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return len(body) >= int(value)
    return True


def _whole_frame(data: bytes) -> bool:
    """C{data} holds one unmasked WebSocket frame of under 64 KiB."""
    if len(data) < 2:
        return False
    size = data[1] & 0x7F
    if size == 126:
        return len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[2:4], "big")
    return len(data) >= 2 + size


class Setup:
    """One node of C{package}: its site's lean channel, its targets, the others."""

    def __init__(self, package: str, others: int):
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import MemoryReactor
        from twisted.test.iosim import FakeTransport, connect

        config_mod, service, web, registry = (_module(package, n) for n in ("config", "service", "web", "registry"))
        self.clock = Clock()
        config = config_mod.Config()
        node = service.make_node(config, reactor=self.clock)
        self.gateway = node.gateway
        site = web.GatewaySite(web.make_resource(node), config, reactor=self.clock)
        factory = web.websocket_factory(node, behind_web=False)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        #: The reactor the TCP transports watch their sockets with (never run).
        self.fds = MemoryReactor()
        #: The client ends of the targeted connections, in order.
        self.client_ends: List[socket.socket] = []
        self.transports: List[Any] = []
        for user, count in (("w5one", 1), ("w5user", USER_CONNS)):
            for _ in range(count):
                server = factory.buildProtocol(peer)
                client = WebSocketClientProtocol()
                client.factory = WebSocketClientFactory("ws://127.0.0.1:40010/ws", headers={config.user_header: user})
                server_transport = FakeTransport(server, isServer=True, peerAddress=peer)
                connect(server, server_transport, client, FakeTransport(client, isServer=False))
                assert server.state == server.STATE_OPEN
                # From here on the connection is the daemon's kind: frames
                # go to a real socket through Twisted's TCP transport, which
                # the protocol produces for (as it registers at connectionMade).
                server_transport.unregisterProducer()
                tcp_transport, end = _tcp_transport(server, self.fds)
                server.transport = tcp_transport
                tcp_transport.registerProducer(server, True)
                self.transports.append(tcp_transport)
                self.client_ends.append(end)
        reg = self.gateway.registry
        for i in range(others):
            reg.add(
                registry.Connection(
                    conn_id=f"bg-{i:08d}-0000-4000-8000-000000000000",
                    user_name=f"bg{i}",
                    token=f"token-{i}",
                    access_public=False,
                    remote_addr="127.0.0.1",
                )
            )
        one = [c.conn_id for c in reg if c.user_name == "w5one"]
        assert len(one) == 1
        data = "x" * (PAYLOAD - 30)
        payload = {"event": "bench", "data": data}
        self.bodies = {
            "conn": json.dumps({"payload": payload, "conn_id": one[0]}).encode(),
            "user": b'{"payload":%s,"users":["w5user"]}' % json.dumps(payload).encode(),
        }
        self.channel = site.api_channel(peer)
        self.transport, self.app_end = _tcp_transport(self.channel, self.fds)
        self.channel.makeConnection(self.transport)

    def request(self, target: str) -> bytes:
        """A W5 call as Node's http module writes it (keep-alive agent)."""
        body = self.bodies[target]
        return (
            b"POST /tapr/ws/conn/send HTTP/1.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Host: 127.0.0.1:20001\r\n"
            b"Connection: keep-alive\r\n"
            b"\r\n%s" % (len(body), body)
        )

    def clear(self) -> None:
        """Read and drop what the API channel and the targeted connections sent."""
        _drain(self.app_end)
        for end in self.client_ends:
            _drain(end)

    def calls(self, target: str, n: int) -> Callable[[], None]:
        """A function making C{n} calls, clearing what they wrote every 100."""
        data = self.request(target)
        feed = self.channel.dataReceived
        clear = self.clear

        def run() -> None:
            for i in range(n):
                feed(data)
                if i % 100 == 99:
                    clear()

        return run

    def check(self, target: str) -> bytes:
        """One call's answer (head without Date), and the frames it sent."""
        self.clear()
        self.channel.dataReceived(self.request(target))
        # Every write went to its socket at once (nothing left buffered).
        assert not any(t.dataBuffer or t._tempDataBuffer for t in [self.transport, *self.transports])
        answer = _received(self.app_end, _whole_answer)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.startswith(b"Date:")]
        reached = range(0, 1) if target == "conn" else range(1, 1 + USER_CONNS)
        frames = b"|".join(
            _received(end, _whole_frame) if i in reached else _drain(end) for i, end in enumerate(self.client_ends)
        )
        return b"\r\n".join(lines) + b"\r\n\r\n" + body + b"#" + frames


class Callgrind:
    """Instrumentation switched on and off from inside, and each stretch's count read back."""

    def __init__(self, out_file: str) -> None:
        self.pid = str(os.getpid())
        #: Where valgrind writes the dumps (its C{--callgrind-out-file}).
        self.out_file = out_file.replace("%p", self.pid)

    def _control(self, *args: str) -> None:
        # callgrind_control waits for the process to read its command file,
        # which it does only while running: spin (uninstrumented) meanwhile.
        process = subprocess.Popen(
            ["callgrind_control", *args, self.pid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while process.poll() is None:
            for _ in range(10000):
                pass
        if process.returncode:
            raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {process.returncode}")

    def measure(self, run: Callable[[], None]) -> int:
        self._control("-z")
        self._control("-i", "on")
        run()
        self._control("-i", "off")
        before = set(glob.glob(self._pattern()))
        self._control("-d")
        new = sorted(set(glob.glob(self._pattern())) - before, key=os.path.getmtime)
        if not new:
            raise RuntimeError(f"no new callgrind dump matching {self._pattern()}")
        with open(new[-1]) as f:
            totals = [int(line.split()[1]) for line in f if line.startswith("totals:")]
        if not totals:
            raise RuntimeError(f"no totals in {new[-1]}")
        return totals[-1]

    def _pattern(self) -> str:
        return self.out_file + "*"


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with (default %(default)s)")
    parser.add_argument("--others", default="100,1000,10000", help="unrelated connections open, comma-separated")
    parser.add_argument("--targets", default="conn,user", help="conn (one conn_id), user (one user's 10)")
    parser.add_argument("-n", type=int, default=5000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of baseline and working tree")
    parser.add_argument(
        "--callgrind",
        metavar="OUT_FILE",
        help="count instructions: run under callgrind, given its --callgrind-out-file (%%p for the pid)",
    )
    parser.add_argument("--only", choices=("baseline", "tree"), help="measure one side only")
    args = parser.parse_args(argv)
    temp = tempfile.mkdtemp(prefix="wsgw-bench-sendpath-")
    _baseline_package(temp, args.baseline)
    sys.path.insert(0, temp)
    packages = {f"baseline ({args.baseline})": "wsgw_baseline", "working tree": "wsgw"}
    if args.only == "baseline":
        del packages["working tree"]
    elif args.only == "tree":
        del packages[f"baseline ({args.baseline})"]
    callgrind = Callgrind(args.callgrind) if args.callgrind else None
    n = args.n if not callgrind else min(args.n, 1000)
    rounds = args.rounds if not callgrind else 1
    print(
        f"{n} calls per measurement, {rounds} round(s); {'instructions' if callgrind else 'process_time µs'} per call"
    )
    for others in (int(x) for x in args.others.split(",")):
        setups = {label: Setup(package, others) for label, package in packages.items()}
        # The collector as the daemon settles it once it listens (wsgw.tap).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        checks = {label: {t: s.check(t) for t in args.targets.split(",")} for label, s in setups.items()}
        if len({json.dumps({t: v.decode("latin-1") for t, v in c.items()}) for c in checks.values()}) != 1:
            for label, c in checks.items():
                print(label, c)
            raise SystemExit("the two answer differently")
        for target in args.targets.split(","):
            results: Dict[str, List[float]] = {label: [] for label in setups}
            for _ in range(rounds):
                for label, setup in setups.items():
                    setup.calls(target, 200)()  # warm up
                    run = setup.calls(target, n)
                    if callgrind:
                        results[label].append(callgrind.measure(run) / n)
                    else:
                        start = time.process_time()
                        run()
                        results[label].append((time.process_time() - start) / n * 1e6)
            line = [f"{others:>6} others, to 1 {target}:"]
            for label, values in results.items():
                shown = ", ".join(f"{v:,.0f}" if callgrind else f"{v:.1f}" for v in values)
                line.append(f"{label} best {min(values):,.1f} ({shown})")
            if len(results) == 2:
                first, second = (min(v) for v in results.values())
                line.append(f"ratio {second / first:.3f}")
            print("  ".join(line), flush=True)
        del setups
        gc.unfreeze()


if __name__ == "__main__":
    main(sys.argv[1:])
