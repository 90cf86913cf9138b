"""
The servers under test: wsgw itself and two real peers from Debian's
packages, each started from a private configuration in a temporary folder,
listening on loopback only, pinned to the server core, and stopped by PID.
The system services the packages ship are never used.

  - Pushpin, in WebSocket-over-HTTP mode (GRIP): it forwards each client's
    events to the app as HTTP POSTs and the app publishes through Pushpin's
    HTTP publish endpoint.  That is wsgw's own shape.
  - nchan (an nginx module): WebSocket subscribers and an HTTP publisher; its
    "publisher upstream request" forwards a client's messages to the app over
    HTTP, and its client heartbeat answers application-level pings, so it can
    play every workload but W5's per-user targeting.

Each server says how a workload's clients connect (L{Server.clients}) and how
the app or the publisher pushes to them (L{Server.publisher}); the workloads
know nothing server-specific.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import procs

PING = '{"event":"ping"}'
PONG = '{"event":"pong"}'
#: The heartbeat the clients keep up, as the platform's front ends do.
HEARTBEAT = {"interval": 30000, "text": PING, "pong": PONG}

PEER_PACKAGES = ["pushpin", "nginx", "libnginx-mod-nchan"]
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


class Server:
    """One server under test, started fresh for each workload."""

    name = "server"
    #: Workloads it can play; the others show "n/a".
    workloads = ("W1", "W2", "W3", "W4", "W5", "W6")

    def __init__(self, workdir: Path, ports: procs.Ports):
        self.workdir = workdir
        self.ports = ports
        self.proc: Optional[subprocess.Popen] = None
        self.port = ports.take()

    # -- lifecycle --------------------------------------------------------------

    def start(self, app_url: Optional[str]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        procs.stop(self.proc)
        self.proc = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> List[int]:
        """Every process of this server now: memory is summed over them."""
        return procs.tree(self.proc.pid) if self.proc else []

    def app_endpoints(self) -> Dict[str, str]:
        """Where the app pushes to (passed to node/app.js)."""
        return {}

    # -- what the workloads ask ----------------------------------------------------

    def clients(self, workload: str) -> Dict:
        """How W1-W5's clients connect: a URL and headers, {i} the client's number."""
        raise NotImplementedError

    def publisher(self, target: str) -> Dict:
        """How to push one payload to a named target (a user / a channel): url and body template."""
        raise NotImplementedError

    @staticmethod
    def installed() -> Optional[str]:
        """None when the server can run here, else why not."""
        return None

    @staticmethod
    def version() -> str:
        return ""


def _dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


class Wsgw(Server):
    """wsgw as it is deployed: `twist wsgw`, one process, default settings."""

    name = "wsgw"
    #: More options for `twist wsgw` (the cluster benchmark's engine settings).
    extra_args: Sequence[str] = ()
    #: A checkout of another commit to run instead of the wsgw this runner
    #: imports (see L{baseline}).
    source: Optional[Path] = None
    #: The interpreter to run it with (see L{under}); this runner's by default.
    python: Optional[str] = None
    #: Words put before the interpreter (C{--server-prefix}, e.g. valgrind),
    #: and how long the daemon may take to answer once started.
    prefix: Sequence[str] = ()
    start_timeout: float = 30.0
    #: The app's path that admits handshakes (C{--connect-url}, W1c); None: no hook.
    connect_path: Optional[str] = None

    def start(self, app_url: Optional[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_"))}
        # The daemon runs the wsgw this runner imports, installed or not,
        # or the baseline's checkout.
        import wsgw

        source = self.source or Path(wsgw.__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join([str(source)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        argv = [
            *self.prefix,
            self.python or sys.executable,
            "-m",
            "twisted",
            "--log-format=text",
            "wsgw",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            # Limits are not what is measured: W2 puts 1,000 connections on one user.
            "--max-connections-per-user",
            "0",
            "--max-connections",
            "0",
        ]
        if app_url:
            argv += ["--app-url", app_url + "/wsgw"]
            if self.connect_path:
                argv += ["--connect-url", app_url + self.connect_path]
        argv += list(self.extra_args)
        # From the source's folder: `python -m` puts the working directory
        # first on sys.path, ahead of PYTHONPATH.
        self.proc = procs.spawn(argv, procs.SERVER_CORE, self.workdir / "wsgw.log", env=env, cwd=str(source))
        procs.wait_http(f"http://127.0.0.1:{self.port}/tapr/ws/conn/list", self.start_timeout, self.proc)

    def app_endpoints(self) -> Dict[str, str]:
        return {"wsgwSend": f"http://127.0.0.1:{self.port}/tapr/ws/conn/send"}

    @classmethod
    def supports(cls, option: str) -> bool:
        """This wsgw (a baseline may be older) knows C{option}."""
        import wsgw

        source = cls.source or Path(wsgw.__file__).resolve().parent.parent
        out = subprocess.run(
            [cls.python or sys.executable, "-m", "twisted", "wsgw", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(source),
            env={**os.environ, "PYTHONPATH": str(source)},
        )
        return option in out.stdout

    def clients(self, workload: str) -> Dict:
        # W2 puts every connection on user "bench"; the others give each its own user.
        user = "bench" if workload == "W2" else f"{workload.lower()}-{{i}}"
        return {"url": f"ws://127.0.0.1:{self.port}/ws", "headers": {"X-Bfl-User": user}}

    def clients_of_user(self, user: str) -> Dict:
        return {"url": f"ws://127.0.0.1:{self.port}/ws", "headers": {"X-Bfl-User": user}}

    def publisher(self, target: str) -> Dict:
        return {
            "url": f"http://127.0.0.1:{self.port}/tapr/ws/conn/send",
            "body": '{"payload":@JSON@,"users":[%s]}' % json.dumps(target),
        }

    def conn_ids(self, user: str) -> List[str]:
        """The connection ids of one user, from the list API (what an app would keep from open events)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/tapr/ws/conn/list", timeout=30) as answer:
            listing = json.load(answer)["data"]
        for entry in listing:
            if entry["name"] == user:
                return [c["id"] for c in entry["conns"] + entry["public_conns"]]
        return []

    @staticmethod
    def version() -> str:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent.parent,
            )
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", "wsgw"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent.parent,
            )
            return out.stdout.strip() + (" + uncommitted changes in wsgw/" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            return ""


class Pushpin(Server):
    """
    Pushpin's runner with its four services (condure, zurl, pushpin-proxy,
    pushpin-handler), routing every path to the app with `over_http`
    (WebSocket-over-HTTP).  ZeroMQ sockets are IPC files in the temporary
    folder or TCP ports from the benchmark's range.
    """

    name = "pushpin"

    def __init__(self, workdir: Path, ports: procs.Ports):
        super().__init__(workdir, ports)
        self.publish_port = ports.take()
        self.zmq_ports = [ports.take() for _ in range(3)]

    def start(self, app_url: Optional[str]) -> None:
        run, logs = self.workdir / "pushpin-run", self.workdir / "pushpin-log"
        run.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        app = app_url.split("//", 1)[1] if app_url else "127.0.0.1:9"
        (self.workdir / "routes").write_text(f"* {app},over_http\n")
        push_in, push_sub, command = self.zmq_ports
        config = textwrap.dedent(f"""\
            [global]
            include={{libdir}}/internal.conf
            rundir={run}
            ipc_prefix=bench-
            port_offset=0
            stats_connection_ttl=120

            [runner]
            services=condure,zurl,pushpin-proxy,pushpin-handler
            http_port=127.0.0.1:{self.port}
            logdir={logs}
            log_level=2
            client_buffer_size=8192
            client_maxconn=50000
            condure_bin=condure
            zurl_bin=zurl

            [proxy]
            routesfile=routes
            debug=false
            auto_cross_origin=false
            sig_iss=pushpin
            sig_key=bench-not-secret
            updates_check=off
            # The package's internal.conf expects a system zurl under /var/run;
            # ours is the runner's own, in the private run folder.
            zurl_out_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in
            zurl_out_stream_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in-stream
            zurl_in_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-out

            [handler]
            push_in_spec=tcp://127.0.0.1:{push_in}
            push_in_sub_specs=tcp://127.0.0.1:{push_sub}
            push_in_http_addr=127.0.0.1
            push_in_http_port={self.publish_port}
            stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
            command_spec=tcp://127.0.0.1:{command}
            connection_subscription_max=20
            """)
        path = self.workdir / "pushpin.conf"
        path.write_text(config)
        self.proc = procs.spawn(["pushpin", "--config", str(path)], procs.SERVER_CORE, self.workdir / "pushpin.log")
        # Both listeners up: the client port (condure; any HTTP answer will do) and the publish endpoint.
        procs.wait_http(f"http://127.0.0.1:{self.port}/", 30, self.proc, accept=range(100, 600))
        procs.wait_http(f"http://127.0.0.1:{self.publish_port}/", 30, self.proc, accept=range(100, 600))

    def app_endpoints(self) -> Dict[str, str]:
        return {"pushpinPublish": f"http://127.0.0.1:{self.publish_port}/publish/"}

    def clients(self, workload: str) -> Dict:
        # The app subscribes each connection to ?ch=..., else to its own conn-<Connection-Id>.
        query = "?ch=bench" if workload == "W2" else ""
        return {"url": f"ws://127.0.0.1:{self.port}/pushpin/{workload.lower()}{query}", "headers": {}}

    def clients_of_user(self, user: str) -> Dict:
        return {"url": f"ws://127.0.0.1:{self.port}/pushpin/w5?ch={user}", "headers": {}}

    def publisher(self, target: str) -> Dict:
        item = '{"channel":%s,"formats":{"ws-message":{"content":@STR@}}}' % json.dumps(target)
        return {"url": f"http://127.0.0.1:{self.publish_port}/publish/", "body": '{"items":[%s]}' % item}

    @staticmethod
    def installed() -> Optional[str]:
        missing = [b for b in ("pushpin", "condure", "zurl", "pushpin-proxy", "pushpin-handler") if not shutil.which(b)]
        return f"not installed ({', '.join(missing)} missing)" if missing else None

    @staticmethod
    def version() -> str:
        return "pushpin " + _dpkg_version("pushpin")


class Nchan(Server):
    """
    nginx with the nchan module, one worker process (the server core is one
    core), from a private nginx.conf; no access log.  Locations:

      /sub/ID     WebSocket subscriber of channel ID (W2);
      /idle/ID    WebSocket pub/sub with nchan's client heartbeat (W1): the
                  ping text is answered with the pong text, as wsgw does;
      /pubsub/ID  WebSocket pub/sub whose messages go to the app first
                  (nchan_publisher_upstream_request); the app answers 204 so
                  nchan publishes nothing itself (W3, W4);
      /pub?id=ID  the HTTP publisher.
    """

    name = "nchan"
    workloads = ("W1", "W2", "W3", "W4", "W5", "W6")

    def start(self, app_url: Optional[str]) -> None:
        root = self.workdir / "nginx"
        root.mkdir(exist_ok=True)
        app = app_url.split("//", 1)[1] if app_url else "127.0.0.1:9"
        heartbeat = f"nchan_websocket_client_heartbeat '{PING}' '{PONG}';"
        # The worker may only raise its open-file limit as far as ours goes.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        config = textwrap.dedent(f"""\
            load_module {NCHAN_MODULE};
            daemon off;
            master_process on;
            worker_processes 1;
            pid {root}/nginx.pid;
            error_log {root}/error.log warn;
            worker_rlimit_nofile {nofile};
            events {{ worker_connections {max(1024, nofile - 100)}; }}
            http {{
              access_log off;
              client_body_temp_path {root}/body;
              proxy_temp_path {root}/proxy;
              fastcgi_temp_path {root}/fastcgi;
              uwsgi_temp_path {root}/uwsgi;
              scgi_temp_path {root}/scgi;
              upstream app {{ server {app}; keepalive 64; }}
              server {{
                listen 127.0.0.1:{self.port} backlog=4096;
                location = /pub {{ nchan_publisher http; nchan_channel_id $arg_id; }}
                location ~ ^/sub/(\\w+)$ {{
                  nchan_subscriber websocket; nchan_channel_id $1; nchan_subscriber_first_message newest;
                }}
                location ~ ^/idle/(\\w+)$ {{
                  nchan_pubsub websocket; nchan_channel_id $1; nchan_subscriber_first_message newest; {heartbeat}
                }}
                location ~ ^/pubsub/(\\w+)$ {{
                  nchan_pubsub websocket; nchan_channel_id $1; nchan_subscriber_first_message newest; {heartbeat}
                  nchan_publisher_upstream_request /upstream;
                }}
                location = /upstream {{
                  internal;
                  proxy_pass http://app/nchan;
                  proxy_http_version 1.1;
                  proxy_set_header Connection "";
                }}
                location = /ready {{ return 200; }}
              }}
            }}
            """)
        path = root / "nginx.conf"
        path.write_text(config)
        argv = ["nginx", "-p", str(root), "-e", str(root / "error.log"), "-c", str(path)]
        self.proc = procs.spawn(argv, procs.SERVER_CORE, self.workdir / "nginx.log")
        procs.wait_http(f"http://127.0.0.1:{self.port}/ready", 30, self.proc)

    def stop(self) -> None:
        # SIGQUIT: nginx's graceful shutdown; the master then stops its worker.
        import signal

        procs.stop(self.proc, sig=signal.SIGQUIT)
        self.proc = None

    def app_endpoints(self) -> Dict[str, str]:
        return {"nchanPublish": f"http://127.0.0.1:{self.port}/pub"}

    def clients(self, workload: str) -> Dict:
        # A channel per connection (c{i}: the app answers client i there), W2's all on one.
        path = {"W1": "idle/c{i}", "W2": "sub/bench", "W5": "sub/o{i}"}.get(workload, "pubsub/c{i}")
        return {"url": f"ws://127.0.0.1:{self.port}/{path}", "headers": {}}

    def clients_of_user(self, user: str) -> Dict:
        return {"url": f"ws://127.0.0.1:{self.port}/sub/{user}", "headers": {}}

    def publisher(self, target: str) -> Dict:
        return {"url": f"http://127.0.0.1:{self.port}/pub?id={target}", "body": "@RAW@"}

    @staticmethod
    def installed() -> Optional[str]:
        if not shutil.which("nginx"):
            return "not installed (nginx missing)"
        if not NCHAN_MODULE.exists():
            return f"not installed ({NCHAN_MODULE} missing)"
        return None

    @staticmethod
    def version() -> str:
        return f"nginx {_dpkg_version('nginx')}, nchan {_dpkg_version('libnginx-mod-nchan')}"


SERVERS = {"wsgw": Wsgw, "pushpin": Pushpin, "nchan": Nchan}


def baseline(rev: str, workdir: Path) -> type:
    """
    wsgw at commit C{rev}, checked out (a detached git worktree) under
    C{workdir}, as a server of its own: run beside the working tree in the
    same run, its figures make same-run ratios ("twice as cheap as before").
    Its dependencies are this runner's.
    """
    top = Path(__file__).resolve().parent.parent
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], capture_output=True, text=True, check=True, cwd=top, timeout=30
    ).stdout.strip()
    checkout = workdir / f"baseline-{short}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(checkout), rev],
        capture_output=True,
        check=True,
        cwd=top,
        timeout=120,
    )
    return type(
        "WsgwBaseline", (Wsgw,), {"name": f"wsgw@{short}", "source": checkout, "version": staticmethod(lambda: short)}
    )


def under(python: str, name: str = "wsgw-pypy") -> type:
    """
    The working tree's wsgw run by another interpreter (PyPy), which must
    have wsgw's dependencies installed.
    """
    found = shutil.which(python) or python
    out = subprocess.run(
        [found, "-c", "import sys, twisted, autobahn; print(sys.version.split()[0], sys.implementation.name)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot run wsgw: {out.stderr.strip().splitlines()[-1:]}")
    version = out.stdout.strip()
    return type("WsgwUnder", (Wsgw,), {"name": name, "python": found, "version": staticmethod(lambda: version)})


def remove_baseline(cls: type) -> None:
    """Take the baseline's worktree away again."""
    top = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "worktree", "remove", "--force", str(cls.source)], capture_output=True, cwd=top, timeout=60)


def _running(name: str) -> List[int]:
    """PIDs of processes whose command name is C{name} (to spot a service the install started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def install_peers(log) -> None:
    """
    apt-get install the peers.  Debian starts a package's service on install;
    any service that was not running before and runs after is stopped again,
    through its own unit (systemctl, else its init script), since we started it.
    """
    services = {"pushpin": "pushpin", "nginx": "nginx"}
    before = {unit: bool(_running(comm)) for unit, comm in services.items()}
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"apt-get install -y {' '.join(PEER_PACKAGES)}")
    # Its output goes to stderr: stdout carries the results table alone.
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *PEER_PACKAGES], env=env, check=True, timeout=900, stdout=sys.stderr
    )
    for unit, comm in services.items():
        if before[unit] or not _running(comm):
            continue
        log(f"the install started the {unit} service; stopping it")
        if shutil.which("systemctl") and Path("/run/systemd/system").exists():
            subprocess.run(["systemctl", "stop", unit], timeout=60)
        elif Path(f"/etc/init.d/{unit}").exists():
            subprocess.run([f"/etc/init.d/{unit}", "stop"], timeout=60)
