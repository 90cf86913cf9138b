"""
The five workloads, each run against a fresh instance of every server with a
fresh app and load generator (so one workload's leftovers never weigh on the
next), each step bounded in time.

  W1 idle        N connections with a 30 s heartbeat: handshakes/s, resident
                 memory per connection, CPU while idle.
  W1c admission  W1 with wsgw asking the app about every handshake
                 (--connect-url), the app admitting at once: what the hook
                 costs per handshake, beside W1 in the same run.
  W2 fan-out     1,000 connections of one user, 200 publishes of ~100 bytes:
                 deliveries/s and publish-to-receipt latency; nothing lost,
                 duplicated or reordered on any connection.
  W3 forwarding  100 connections x 100 messages to the app: events/s end to
                 end; per-connection order and no loss, checked by the app.
  W4 round trip  client -> app -> server's push API -> same client, at a fixed
                 offered rate: latency p50/p99.
  W5 scaling     push to one connection and to one user's connections while
                 100 / 1,000 / 10,000 unrelated connections are open: the cost
                 per call should not grow with them.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from . import procs
from .loadgen import App, LoadGen
from .peers import HEARTBEAT, Server, Wsgw
from .report import NA, Results


def per_op(cpu: dict, operations: int) -> Optional[float]:
    """Server CPU microseconds per operation over a measured stretch."""
    return 1e6 * cpu["server_cpu_s"] / operations if operations else None


@dataclass(frozen=True)
class Params:
    """Sizes of every workload; L{FULL} is the benchmark, L{QUICK} a smoke run."""

    w1_sizes: Sequence[int]
    w1_settle: float  # seconds after the last handshake before memory is read
    w1_hold: float  # seconds of idle heartbeat traffic measured after that
    w2_conns: int
    w2_messages: int
    w3_conns: int
    w3_messages: int
    w4_conns: int
    w4_rate: int
    w4_seconds: float
    w5_background: Sequence[int]
    w5_calls: int
    w5_user_conns: int
    w6_conns: int = 5000
    concurrency: int = 100  # handshakes in flight at once
    payload: int = 100  # bytes of each message


FULL = Params(
    w1_sizes=(1000, 5000, 10000),
    w1_settle=2.0,
    w1_hold=10.0,
    w2_conns=1000,
    w2_messages=200,
    w3_conns=100,
    w3_messages=100,
    w4_conns=50,
    w4_rate=500,
    w4_seconds=10.0,
    w5_background=(100, 1000, 10000),
    w5_calls=2000,
    w5_user_conns=10,
)

QUICK = Params(
    w1_sizes=(50,),
    w1_settle=0.5,
    w1_hold=1.0,
    w2_conns=50,
    w2_messages=20,
    w3_conns=10,
    w3_messages=20,
    w4_conns=10,
    w4_rate=100,
    w4_seconds=2.0,
    w5_background=(10, 100),
    w5_calls=100,
    w5_user_conns=5,
    w6_conns=50,
)


class Session:
    """
    One server instance, its app and a load generator, for one workload:
    started on entry, every process stopped by PID on exit, whatever happened.
    """

    def __init__(
        self,
        server_cls,
        workdir: Path,
        ports: procs.Ports,
        profile: Optional[Path] = None,
        attach: Optional[str] = None,
    ):
        self.workdir = workdir
        self.profile = profile
        self.attach = attach
        self._measured = 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server: Server = server_cls(workdir, ports)
        self.app_port = ports.take()
        self.app: Optional[App] = None
        self.load: Optional[LoadGen] = None
        self.refused = 0  # handshakes refused, then retried
        self.refusals: dict = {}

    def __enter__(self) -> Session:
        try:
            app_url = None
            if self.app_port:
                self.app = App(self.app_port, self.workdir / "app.log", **self.server.app_endpoints())
                app_url = self.app.base
            self.server.start(app_url)
            self.load = LoadGen(self.workdir / "loadgen.log")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.load:
            self.load.stop()
        self.server.stop()
        if self.app:
            self.app.stop()

    def meter(self) -> procs.CpuMeter:
        roots = {"server": self.server.pid, "loadgen": self.load.pid}
        if self.app:
            roots["app"] = self.app.pid
        if self.profile is not None and self.server.name == "wsgw":
            self._measured += 1
            out = self.profile / f"{self.workdir.name}-{self._measured}.txt"
            if self.attach:
                argv = procs.attach_argv(self.attach, self.server.pid, out)
            else:
                argv = procs.py_spy_argv(self.server.pid, out)
            return procs.ProfiledMeter(roots, argv, out)
        return procs.CpuMeter(roots)

    def settle(self, timeout: float = 60.0, window: float = 0.5, threshold: float = 5.0) -> float:
        """
        Wait until the server is idle (under C{threshold}% of a core over a
        C{window}), so work left from opening connections (wsgw and Pushpin
        forward each open to the app) is not billed to what is measured next.
        Bounded by C{timeout}; returns the seconds waited.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            meter = procs.CpuMeter({"server": self.server.pid}).start()
            time.sleep(window)
            if meter.stop()["server_cpu_pct"] < threshold:
                break
        return time.monotonic() - started

    def open(self, group: str, count: int, clients: dict, params: Params, ping=None) -> dict:
        """
        Open C{count} clients and insist that every one got through; a
        refused handshake is retried (up to 3 times) and counted in
        C{self.refused}, which the workloads report.
        """
        answer = self.load.call(
            timeout=60 + count / 20,
            cmd="open",
            group=group,
            count=count,
            concurrency=params.concurrency,
            ping=ping,
            retries=3,
            timeoutMs=int((50 + count / 25) * 1000),
            **clients,
        )
        self.refused += answer["retried"] + answer["failed"]
        for error, times in answer["errors"].items():
            self.refusals[error] = self.refusals.get(error, 0) + times
        if answer["failed"] or answer["opened"] != count:
            raise RuntimeError(f"{count - answer['opened']} of {count} handshakes failed: {answer['errors']}")
        return answer


def checks(answer: dict) -> str:
    """lost/duplicated/reordered, as one cell."""
    return f"{answer['lost']}/{answer['dup']}/{answer['reordered']}"


def render(template: str, payload) -> str:
    """A publish body with a fixed payload (the same substitutions as loadgen.js)."""
    text = json.dumps(payload, separators=(",", ":"))
    return template.replace("@JSON@", text).replace("@STR@", json.dumps(text)).replace("@RAW@", text)


class Runner:
    """Runs the workloads over the servers and files the figures in L{Results}."""

    def __init__(
        self,
        params: Params,
        servers: Sequence,
        workdir: Path,
        results: Results,
        log: Callable[[str], None],
        profile: Optional[Path] = None,
        attach: Optional[str] = None,
    ):
        self.params = params
        self.profile = profile
        self.attach = attach
        self.servers = servers
        self.workdir = workdir
        self.results = results
        self.log = log
        self.ports = procs.Ports()
        self._sessions = 0
        self._turns = 0

    def session(self, server_cls) -> Session:
        self._sessions += 1
        workdir = self.workdir / f"{self._sessions:02d}-{server_cls.name}"
        return Session(server_cls, workdir, self.ports, self.profile, self.attach)

    def in_turn(self, label: str) -> List:
        """
        The servers in the order to measure them for the next workload:
        each workload starts with the server after the one the workload
        before started with.  On these machines the first server measured
        read up to 1.5 times high (the same code run against itself);
        always starting with the working tree billed that to wsgw alone.
        """
        k = self._turns % len(self.servers)
        self._turns += 1
        order = [*self.servers[k:], *self.servers[:k]]
        self.log(f"{label}: in the order {', '.join(cls.name for cls in order)}")
        return order

    def each_server(self, workload: str, label: str, metrics: Sequence[tuple], body: Callable) -> None:
        """
        Run C{body(server_cls)} for every server (L{in_turn}); a server that
        cannot play the workload gets "n/a", one that fails gets "error" and
        a note.
        """
        for server_cls in self.in_turn(label):
            if workload not in server_cls.workloads:
                self.results.not_applicable(label, metrics, server_cls.name)
                continue
            self.log(f"{label}: {server_cls.name}")
            started = time.monotonic()
            try:
                body(server_cls)
            except Exception as e:  # one server failing must not cost the others' figures
                self.log(f"{label}: {server_cls.name} failed: {e}")
                self.log(traceback.format_exc())
                self.results.not_applicable(label, metrics, server_cls.name, "error")
                self.results.fail(server_cls.name, f"{label}, {server_cls.name}: {e}")
            self.log(f"{label}: {server_cls.name} done in {time.monotonic() - started:.1f}s")

    def note_refusals(self, label: str, session: Session) -> None:
        if session.refused:
            self.results.notes.append(
                f"{label}, {session.server.name}: {session.refused} handshakes refused and retried ({session.refusals})"
            )

    def note_saturation(self, label: str, server: str, cpu: dict) -> None:
        """A figure taken while the load side used a whole core measures the load side: say so."""
        load = cpu.get("loadgen_cpu_pct", 0) + cpu.get("app_cpu_pct", 0)
        if load >= 90:
            self.results.notes.append(
                f"{label}, {server}: load generator and app at {load:.0f}% of their core; "
                f"the server's figures are a lower bound"
            )

    def verify(self, label: str, server: str, answer: dict) -> None:
        if answer.get("closes"):
            self.results.fail(
                server, f"{label}, {server}: connections closed during the run (close code: count) {answer['closes']}"
            )
        if answer["lost"] or answer["dup"] or answer["reordered"] or answer.get("bad"):
            self.results.fail(
                server, f"{label}, {server}: lost/dup/reordered {checks(answer)}, unexpected {answer.get('bad', 0)}"
            )

    # -- W1 ---------------------------------------------------------------------------------

    W1_METRICS = [
        ("handshakes/s", "↑"),
        ("server CPU µs per handshake", "↓"),
        ("handshakes refused (then retried)", ""),
        ("RSS per connection, KiB", "↓"),
        ("server CPU during handshakes, %", ""),
        ("load generator CPU during handshakes, %", ""),
        ("app CPU during handshakes, %", ""),
        ("server CPU idle with heartbeats, %", "↓"),
        ("heartbeats answered", ""),
    ]

    def w1(self, sizes: Optional[Sequence[int]] = None) -> None:
        for n in self.params.w1_sizes if sizes is None else sizes:
            label = f"W1 idle, N={n:,}"
            self.each_server("W1", label, self.W1_METRICS, lambda cls, n=n, label=label: self._w1(cls, n, label))

    def _w1(self, server_cls, n: int, label: str, connects: bool = False) -> None:
        """W1 at C{n}; with C{connects}, the app must have been asked about every handshake (W1c)."""
        p, r = self.params, self.results
        with self.session(server_cls) as s:
            time.sleep(0.5)
            before = procs.rss_bytes(s.server.pids())
            meter = s.meter().start()
            opened = s.open("idle", n, s.server.clients("W1"), p, ping=HEARTBEAT)
            cpu = meter.stop()
            if connects:
                # Retried handshakes ask again: at least one POST per connection.
                asked = s.app.stats()["connect"]
                r.add(label, "connect POSTs answered by the app", server_cls.name, asked)
                if asked < n:
                    r.fail(server_cls.name, f"{label}, {server_cls.name}: the app was asked about {asked} of {n}")
            self.note_saturation(label + " (handshakes)", server_cls.name, cpu)
            # Heartbeats keep a server busy, so "settled" is a lower bar here than elsewhere.
            s.settle(timeout=30, threshold=20)
            time.sleep(p.w1_settle)
            after = procs.rss_bytes(s.server.pids())
            # Per connection still open, should the server have dropped some.
            alive = s.load.call(timeout=30, cmd="pongs", group="idle")["open"] or n
            meter = s.meter().start()
            time.sleep(p.w1_hold)
            beats = s.load.call(timeout=30, cmd="pongs", group="idle")
            idle = meter.stop()
            name = server_cls.name
            r.add(label, "handshakes/s", name, opened["rate"], "↑")
            # The open event's POST included: a handshake costs both.
            r.add(label, "server CPU µs per handshake", name, per_op(cpu, n), "↓", digits=0)
            r.add(label, "RSS per connection, KiB", name, (after - before) / alive / 1024, "↓")
            r.add(label, "server CPU during handshakes, %", name, cpu["server_cpu_pct"], digits=0)
            r.add(label, "load generator CPU during handshakes, %", name, cpu["loadgen_cpu_pct"], digits=0)
            # The app shares the load generator's core: the two together may be what bounds the rate.
            r.add(label, "app CPU during handshakes, %", name, cpu.get("app_cpu_pct", NA), digits=0)
            r.add(label, "server CPU idle with heartbeats, %", name, idle["server_cpu_pct"], "↓")
            r.add(label, "heartbeats answered", name, f"{beats['pongs']}/{beats['pings']}")
            if beats["open"] != n:
                r.fail(
                    name,
                    f"{label}, {name}: {n - beats['open']} connections closed while idle "
                    f"(close code: count) {beats['closes']}",
                )
            # Pongs still in flight when counted are fine; most must be back.
            if beats["pings"] and beats["pongs"] < 0.9 * beats["pings"]:
                r.fail(name, f"{label}, {name}: only {beats['pongs']} of {beats['pings']} pings answered")
            r.add(label, "handshakes refused (then retried)", name, s.refused)
            self.note_refusals(label, s)
            self.log(
                f"  {opened['rate']:.0f} handshakes/s, {(after - before) / alive / 1024:.1f} KiB/conn "
                f"(RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB), pongs {beats['pongs']}/{beats['pings']}"
            )

    # -- W1c --------------------------------------------------------------------------------

    #: Where wsgw asks the bench app about a handshake (it answers 200 at once).
    W1C_PATH = "/wsgw/connect"

    W1C_METRICS = [("connect POSTs answered by the app", ""), *W1_METRICS]

    @staticmethod
    def w1c_label(n: int) -> str:
        return f"W1c idle, admitted by the app (--connect-url), N={n:,}"

    def w1c(self, sizes: Optional[Sequence[int]] = None) -> None:
        """W1 with wsgw's --connect-url on the bench app (wsgw only); beside W1's figures when W1 ran."""
        for n in self.params.w1_sizes if sizes is None else sizes:
            label = self.w1c_label(n)

            def run(cls, n=n, label=label) -> None:
                if not issubclass(cls, Wsgw):
                    self.results.not_applicable(label, self.W1C_METRICS, cls.name, "n/a (no connect hook)")
                    return
                if not cls.supports("--connect-url"):
                    self.results.not_applicable(label, self.W1C_METRICS, cls.name, "n/a (no --connect-url)")
                    return
                cls = type(cls.__name__, (cls,), {"connect_path": self.W1C_PATH})
                self._w1(cls, n, label, connects=True)

            self.each_server("W1", label, self.W1C_METRICS, run)
            self._w1c_versus_w1(n)

    def _w1c_versus_w1(self, n: int) -> None:
        """W1c's figure over W1's, server by server, at the same N and in the same run."""
        plain, hooked = f"W1 idle, N={n:,}", self.w1c_label(n)
        for metric, better in (("server CPU µs per handshake", "↓"), ("handshakes/s", "↑")):
            without, with_hook = self._row_values(plain, metric), self._row_values(hooked, metric)
            if not without:
                return  # W1 did not run
            for server_cls in self.servers:
                a, b = without.get(server_cls.name), with_hook.get(server_cls.name)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                    value: Any = b / a
                else:
                    value = b if isinstance(b, str) and b.startswith(NA) else "–"
                self.results.add(hooked, f"{metric}, W1c ÷ W1", server_cls.name, value, better, digits=2, derived=True)

    # -- W2 ---------------------------------------------------------------------------------

    W2_METRICS = [
        ("deliveries/s", "↑"),
        ("latency p50, ms", "↓"),
        ("latency p99, ms", "↓"),
        ("lost/dup/reordered", ""),
        ("server CPU µs per delivery", "↓"),
        ("server CPU, %", ""),
        ("load generator CPU, %", ""),
    ]

    def w2(self) -> None:
        p = self.params
        label = f"W2 fan-out, {p.w2_conns:,} conns x {p.w2_messages} msgs"
        self.each_server("W2", label, self.W2_METRICS, lambda cls: self._w2(cls, label))

    def _w2(self, server_cls, label: str) -> None:
        p, r = self.params, self.results
        with self.session(server_cls) as s:
            s.open("fan", p.w2_conns, s.server.clients("W2"), p)
            s.settle()
            meter = s.meter().start()
            answer = s.load.call(
                timeout=120 + p.w2_messages,
                cmd="fanout",
                group="fan",
                messages=p.w2_messages,
                size=p.payload,
                publish=s.server.publisher("bench"),
                drainMs=60000,
            )
            cpu = meter.stop()
            self.note_saturation(label, server_cls.name, cpu)
            name = server_cls.name
            r.add(label, "deliveries/s", name, answer["rate"], "↑", digits=0)
            r.add(label, "latency p50, ms", name, answer["latencyMs"]["p50"], "↓")
            r.add(label, "latency p99, ms", name, answer["latencyMs"]["p99"], "↓")
            r.add(label, "lost/dup/reordered", name, checks(answer))
            r.add(label, "server CPU µs per delivery", name, per_op(cpu, answer["deliveries"]), "↓", digits=1)
            r.add(label, "server CPU, %", name, cpu["server_cpu_pct"], digits=0)
            r.add(label, "load generator CPU, %", name, cpu["loadgen_cpu_pct"], digits=0)
            if answer["publishErrors"]:
                r.fail(name, f"{label}, {name}: publish errors {answer['publishErrors']}")
            self.verify(label, name, answer)
            self.note_refusals(label, s)
            self.log(
                f"  {answer['deliveries']}/{answer['expected']} deliveries, {answer['rate']:.0f}/s, "
                f"p50 {answer['latencyMs']['p50']} ms, p99 {answer['latencyMs']['p99']} ms"
            )

    # -- W3 ---------------------------------------------------------------------------------

    W3_METRICS = [
        ("events/s", "↑"),
        ("lost/dup/reordered", ""),
        ("server CPU µs per event", "↓"),
        ("server CPU, %", ""),
        ("load generator CPU, %", ""),
        ("app CPU, %", ""),
    ]

    def w3(self) -> None:
        p = self.params
        label = f"W3 forwarding, {p.w3_conns:,} conns x {p.w3_messages} msgs"
        self.each_server("W3", label, self.W3_METRICS, lambda cls: self._w3(cls, label))

    #: Events one POST may carry in W3b (wsgw's --app-batch).
    W3B_BATCH = 50

    def w3b(self) -> None:
        """W3 with wsgw batching events (--app-batch 50); the peers play their W3 again."""
        p = self.params
        label = f"W3b forwarding in batches of {self.W3B_BATCH}, {p.w3_conns:,} conns x {p.w3_messages} msgs"

        def run(cls) -> None:
            if issubclass(cls, Wsgw):
                if not cls.supports("--app-batch"):
                    self.results.not_applicable(label, self.W3_METRICS, cls.name, "n/a (no --app-batch)")
                    return
                cls = type(cls.__name__, (cls,), {"extra_args": (*cls.extra_args, "--app-batch", str(self.W3B_BATCH))})
            self._w3(cls, label)

        self.each_server("W3", label, self.W3_METRICS, run)

    def _w3(self, server_cls, label: str) -> None:
        p, r = self.params, self.results
        with self.session(server_cls) as s:
            s.open("fwd", p.w3_conns, s.server.clients("W3"), p)
            s.settle()  # open events reach the app before the counting starts
            s.app.mode("count")
            meter = s.meter().start()
            answer = s.load.call(
                timeout=120,
                cmd="forward",
                group="fwd",
                messages=p.w3_messages,
                size=p.payload,
                appStats=s.app.base + "/stats",
                drainMs=60000,
            )
            cpu = meter.stop()
            self.note_saturation(label, server_cls.name, cpu)
            name = server_cls.name
            r.add(label, "events/s", name, answer["rate"], "↑", digits=0)
            r.add(label, "lost/dup/reordered", name, checks(answer))
            r.add(label, "server CPU µs per event", name, per_op(cpu, answer["received"]), "↓", digits=0)
            r.add(label, "server CPU, %", name, cpu["server_cpu_pct"], digits=0)
            r.add(label, "load generator CPU, %", name, cpu["loadgen_cpu_pct"], digits=0)
            r.add(label, "app CPU, %", name, cpu["app_cpu_pct"], digits=0)
            self.verify(label, name, answer)
            self.note_refusals(label, s)
            self.log(f"  {answer['received']}/{answer['expected']} events, {answer['rate']:.0f}/s")

    # -- W4 ---------------------------------------------------------------------------------

    W4_METRICS = [
        ("latency p50, ms", "↓"),
        ("latency p99, ms", "↓"),
        ("achieved msg/s", ""),
        ("lost/dup/reordered", ""),
        ("server CPU µs per round trip", "↓"),
        ("of which in the kernel (sys), %", ""),
        ("server CPU, %", "↓"),
        ("load generator + app CPU, %", ""),
    ]

    def w4(self) -> None:
        p = self.params
        label = f"W4 round trip, {p.w4_rate} msg/s for {p.w4_seconds:g}s"
        self.each_server("W4", label, self.W4_METRICS, lambda cls: self._w4(cls, label))

    def w4r(self) -> None:
        """W4 with the app's answer as an inline reply (wsgw only): no push API call."""
        p = self.params
        label = f"W4r round trip by inline reply, {p.w4_rate} msg/s for {p.w4_seconds:g}s"

        def run(cls) -> None:
            if not issubclass(cls, Wsgw) or not cls.supports("--app-batch"):  # replies came with batches
                self.results.not_applicable(label, self.W4_METRICS, cls.name, "n/a (no inline replies)")
                return
            self._w4(cls, label, mode="reply")

        self.each_server("W4", label, self.W4_METRICS, run)

    def _w4(self, server_cls, label: str, mode: str = "echo") -> None:
        p, r = self.params, self.results
        with self.session(server_cls) as s:
            s.open("rt", p.w4_conns, s.server.clients("W4"), p)
            s.settle()
            s.app.mode(mode)
            meter = s.meter().start()
            answer = s.load.call(
                timeout=p.w4_seconds + 60,
                cmd="roundtrip",
                group="rt",
                rate=p.w4_rate,
                seconds=p.w4_seconds,
                size=p.payload,
                drainMs=15000,
            )
            cpu = meter.stop()
            self.note_saturation(label, server_cls.name, cpu)
            name = server_cls.name
            r.add(label, "latency p50, ms", name, answer["latencyMs"]["p50"], "↓", digits=2)
            r.add(label, "latency p99, ms", name, answer["latencyMs"]["p99"], "↓", digits=2)
            r.add(label, "achieved msg/s", name, answer["received"] / p.w4_seconds, digits=0)
            r.add(label, "lost/dup/reordered", name, checks(answer))
            r.add(label, "server CPU µs per round trip", name, per_op(cpu, answer["received"]), "↓", digits=0)
            kernel = 100 * cpu["server_sys_s"] / cpu["server_cpu_s"] if cpu["server_cpu_s"] else None
            r.add(label, "of which in the kernel (sys), %", name, kernel, digits=0)
            r.add(label, "server CPU, %", name, cpu["server_cpu_pct"], "↓", digits=0)
            r.add(label, "load generator + app CPU, %", name, cpu["loadgen_cpu_pct"] + cpu["app_cpu_pct"], digits=0)
            self.verify(label, name, answer)
            self.note_refusals(label, s)
            self.log(
                f"  {answer['received']}/{answer['sent']} back, p50 {answer['latencyMs']['p50']} ms, "
                f"p99 {answer['latencyMs']['p99']} ms"
            )

    # -- W5 ---------------------------------------------------------------------------------

    W5_METRICS = [("µs per call, client-side", "↓"), ("server CPU µs per call", "↓")]

    def w5_targets(self) -> List[str]:
        return ["1 conn", f"1 user ({self.params.w5_user_conns} conns)"]

    @staticmethod
    def w5_label(target: str, others: int) -> str:
        return f"W5 send to {target}, {others:,} others open"

    def w5(self) -> None:
        """One session per server, growing the unrelated connections between measurements."""
        labels = [self.w5_label(t, bg) for bg in self.params.w5_background for t in self.w5_targets()]
        for server_cls in self.in_turn("W5"):
            if "W5" not in server_cls.workloads:
                for label in labels:
                    self.results.not_applicable(label, self.W5_METRICS, server_cls.name)
                continue
            self.log(f"W5: {server_cls.name}")
            started = time.monotonic()
            try:
                self._w5(server_cls)
            except Exception as e:  # keep the figures measured before the failure
                self.log(f"W5: {server_cls.name} failed: {e}\n{traceback.format_exc()}")
                for label in labels:
                    for metric, better in self.W5_METRICS:
                        if server_cls.name not in self._row_values(label, metric):
                            self.results.add(label, metric, server_cls.name, "error", better)
                self.results.fail(server_cls.name, f"W5, {server_cls.name}: {e}")
            self.log(f"W5: {server_cls.name} done in {time.monotonic() - started:.1f}s")
        self._w5_growth()

    def _row_values(self, label: str, metric: str) -> dict:
        for row in self.results.rows:
            if row.workload == label and row.metric == metric:
                return row.values
        return {}

    def _w5_calls(self, s: Session) -> List[tuple]:
        """(target, client group, API call) for one connection and for one user's connections."""
        payload = {"event": "bench", "data": "x" * max(0, self.params.payload - 30)}
        if isinstance(s.server, Wsgw):
            # An app addresses one connection by the conn_id it got in the open event.
            ids = s.server.conn_ids("w5one")
            if len(ids) != 1:
                raise RuntimeError(f"expected one connection of w5one, the list shows {ids}")
            url = f"http://127.0.0.1:{s.server.port}/tapr/ws/conn/send"
            one = {"url": url, "body": json.dumps({"payload": payload, "conn_id": ids[0]})}
        else:
            # The peers address a connection by a channel only it listens on.
            publisher = s.server.publisher("w5one")
            one = {"url": publisher["url"], "body": render(publisher["body"], payload)}
        publisher = s.server.publisher("w5user")
        user = {"url": publisher["url"], "body": render(publisher["body"], payload)}
        one_target, user_target = self.w5_targets()
        return [(one_target, "one", one), (user_target, "user", user)]

    def _w5(self, server_cls) -> None:
        p, r = self.params, self.results
        # The app only sees the opens (Pushpin needs it to accept a connection); the calls are the API's alone.
        with self.session(server_cls) as s:
            name = server_cls.name
            s.open("one", 1, s.server.clients_of_user("w5one"), p)
            s.open("user", p.w5_user_conns, s.server.clients_of_user("w5user"), p)
            calls = self._w5_calls(s)
            opened = 0
            for others in p.w5_background:
                s.open("bg", others - opened, s.server.clients("W5"), p)
                opened = others
                s.settle()
                for target, group, call in calls:
                    # As many calls unmeasured as measured: after 200 the first
                    # stretch still read 1.5-2x the next (the load generator's
                    # calls and the server's paths not yet warm, every server).
                    warm_up = p.w5_calls
                    s.load.call(timeout=60, cmd="apicalls", group=group, count=warm_up, drainMs=10000, **call)
                    meter = s.meter().start()
                    answer = s.load.call(
                        timeout=120 + p.w5_calls / 50,
                        cmd="apicalls",
                        group=group,
                        count=p.w5_calls,
                        drainMs=20000,
                        **call,
                    )
                    cpu_per_call = meter.stop()["server_cpu_s"] / p.w5_calls * 1e6
                    label = self.w5_label(target, others)
                    r.add(label, "µs per call, client-side", name, answer["meanMs"] * 1000, "↓", digits=0)
                    r.add(label, "server CPU µs per call", name, cpu_per_call, "↓", digits=0)
                    if answer["errors"] or answer["received"] != answer["expected"]:
                        r.fail(
                            name,
                            f"{label}, {name}: errors {answer['errors']}, received {answer['received']} "
                            f"of {answer['expected']}",
                        )
                    self.log(f"  {label}: {answer['meanMs'] * 1000:.0f} µs/call, server CPU {cpu_per_call:.0f} µs/call")
            self.note_refusals("W5", s)

    def _w5_growth(self) -> None:
        """Per target: the cost with the most unrelated connections over that with the fewest."""
        low, high = self.params.w5_background[0], self.params.w5_background[-1]
        for target in self.w5_targets():
            label = f"W5 send to {target}: growth"
            for metric, what in (("µs per call, client-side", "time"), ("server CPU µs per call", "server CPU")):
                small = self._row_values(self.w5_label(target, low), metric)
                large = self._row_values(self.w5_label(target, high), metric)
                for server_cls in self.servers:
                    a, b = small.get(server_cls.name), large.get(server_cls.name)
                    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                        value = b / a
                    else:
                        value = NA if a in (None, NA) else "–"
                    self.results.add(
                        label,
                        f"{what} at {high:,} ÷ at {low:,} others",
                        server_cls.name,
                        value,
                        "↓",
                        digits=2,
                        derived=True,
                    )

    # -- W6 ---------------------------------------------------------------------------------

    W6_METRICS = [
        ("all reconnected after a restart, s", "↓"),
        ("app has every open event again, s", "↓"),
        ("handshakes refused while reconnecting", ""),
        ("open/close events lost", ""),
    ]

    def w6(self) -> None:
        p = self.params
        label = f"W6 reconnect storm, {p.w6_conns:,} clients, server restarted"
        self.each_server("W6", label, self.W6_METRICS, lambda cls: self._w6(cls, label))

    def _w6(self, server_cls, label: str) -> None:
        """
        N clients connected; the server is stopped (SIGTERM) and started
        again on its port; every client reconnects after 0-1 s of jitter and
        retries while it is refused.  Timed from the first client closed.
        """
        p, r = self.params, self.results
        with self.session(server_cls) as s:
            spec = s.server.clients("W1")
            s.open("storm", p.w6_conns, spec, p)
            s.settle()
            s.load.call(timeout=30, cmd="stormArm", group="storm", jitterMs=1000, **spec)
            s.server.stop()
            s.server.start(s.app.base if s.app else None)
            answer = s.load.call(timeout=180, cmd="stormWait", group="storm", timeoutMs=150000)
            name = server_cls.name
            seconds = answer["seconds"]
            app_seconds: Any = NA
            lost: Any = NA
            if s.app is not None and issubclass(server_cls, Wsgw):
                # Every open (before and after) and every close of the first connections.
                expected_open, expected_close = 2 * p.w6_conns, p.w6_conns
                deadline = time.monotonic() + 60
                stats = s.app.stats()
                while (
                    stats["open"] < expected_open or stats["close"] < expected_close
                ) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    stats = s.app.stats()
                if stats["open"] >= expected_open:
                    app_seconds = time.time() - answer["firstCloseAt"] / 1000
                lost = f"{max(0, expected_open - stats['open'])}/{max(0, expected_close - stats['close'])}"
            r.add(label, "all reconnected after a restart, s", name, seconds, "↓", digits=2)
            r.add(label, "app has every open event again, s", name, app_seconds, "↓", digits=2)
            r.add(label, "handshakes refused while reconnecting", name, answer["refused"])
            r.add(label, "open/close events lost", name, lost)
            if answer["back"] != answer["count"]:
                r.fail(name, f"{label}, {name}: only {answer['back']} of {answer['count']} reconnected")
            self.log(f"  {answer['back']}/{answer['count']} back in {seconds} s, errors {answer['errors']}")

    ALL = ("W1", "W1C", "W2", "W3", "W3B", "W4", "W4R", "W5", "W6")

    def run(self, only: Sequence[str] = ALL) -> None:
        both = "W1" in only and "W1C" in only
        for name in self.ALL:
            if both and name == "W1":
                continue  # run with W1c, size by size
            if both and name == "W1C":
                # Size by size, W1 then W1c: the two figures a ratio is made
                # of are taken minutes apart at most, under the same load.
                for n in self.params.w1_sizes:
                    self.w1([n])
                    self.w1c([n])
            elif name in only:
                getattr(self, name.lower())()
