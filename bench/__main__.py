"""
python -m bench: run the side-by-side benchmark and print its table.

    python -m bench --quick                      smoke run, wsgw only (about a minute)
    python -m bench --peers --out bench/RESULTS.md
    python -m bench --install-peers --peers --out bench/RESULTS.md

Run it with a Python that can import wsgw (the gateway is started as
`python -m twisted wsgw` with that same interpreter).  Node.js and npm must be
installed; the `ws` library is installed into bench/node by `npm ci` when
missing.  The peers need root only to be installed (apt-get).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import loadgen, peers, procs, report
from .workloads import FULL, QUICK, Runner


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, a few seconds per workload")
    parser.add_argument("--peers", action="store_true", help="also run Pushpin and nchan (they must be installed)")
    parser.add_argument(
        "--install-peers", action="store_true", help="apt-get install -y pushpin nginx libnginx-mod-nchan first"
    )
    parser.add_argument("--out", type=Path, help="write the Markdown results here too")
    parser.add_argument(
        "--servers", help="comma-separated servers to run, e.g. wsgw,nchan (default: wsgw; with --peers all three)"
    )
    parser.add_argument(
        "--only", default="W1,W1c,W2,W3,W3b,W4,W4r,W5,W6", help="comma-separated workloads to run (default: all)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs and logs)")
    parser.add_argument(
        "--w1-sizes", metavar="N,N", help="W1 connection counts to run instead of the mode's (e.g. 10000)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run wsgw at this commit (a git worktree), beside the working tree, for same-run ratios",
    )
    parser.add_argument(
        "--pypy",
        metavar="PYTHON",
        help="also run the working tree under this interpreter (a PyPy with wsgw's dependencies), as wsgw-pypy",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample wsgw with py-spy during each measured stretch; raw stacks go to DIR",
    )
    parser.add_argument(
        "--attach",
        metavar="CMD",
        help="with --profile: run CMD instead of py-spy over each measured stretch; {pid} is wsgw's, "
        "{out} the stretch's file in DIR (e.g. 'perf stat -e task-clock,context-switches -p {pid}')",
    )
    parser.add_argument(
        "--server-prefix",
        metavar="CMD",
        help="start wsgw (and a baseline) under CMD, e.g. 'valgrind --tool=callgrind --instr-atstart=no'",
    )
    parser.add_argument(
        "--wsgw-args",
        metavar="ARGS",
        help="more options for every wsgw started (e.g. '--connect-timeout 30' under valgrind)",
    )
    parser.add_argument("--w4-rate", type=int, metavar="N", help="W4/W4r's offered messages/s instead of the mode's")
    parser.add_argument("--w4-seconds", type=float, metavar="S", help="W4/W4r's duration instead of the mode's")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the workloads N times, the servers' turns going on, and report each figure's median",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give 1 or more")
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pin_cores() -> None:
    """
    Server on core 0, load on core 1; on a single core everything shares it
    (and the figures say less).  The runner itself sits with the load.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        procs.SERVER_CORE = procs.LOAD_CORE = cores[0]
        log("only one core: server and load share it")
    else:
        procs.SERVER_CORE, procs.LOAD_CORE = cores[0], cores[1]
    os.sched_setaffinity(0, {procs.LOAD_CORE})


def main(argv=None) -> int:
    args = parse(argv)
    if importlib.util.find_spec("wsgw") is None:
        print("wsgw is not importable by this Python; run with the one wsgw is installed in", file=sys.stderr)
        return 2
    if not shutil.which("taskset"):
        print("taskset (util-linux) is needed to pin processes to cores", file=sys.stderr)
        return 2

    if args.install_peers:
        peers.install_peers(log)
    if args.servers:
        names = [n.strip() for n in args.servers.split(",") if n.strip()]
        unknown = [n for n in names if n not in peers.SERVERS]
        if unknown:
            print(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(peers.SERVERS)}", file=sys.stderr)
            return 2
        servers = [peers.SERVERS[n] for n in names]
    else:
        servers = [peers.Wsgw] + ([peers.Pushpin, peers.Nchan] if args.peers else [])
    for cls in servers:
        why = cls.installed()
        if why:
            print(f"{cls.name} is {why}; add --install-peers", file=sys.stderr)
            return 2

    loadgen.ensure_node_modules()
    limit = procs.raise_nofile(65536)
    params = QUICK if args.quick else FULL
    if args.w1_sizes:
        params = dataclasses.replace(params, w1_sizes=tuple(int(n) for n in args.w1_sizes.split(",") if n.strip()))
    if args.w4_rate:
        params = dataclasses.replace(params, w4_rate=args.w4_rate)
    if args.w4_seconds:
        params = dataclasses.replace(params, w4_seconds=args.w4_seconds)
    if args.attach and not args.profile:
        print("--attach needs --profile DIR (where its output goes)", file=sys.stderr)
        return 2
    if args.server_prefix:
        peers.Wsgw.prefix = tuple(shlex.split(args.server_prefix))
        peers.Wsgw.start_timeout = 300.0  # an interpreter under valgrind starts slowly
    if args.wsgw_args:
        peers.Wsgw.extra_args = tuple(shlex.split(args.wsgw_args))
    # Each process (server, load generator) holds one descriptor per connection.
    if limit < max(max(params.w1_sizes), max(params.w5_background) + 100) + 1000:
        log(f"open-file limit is {limit}: the largest runs may fail")
    pin_cores()

    only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="wsgw-bench-"))
    base = None
    if args.baseline:
        base = peers.baseline(args.baseline, workdir)
        servers.insert(1, base)
    if args.pypy:
        servers.insert(1, peers.under(args.pypy))
    results = report.Results([cls.name for cls in servers])
    names = ", ".join(c.name for c in servers)
    log(f"mode {'quick' if args.quick else 'full'}, servers {names}, work folder {workdir}")
    started = time.monotonic()
    try:
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            if not args.attach:
                procs.py_spy()  # fail now, not in the middle of a run
        runner = Runner(params, servers, workdir, results, log, args.profile, args.attach)
        for turn in range(args.repeat):
            if args.repeat > 1:
                log(f"run {turn + 1} of {args.repeat}")
            runner.run(only)
    finally:
        if base is not None:
            peers.remove_baseline(base)
        if args.keep or results.failures:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60

    preamble = [
        f"Machine: {report.machine()}",
        "Servers: " + "; ".join(f"{cls.name} {cls.version()}".strip() for cls in servers),
        f"Mode: {'quick (smoke)' if args.quick else 'full'}; took {minutes:.1f} min. "
        f"Server pinned to core {procs.SERVER_CORE}; load generator and app to core {procs.LOAD_CORE}.",
        "↑ higher is better, ↓ lower is better; wsgw/peer is wsgw's figure over the peer's. "
        "CPU % is of one core. RSS per connection: the RSS of all the server's processes after the handshakes "
        "minus before, over the connections then open. Each workload runs on a fresh instance of each server; "
        "the servers take turns at going first, one workload to the next (the first measured reads high)."
        + (f" Each figure is the median of {args.repeat} runs." if args.repeat > 1 else ""),
    ]
    document = report.document(results, "wsgw benchmark", preamble)
    print(document)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document)
        log(f"wrote {args.out}")
    # A peer's failed checks are findings about that peer, reported in the
    # table; the run itself fails when wsgw's do.
    return 1 if "wsgw" in results.failed_servers else 0


if __name__ == "__main__":
    sys.exit(main())
