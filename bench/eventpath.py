"""
The daemon's cost per forwarded event, in one process: client frames in,
event POSTs out, the app's answers read (W3), and with ``--reply`` the
app's inline reply sent back to the client as a frame (W4r's path).

    python -m bench.eventpath                      # CPU µs per event, 3 rounds
    python -m bench.eventpath --callgrind          # instructions per event
    python -m bench.eventpath --callgrind --reply --chunk 1
    python -m bench.eventpath --callgrind --batch 50      # W3b's path
    python -m bench.eventpath --cprofile 30        # the 30 dearest functions

The gateway is the daemon's own (``make_node`` and ``websocket_factory``
over a TCP listener on 127.0.0.1, the reactor Twisted picks, the daemon's
garbage-collector settings); ``--conns`` clients are plain sockets that
open with a handshake and then write their ``-n / --conns`` masked text
frames of ~100 bytes, ``--chunk`` frames per write and reactor turn (100:
everything at once; the load generator's frames arrive a few per read, so
a cost that depends on how events queue, as W3b's batches do, shows at
``--chunk 1``).  The app is a small
asyncio server in a subprocess answering each POST as Node's ``http``
does (200, ``{}``; with ``--reply`` the event's ``data`` and
``X-Wsgw-Reply: 1``).  The clients' side costs a ``send`` per write and,
with ``--reply``, a ``recv`` per turn: next to nothing in user space.

``--callgrind`` runs the driver again under ``valgrind --tool=callgrind``
and counts only the measured round (the round runs inside a ctypes
callback, and callgrind collects inside ``closure_fcn`` only): user-space
instructions per event, load-independent, the warm-up and the handshakes
left out.  ``--keep FILE`` keeps callgrind's output for
``callgrind_annotate --inclusive=yes FILE``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import functools
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List, Optional

from . import miniapp

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sDate: %s\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n"


def _answer(body: bytes, reply: bool) -> bytes:
    """What Node's http server answers an event POST; with C{reply}, by an inline reply."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()
    event = json.loads(body)
    if reply and isinstance(event, dict) and event.get("action") == "message":
        answer = json.dumps(event["data"], separators=(",", ":")).encode()
        return _HEAD % (len(answer), b"X-Wsgw-Reply: 1\r\n", date) + answer
    return _HEAD % (2, b"", date) + b"{}"


def _frame(payload: bytes) -> bytes:
    """A client's masked text frame (a fixed mask: the bytes do not matter)."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _message(client: int, seq: int, size: int) -> bytes:
    text = json.dumps({"c": client, "s": seq}, separators=(",", ":"))
    pad = max(0, size - len(text) - 8)
    return json.dumps({"c": client, "s": seq, "p": "x" * pad}, separators=(",", ":")).encode()


class Driver:
    """The gateway, its app and the clients, driven turn by turn."""

    def __init__(self, args: argparse.Namespace, app_port: int) -> None:
        from twisted.internet import reactor

        from wsgw.config import Config
        from wsgw.service import make_node
        from wsgw.tap import settle_garbage_collector
        from wsgw.web import websocket_factory

        self.args = args
        self.reactor: Any = reactor
        config = Config(app_url=f"http://127.0.0.1:{app_port}/wsgw/event", app_batch=args.batch)
        self.node = make_node(config, reactor)
        factory = websocket_factory(self.node, behind_web=False)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        reactor.startRunning()
        settle_garbage_collector()
        self.gateway = self.node.gateway
        self.forwarder = self.gateway.forwarder
        self.clients: List[socket.socket] = []
        self.round = 0

    def stop(self) -> None:
        """Stop the reactor as run() would (its thread pool with it)."""
        self.reactor.stop()
        while self.reactor.running:
            self.reactor.iterate(0)

    def turn(self) -> None:
        self.reactor.iterate(0.05)

    def until(self, done: Callable[[], bool], what: str, bound: float = 60.0) -> None:
        deadline = time.monotonic() + bound
        while not done():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            self.turn()

    def connect(self) -> None:
        port = self.port.getHost().port
        key = base64.b64encode(os.urandom(16)).decode()
        for i in range(self.args.conns):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                (
                    f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-Bfl-User: user{i}\r\n\r\n"
                ).encode()
            )
            sock.setblocking(False)
            self.clients.append(sock)
            self.reactor.iterate(0)  # accepted: the listener's backlog stays short
        self.until(lambda: len(self.gateway.registry) == self.args.conns, "the handshakes")
        self.until(lambda: self.forwarder.stats.delivered >= self.args.conns, "the open events")
        self.drain_clients()

    def drain_clients(self) -> int:
        got = 0
        for sock in self.clients:
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    got += len(data)
            except BlockingIOError:
                pass
        return got

    def prepare(self, per_client: int) -> Callable[[], int]:
        """
        The next round, framed: every client is to send C{per_client}
        messages; calling the result sends them and returns the events
        delivered once the app has every one (and, with C{--reply}, every
        reply went out).
        """
        base = self.round * per_client
        self.round += 1
        chunk = self.args.chunk
        batches = []
        for start in range(0, per_client, chunk):
            batches.append(
                [
                    b"".join(
                        _frame(_message(c, base + s, self.args.size))
                        for s in range(start, min(start + chunk, per_client))
                    )
                    for c in range(len(self.clients))
                ]
            )
        expected = self.forwarder.stats.delivered + per_client * len(self.clients)
        replies = self.gateway.live.reply_stats
        replies_expected = replies.sent + (per_client * len(self.clients) if self.args.reply else 0)
        return lambda: self._measured(batches, expected, replies_expected)

    def _measured(self, batches: List[List[bytes]], expected: int, replies_expected: int) -> int:
        stats = self.forwarder.stats
        before = stats.delivered
        replies = self.gateway.live.reply_stats
        for batch in batches:
            for sock, data in zip(self.clients, batch):
                sock.send(data)
            self.turn()
            if self.args.reply:
                self.drain_clients()
        while stats.delivered < expected or replies.sent < replies_expected:
            self.turn()
            if self.args.reply:
                self.drain_clients()
        return stats.delivered - before


def _inner(args: argparse.Namespace, app_port: int) -> None:
    driver = Driver(args, app_port)
    try:
        _rounds(driver, args)
    finally:
        driver.stop()


def _rounds(driver: Driver, args: argparse.Namespace) -> None:
    driver.connect()
    per_client = args.n // args.conns
    driver.prepare(min(per_client, 20))()  # warm-up: connections, caches
    if args.callgrind_inner:
        results: List[int] = []
        run = driver.prepare(per_client)
        measured = ctypes.CFUNCTYPE(None)(lambda: results.append(run()))
        measured()  # callgrind collects inside closure_fcn only
        print(f"events {results[0]}", flush=True)
        return
    if args.cprofile:
        import cProfile
        import pstats

        run = driver.prepare(per_client)
        profile = cProfile.Profile()
        profile.enable()
        events = run()
        profile.disable()
        print(f"{events} events")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.cprofile)
        return
    figures = []
    for _ in range(args.rounds):
        run = driver.prepare(per_client)
        started = time.process_time()
        events = run()
        figures.append((time.process_time() - started) / events * 1e6)
    shown = ", ".join(f"{f:.1f}" for f in figures)
    print(
        f"gateway CPU per event, µs ({args.n} events, {args.conns} conns, chunk {args.chunk}): best {min(figures):.1f}; rounds: {shown}"
    )


def _callgrind(argv: List[str], keep: Optional[str]) -> None:
    out = keep or tempfile.mktemp(prefix="wsgw-eventpath-", suffix=".callgrind")
    inner = [a for a in argv if a != "--callgrind"]
    command = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=closure_fcn",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "bench.eventpath",
        "--callgrind-inner",
        *inner,
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    collected = re.search(r"Collected : ([0-9]+)", run.stderr)
    events = re.search(r"events ([0-9]+)", run.stdout)
    if run.returncode or collected is None or events is None:
        sys.stderr.write(run.stdout + run.stderr)
        raise SystemExit("callgrind run failed")
    total, n = int(collected.group(1)), int(events.group(1))
    print(f"user-space instructions per event: {total / n:,.0f} ({total:,} over {n} events)")
    if keep is None:
        os.unlink(out)
    else:
        print(f"callgrind_annotate --inclusive=yes {out}")


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10000, help="events per round")
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=100, help="frames per client write")
    parser.add_argument("--size", type=int, default=100, help="bytes per message")
    parser.add_argument("--reply", action="store_true", help="the app answers with inline replies (W4r)")
    parser.add_argument("--batch", type=int, default=1, help="events per POST at most (--app-batch; W3b: 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N dearest functions")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--keep", help="with --callgrind: keep callgrind's output in this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--callgrind-inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        miniapp.serve(functools.partial(_answer, reply=args.reply))
        return
    if args.callgrind:
        keep = args.keep
        rest = list(argv)
        if keep is not None:
            i = rest.index("--keep")
            del rest[i : i + 2]
        _callgrind(rest, keep)
        return
    with miniapp.running(["-m", "bench.eventpath", "--serve"] + (["--reply"] if args.reply else [])) as port:
        _inner(args, port)


if __name__ == "__main__":
    gc.collect()
    main(sys.argv[1:])
