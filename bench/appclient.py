"""
Client CPU per event POST: the app client before issue 11 (commit
91b80f8's ``wsgw/appclient.py`` over ``wsgw/apphttp.py``) against today's
(``wsgw.eventpost`` over ``wsgw.appagent``), in one process and one run.

    python -m bench.appclient              # N=20000 events per run, 3 rounds
    python -m bench.appclient -n 5000 --rounds 2
    python -m bench.appclient --parsers    # answer parsers alone (needs h11)

A trivial app (an asyncio server answering 200 with an empty body) runs in
a subprocess on a loopback ephemeral port.  Both clients post the same
events, ``--in-flight`` at a time, over their own pools; the rounds
alternate the two so that a machine getting busier or cooler shows in
both.  Each figure is ``time.process_time()`` of this process (the
client) per POST: the gateway's share of an event, headers built from the
event included (the gateway built them before, the poster now).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

from . import miniapp

BASELINE = "91b80f8"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def _baseline_package(root: str) -> None:
    """The baseline's two modules as package C{wsgw_baseline} under C{root}."""
    package = os.path.join(root, "wsgw_baseline")
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").close()
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout
    for name in ("appclient", "apphttp"):
        source = subprocess.run(
            ["git", "-C", top.strip(), "show", f"{BASELINE}:wsgw/{name}.py"], capture_output=True, check=True
        ).stdout
        with open(os.path.join(package, f"{name}.py"), "wb") as f:
            f.write(source)


def _events(n: int) -> List[Any]:
    from wsgw.events import Event

    body = b'{"data":{"text":"hello there"},"action":"message","user_name":"u1","conn_id":"c","token":"t","access_public":false}'
    return [
        Event(f"conn{i % 100}", i, "message", body, cookie="auth_token=abc", remote_addr="127.0.0.1") for i in range(n)
    ]


def _baseline_post(url: str, reactor: Any, in_flight: int) -> Callable[[Any], Any]:
    from wsgw_baseline.appclient import AppClient, build_http_client

    client = AppClient(build_http_client(reactor, in_flight), url, reactor, 10.0)
    json_headers = [b"application/json"]

    def post(event: Any) -> Any:
        # What the gateway did per event before the poster built headers.
        headers: Dict[bytes, List[bytes]] = {
            b"Content-Type": json_headers,
            b"X-Wsgw-Event-Id": [f"{event.conn_id}:{event.seq}".encode()],
            b"X-Forwarded-For": [event.remote_addr.encode("utf-8", "replace")],
        }
        if event.cookie:
            headers[b"Cookie"] = [event.cookie.encode("utf-8", "replace")]
        return client(event.body, headers)

    return post


def _current_post(url: str, reactor: Any, in_flight: int) -> Callable[[Any], Any]:
    from wsgw.eventpost import EventPoster, build_http_client

    return EventPoster(build_http_client(reactor, in_flight), url, reactor, 10.0).post


def _run(post: Callable[[Any], Any], events: List[Any], in_flight: int) -> Any:
    """Post every event, C{in_flight} at a time; fires with CPU seconds used."""
    from twisted.internet.defer import Deferred

    done: Deferred[float] = Deferred()
    queue = iter(events)
    state = {"open": 0, "failed": 0}
    started = time.process_time()

    def next_one(_: object = None) -> None:
        for event in queue:
            state["open"] += 1
            post(event).addCallbacks(finished, failed)
            return
        if state["open"] == 0 and not done.called:
            done.callback(time.process_time() - started)

    def finished(_: object) -> None:
        state["open"] -= 1
        next_one()

    def failed(f: Any) -> None:
        state["failed"] += 1
        print("failed:", f.getErrorMessage(), file=sys.stderr)
        finished(None)

    for _ in range(in_flight):
        next_one()
    return done


_TYPICAL = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 09:46:27 GMT\r\n"
    b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok"
)


def parsers(n: int) -> None:
    """CPU per answer read: the baseline's hand-written parser, llhttp in
    today's agent, and h11 (which also frames the request)."""
    import h11
    import wsgw_baseline.apphttp as baseline
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    import wsgw.appagent as current

    def agent_connection(module: Any) -> float:
        pool = module.AppPool(Clock(), max_idle=2, idle_timeout=1e9)
        connection = module.AppConnection(pool, ("app",))
        connection.makeConnection(StringTransport())
        started = time.process_time()
        for _ in range(n):
            connection.send(b"request")
            connection.dataReceived(_TYPICAL)
            pool.take(("app",))
        return (time.process_time() - started) / n * 1e6

    def with_h11() -> float:
        connection = h11.Connection(h11.CLIENT)
        started = time.process_time()
        for _ in range(n):
            connection.send(h11.Request(method="POST", target="/", headers=[("Host", "app"), ("Content-Length", "2")]))
            connection.send(h11.Data(data=b"{}"))
            connection.send(h11.EndOfMessage())
            connection.receive_data(_TYPICAL)
            while not isinstance(connection.next_event(), h11.EndOfMessage):
                pass
            connection.start_next_cycle()
        return (time.process_time() - started) / n * 1e6

    print(f"CPU per answer read, µs (N={n}): a 200 with five header lines")
    for _ in range(2):
        print(
            f"  before (hand-written) {agent_connection(baseline):5.1f}   "
            f"after (llhttp) {agent_connection(current):5.1f}   h11 {with_h11():5.1f}"
        )


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="events per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two clients")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--parsers", action="store_true", help="compare answer parsers only (h11 installed)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        miniapp.serve(lambda _body: _ANSWER)
        return
    temp = tempfile.mkdtemp(prefix="wsgw-bench-appclient-")
    _baseline_package(temp)
    sys.path.insert(0, temp)
    if args.parsers:
        parsers(args.n)
        return
    with miniapp.running(["-m", "bench.appclient", "--serve"]) as port:
        _measure(f"http://127.0.0.1:{port}/ws/message", args)


def _measure(url: str, args: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import inlineCallbacks

    events = _events(args.n)
    clients = {
        f"before ({BASELINE})": _baseline_post(url, reactor, args.in_flight),
        "after (eventpost + appagent)": _current_post(url, reactor, args.in_flight),
    }
    results: Dict[str, List[float]] = {name: [] for name in clients}

    @inlineCallbacks
    def rounds() -> Any:
        try:
            for post in clients.values():  # warm up: connections, caches
                yield _run(post, events[:2000], args.in_flight)
            for _ in range(args.rounds):
                for name, post in clients.items():
                    cpu = yield _run(post, events, args.in_flight)
                    results[name].append(cpu / len(events) * 1e6)
        finally:
            reactor.stop()

    reactor.callWhenRunning(rounds)
    reactor.run()
    print(f"client CPU per event POST, µs (N={args.n}, {args.in_flight} in flight, {args.rounds} rounds)")
    for name, figures in results.items():
        shown = ", ".join(f"{f:.1f}" for f in figures)
        print(f"  {name:32} best {min(figures):6.1f}   rounds: {shown}")


if __name__ == "__main__":
    main(sys.argv[1:])
