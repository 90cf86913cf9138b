"""
python -m bench.cluster: broadcast fan-out with the cluster engine.

1,000 connections of one user, spread evenly over 1, 2 and 3 wsgw nodes
sharing a private redis-server (--engine redis), receive 200 publishes of
~100 bytes sent to node 1's /tapr/ws/conn/send with "users"; the same run
measures one node with the in-memory engine as the reference.  Reported:
deliveries/s, publish-to-receipt latency p50/p99, lost/duplicated/reordered
per connection, and the CPU of the nodes and Redis together.

    python -m bench.cluster                 # the full run, about 2 minutes
    python -m bench.cluster --quick         # 60 connections, 20 messages
    python -m bench.cluster --out bench/CLUSTER.md

Every node, and Redis, is pinned to the server core; the load generator to
the other.  So this measures what the cluster costs on the same hardware,
not how it scales across machines.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from . import loadgen, procs, report
from .__main__ import log, pin_cores
from .peers import Wsgw, _dpkg_version
from .workloads import checks

SETUPS = [("memory", 1), ("redis", 1), ("redis", 2), ("redis", 3)]


def label(engine: str, nodes: int) -> str:
    return f"{engine}, {nodes} node{'s' if nodes > 1 else ''}"


class ClusterRun:
    """Redis (for the redis engine) and C{nodes} wsgw processes, stopped by PID on exit."""

    def __init__(self, engine: str, nodes: int, workdir: Path, ports: procs.Ports):
        self.engine, self.count, self.workdir, self.ports = engine, nodes, workdir, ports
        self.redis = None
        self.nodes: List[Wsgw] = []

    def __enter__(self) -> ClusterRun:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        extra: List[str] = []
        if self.engine == "redis":
            redis_port = self.ports.take()
            self.redis = procs.spawn(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                procs.SERVER_CORE,
                self.workdir / "redis.log",
            )
            extra = ["--engine", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
        for i in range(self.count):
            node = Wsgw(self.workdir / f"node{i + 1}", self.ports)
            node.workdir.mkdir()
            node.extra_args = ["--node-id", f"bench-{i + 1}", *extra]
            self.nodes.append(node)
            node.start(None)
            if self.engine == "redis":
                wait_redis_up(node.port)

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
        procs.stop(self.redis)

    def roots(self) -> Dict[str, int]:
        roots = {f"node{i}": node.pid for i, node in enumerate(self.nodes)}
        if self.redis is not None:
            roots["redis"] = self.redis.pid
        return roots


def wait_redis_up(port: int, timeout: float = 20.0) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            if json.load(answer).get("redis") == "up":
                return
        time.sleep(0.1)
    raise RuntimeError(f"node on {port} did not reach redis within {timeout}s")


def fan_out(run: ClusterRun, conns: int, messages: int, load: loadgen.LoadGen) -> dict:
    per_node = [conns // run.count + (1 if i < conns % run.count else 0) for i in range(run.count)]
    for port, count in zip((node.port for node in run.nodes), per_node):
        answer = load.call(
            timeout=60 + count / 20,
            cmd="open",
            group="fan",
            count=count,
            concurrency=100,
            retries=3,
            url=f"ws://127.0.0.1:{port}/ws",
            headers={"X-Bfl-User": "bench"},
            timeoutMs=int((50 + count / 25) * 1000),
        )
        if answer["opened"] != count:
            raise RuntimeError(f"{count - answer['opened']} of {count} handshakes failed: {answer['errors']}")
    time.sleep(1.0)  # let the open bursts settle before measuring
    meter = procs.CpuMeter({**run.roots(), "loadgen": load.pid}).start()
    answer = load.call(
        timeout=120 + messages,
        cmd="fanout",
        group="fan",
        messages=messages,
        size=100,
        drainMs=60000,
        publish={
            "url": f"http://127.0.0.1:{run.nodes[0].port}/tapr/ws/conn/send",
            "body": '{"payload":@JSON@,"users":["bench"]}',
        },
    )
    cpu = meter.stop()
    answer["server_cpu_pct"] = sum(v for k, v in cpu.items() if k.endswith("_cpu_pct") and k != "loadgen_cpu_pct")
    answer["loadgen_cpu_pct"] = cpu["loadgen_cpu_pct"]
    return answer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 60 connections, 20 messages")
    parser.add_argument("--out", type=Path, help="write the Markdown results here too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    if not shutil.which("redis-server"):
        print("redis-server is needed: apt-get install -y redis-server", file=sys.stderr)
        return 2
    conns, messages = (60, 20) if args.quick else (1000, 200)
    loadgen.ensure_node_modules()
    procs.raise_nofile(65536)
    pin_cores()
    workdir = Path(tempfile.mkdtemp(prefix="wsgw-bench-cluster-"))
    ports = procs.Ports()
    started = time.monotonic()
    figures: Dict[str, dict] = {}
    failures: List[str] = []
    try:
        for engine, nodes in SETUPS:
            name = label(engine, nodes)
            log(f"{name}: {conns} connections x {messages} messages")
            with ClusterRun(engine, nodes, workdir / name.replace(", ", "-").replace(" ", ""), ports) as run:
                load = loadgen.LoadGen(run.workdir / "loadgen.log")
                try:
                    answer = fan_out(run, conns, messages, load)
                finally:
                    load.stop()
            figures[name] = answer
            if answer["lost"] or answer["dup"] or answer["reordered"] or answer["publishErrors"]:
                failures.append(
                    f"{name}: lost/dup/reordered {checks(answer)}, publish errors {answer['publishErrors']}"
                )
            log(
                f"  {answer['rate']:.0f} deliveries/s, p50 {answer['latencyMs']['p50']} ms, "
                f"p99 {answer['latencyMs']['p99']} ms, {checks(answer)}"
            )
    finally:
        if args.keep or failures:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    reference = figures.get(label("memory", 1), {})
    lines = [
        "| setup | deliveries/s ↑ | ÷ memory, 1 node | latency p50, ms ↓ | latency p99, ms ↓ | p99 ÷ memory | "
        "lost/dup/reordered | nodes + Redis CPU, % | load generator CPU, % |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, answer in figures.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    report.fmt(answer["rate"], 0),
                    report.ratio(answer["rate"], reference.get("rate")),
                    report.fmt(answer["latencyMs"]["p50"]),
                    report.fmt(answer["latencyMs"]["p99"]),
                    report.ratio(answer["latencyMs"]["p99"], reference.get("latencyMs", {}).get("p99")),
                    checks(answer),
                    report.fmt(answer["server_cpu_pct"], 0),
                    report.fmt(answer["loadgen_cpu_pct"], 0),
                ]
            )
            + " |"
        )
    document = "\n".join(
        [
            "# wsgw cluster fan-out",
            "",
            f"- Machine: {report.machine()}",
            f"- wsgw {Wsgw.version()}; redis-server {_dpkg_version('redis-server')}",
            f"- {conns:,} connections of one user spread evenly over the nodes, {messages} publishes of ~100 bytes "
            f"to node 1's /tapr/ws/conn/send with users; took {(time.monotonic() - started) / 60:.1f} min.",
            f"- Nodes and Redis pinned to core {procs.SERVER_CORE}, the load generator to core {procs.LOAD_CORE}: "
            "this measures what the cluster engine costs on one core, not scaling across machines.",
            "",
            *lines,
            "",
            *(["Checks that failed:", "", *[f"- {f}" for f in failures], ""] if failures else []),
        ]
    )
    print(document)
    if args.out:
        args.out.write_text(document)
        log(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
