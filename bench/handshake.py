"""
What one WebSocket handshake costs wsgw, its C{open} event POST included,
measured in one process.

The daemon's service (as C{twist wsgw} builds it, the garbage collector
settled the same way) runs in this process on the real reactor; the Node
app (C{node/app.js}, answering the C{open} POSTs) and load generator
(C{node/loadgen.js}, 100 handshakes in flight as in W1) run beside it on
the load core.  Each round opens C{-n} connections, waits until the app
has every C{open} event and the forwarder is idle, and reports this
process's CPU per handshake; the connections are then closed, outside the
measured stretch.  Rounds follow each other on the same daemon, so later
rounds run with earlier rounds' connections gone but their garbage
collected or not, as a long-running daemon would.

    python -m bench.handshake -n 2000 --rounds 3
    python -m bench.handshake --in-memory -n 5000 --rounds 5
    python -m bench.handshake -n 1000 --cprofile /tmp/hs.pstats
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        python -m bench.handshake -n 200 --rounds 2 --callgrind

C{--in-memory} measures the handshake alone: the listener's router, the
WebSocket protocol and the gateway's C{opened} over C{StringTransport}s,
no sockets, no app (nothing is posted), on a C{Clock}.

With C{--callgrind} (run under valgrind as above) instruction counting is
switched on over each measured stretch only (C{callgrind_control}), and
each stretch is dumped as its own part: instructions per handshake are the
part's total over C{-n}.  The figure includes the reactor's idle turns and
a thread waiting on the load generator's pipe, which are next to nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List

from twisted.internet import threads
from twisted.internet.defer import Deferred, ensureDeferred

from . import procs
from .loadgen import App, LoadGen, ensure_node_modules
from .peers import HEARTBEAT


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.handshake", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="handshakes per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight (default 100, as W1)")
    parser.add_argument("--cprofile", type=Path, metavar="FILE", help="cProfile the measured stretches into FILE")
    parser.add_argument("--callgrind", action="store_true", help="toggle callgrind over the measured stretches")
    parser.add_argument("--wsgw-args", default="", help="more wsgw options")
    parser.add_argument("--in-memory", action="store_true", help="the handshake alone, over StringTransports, no app")
    return parser.parse_args(argv)


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True, timeout=120)


async def run(reactor: Any, args: argparse.Namespace, workdir: Path) -> None:
    from wsgw.tap import Options, makeService

    ports = procs.Ports()
    app = App(ports.take(), workdir / "app.log")
    load = None
    port = ports.take()
    options = Options()
    options.parseOptions(
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--max-connections-per-user",
            "0",
            "--max-connections",
            "0",
            "--app-url",
            app.base + "/wsgw",
            *args.wsgw_args.split(),
        ]
    )
    daemon = makeService(options, reactor)
    try:
        daemon.startService()
        await daemon.listening  # type: ignore[attr-defined]
        load = LoadGen(workdir / "loadgen.log")
        profiler = cProfile.Profile() if args.cprofile else None
        gateway = _gateway(daemon)
        opens = 0
        for round_no in range(args.rounds):
            group = f"r{round_no}"
            started = time.process_time()
            if args.callgrind:
                _callgrind("-z")
                _callgrind("-i", "on")
            if profiler is not None:
                profiler.enable()
            answer = await threads.deferToThread(
                load.call,
                timeout=120 + args.n / 20,
                cmd="open",
                group=group,
                count=args.n,
                concurrency=args.concurrency,
                ping=HEARTBEAT,
                retries=0,
                timeoutMs=int((50 + args.n / 25) * 1000),
                url=f"ws://127.0.0.1:{port}/ws",
                headers={"X-Bfl-User": "w1-{i}"},
            )
            opens += args.n
            await gateway.forwarder.drained()  # every open event answered by the app
            if profiler is not None:
                profiler.disable()
            if args.callgrind:
                _callgrind("-d")
                _callgrind("-i", "off")
            cpu = time.process_time() - started
            print(
                f"round {round_no}: {answer['opened']} opened at {answer['rate']:.0f}/s, "
                f"{1e6 * cpu / args.n:.0f} µs CPU per handshake (this process, open POST included)",
                flush=True,
            )
            if answer["opened"] != args.n:
                raise RuntimeError(f"only {answer['opened']} of {args.n} opened: {answer['errors']}")
            stats = await threads.deferToThread(app.stats)
            seen = stats["open"]
            print(
                f"  the app: {stats['open']} open events, {stats.get('connections')} connections accepted", flush=True
            )
            if seen < opens:
                raise RuntimeError(f"the app has {seen} of {opens} open events")
            await threads.deferToThread(load.call, timeout=60, cmd="close", group=group)
            await _until(reactor, lambda: not len(gateway.live))
        if profiler is not None:
            profiler.dump_stats(str(args.cprofile))
    finally:
        if load is not None:
            load.stop()
        await daemon.stopService()
        app.stop()


def _gateway(daemon: Any) -> Any:
    """The gateway of the daemon's node (its L{NodeService} is a child of the daemon)."""
    from wsgw.service import NodeService

    for service in daemon:
        if isinstance(service, NodeService):
            return service.node.gateway
    raise RuntimeError("no NodeService in the daemon")


async def _until(reactor: Any, predicate: Any, timeout: float = 120.0) -> None:
    """Poll C{predicate} every 50 ms until true; bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        d: Deferred[None] = Deferred()
        reactor.callLater(0.05, d.callback, None)
        await d


def in_memory(args: argparse.Namespace) -> None:
    """Handshakes through the router over StringTransports; CPU (or instructions) per handshake."""
    import gc

    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from wsgw.config import Config
    from wsgw.router import RouterFactory
    from wsgw.service import make_node
    from wsgw.web import GatewaySite, make_resource, websocket_factory

    clock = Clock()
    config = Config(max_connections=0, max_connections_per_user=0)
    node = make_node(config, reactor=clock)
    websocket = websocket_factory(node)
    site = GatewaySite(make_resource(node, factory=websocket), config, reactor=clock)
    router = RouterFactory(site, websocket, clock, config.handshake_timeout, site.rate_limiter)
    peer = IPv4Address("TCP", "127.0.0.1", 5555)
    request = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:40010\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Bfl-User: w1-1\r\n\r\n"
    )  # what the load generator's ws client sends

    def one() -> Any:
        protocol = router.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        transport.protocol.dataReceived(request)
        return transport

    kept = [one() for _ in range(200)]  # warm
    if not kept[0].value().startswith(b"HTTP/1.1 101 "):
        raise RuntimeError(kept[0].value())
    gc.freeze()  # as the daemon settles its collector once it listens
    gc.set_threshold(10_000, 10, 10)
    for round_no in range(args.rounds):
        started = time.process_time()
        if args.callgrind:
            _callgrind("-z")
            _callgrind("-i", "on")
        kept.extend(one() for _ in range(args.n))
        if args.callgrind:
            _callgrind("-d")
            _callgrind("-i", "off")
        cpu = time.process_time() - started
        print(f"round {round_no}: {1e6 * cpu / args.n:.1f} µs CPU per handshake (in memory, no app)", flush=True)


def main(argv: List[str]) -> None:
    args = parse(argv)
    if args.in_memory:
        in_memory(args)
        return
    ensure_node_modules()
    procs.raise_nofile()
    from twisted.internet import reactor

    os.sched_setaffinity(0, {procs.SERVER_CORE})
    with tempfile.TemporaryDirectory(prefix="wsgw-handshake-") as folder:
        failures: List[Any] = []

        def done(result: Any) -> None:
            if result is not None:
                failures.append(result)
            reactor.stop()  # type: ignore[attr-defined]

        reactor.callWhenRunning(  # type: ignore[attr-defined]
            lambda: ensureDeferred(run(reactor, args, Path(folder))).addBoth(done)
        )
        reactor.run()  # type: ignore[attr-defined]
        if failures:
            failures[0].printTraceback()
            raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
