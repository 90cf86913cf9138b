"""
Processes of the benchmark: start them pinned to a core, find a server's
whole process tree, read its memory and CPU from /proc, and stop exactly the
processes we started, by PID.

Servers under test run on core 0 and everything that makes load (the Node
load generator and the app) on core 1, so the server's figures are not
inflated or starved by the load it is measured under.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

SERVER_CORE = 0
LOAD_CORE = 1

#: Listening ports come from here: below Linux's ephemeral range
#: (32768-60999), so no client socket of the benchmark can already hold one.
PORT_RANGE = (20000, 29999)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def pinned(core: int, argv: Sequence[str]) -> List[str]:
    """C{argv} run on one CPU core (taskset execs it: the PID is the program's)."""
    return ["taskset", "-c", str(core), *argv]


def spawn(argv: Sequence[str], core: int, log: Path, env=None, cwd=None, pipes=False) -> subprocess.Popen:
    """
    Start C{argv} on C{core} in its own session (a Ctrl-C at the terminal
    reaches only the runner, which then stops it by PID).  Output goes to
    C{log} unless C{pipes} asks for stdin/stdout pipes (stderr still to C{log}).
    """
    with open(log, "ab") as out:  # closed here: the child has its own copy
        return subprocess.Popen(
            pinned(core, argv),
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat fields after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> Optional[str]:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22: start time since boot


def tree(pid: int) -> List[int]:
    """C{pid} and all its descendants, alive now."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _stat(p) is None:
            continue
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of the resident set sizes of C{pids} (VmRSS), in bytes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of C{pids} so far, in seconds."""
    return sum(cpu_split(pids))


def cpu_split(pids: Iterable[int]) -> Tuple[float, float]:
    """User and system (kernel) CPU time of C{pids} so far, in seconds."""
    user = system = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    return user / _CLK_TCK, system / _CLK_TCK


class CpuMeter:
    """
    CPU used by named groups of processes over a measured stretch of wall
    time.  Process trees are re-read at each reading: a server may fork
    workers after it starts.
    """

    def __init__(self, roots: Dict[str, int]):
        self.roots = roots
        self._start: Dict[str, Tuple[float, float]] = {}
        self._wall = 0.0

    def _read(self) -> Dict[str, Tuple[float, float]]:
        return {name: cpu_split(tree(pid)) for name, pid in self.roots.items()}

    def start(self) -> CpuMeter:
        self._start = self._read()
        self._wall = time.monotonic()
        return self

    def stop(self) -> Dict[str, float]:
        """
        Per group: CPU seconds used, and that as % of one core, and the
        seconds of it in the kernel (C{_sys_s}); plus the wall time.
        """
        end, wall = self._read(), time.monotonic() - self._wall
        result = {"wall": wall}
        for name, (user, system) in self._start.items():
            used = max(0.0, sum(end[name]) - user - system)
            result[f"{name}_cpu_s"] = used
            result[f"{name}_sys_s"] = max(0.0, end[name][1] - system)
            result[f"{name}_cpu_pct"] = 100.0 * used / wall if wall > 0 else 0.0
        return result


class ProfiledMeter(CpuMeter):
    """
    A L{CpuMeter} that also runs a tool attached to one process over the
    same stretch, so a profile covers exactly what the figures cover: py-spy
    by default (L{py_spy_argv}), or any command that attaches to a PID and
    writes its summary when interrupted (C{perf stat -p}, C{perf record -p},
    C{strace -c -p}).  The tool runs on the load core and is left out of the
    groups measured (its cost to the target, such as ptrace's, is not).  Its
    output and messages go to C{out} with the suffix C{.log}.
    """

    def __init__(self, roots: Dict[str, int], argv: Sequence[str], out: Path):
        super().__init__(roots)
        self.argv = list(argv)
        self.out = out
        self._sampler: Optional[subprocess.Popen] = None

    def start(self) -> ProfiledMeter:
        with open(self.out.with_suffix(".log"), "ab") as log:  # the child has its own copy
            self._sampler = subprocess.Popen(
                pinned(LOAD_CORE, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                # A runner started in the background inherits SIGINT ignored,
                # and a shell may not trap a signal ignored at its start.
                preexec_fn=_default_sigint,
            )
        time.sleep(0.3)  # attached before the measured stretch begins
        return super().start()

    def stop(self) -> Dict[str, float]:
        result = super().stop()
        # SIGINT makes py-spy, perf and strace write their output and exit.
        stop(self._sampler, timeout=60, sig=signal.SIGINT)
        return result


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def py_spy_argv(pid: int, out: Path) -> List[str]:
    """py-spy sampling C{pid} at 250 Hz into C{out}, in its raw collapsed-stack format."""
    return [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
    ]


def attach_argv(template: str, pid: int, out: Path) -> List[str]:
    """C{template} (a command line) with C{{pid}} and C{{out}} filled in, word by word."""
    return [word.replace("{pid}", str(pid)).replace("{out}", str(out)) for word in shlex.split(template)]


def stop(proc: Optional[subprocess.Popen], timeout: float = 15.0, sig=signal.SIGTERM) -> None:
    """
    Stop a process we started and every descendant it left, each by its own
    PID (checked against its start time, so a recycled PID is never hit).
    """
    if proc is None:
        return
    family: List[Tuple[int, Optional[str]]] = [(p, _start_time(p)) for p in tree(proc.pid)]
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    deadline = time.monotonic() + 5
    for pid, started in family:
        if pid == proc.pid:
            continue
        while _start_time(pid) == started and started is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # children usually follow their parent out
        if _start_time(pid) == started and started is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for stream in (proc.stdin, proc.stdout):
        if stream:
            try:
                stream.close()
            except OSError:
                pass


class Ports:
    """Free loopback ports from L{PORT_RANGE}, each handed out once per run."""

    def __init__(self, start: int = PORT_RANGE[0] + (os.getpid() % 50) * 100):
        self._next = start

    def take(self) -> int:
        for _ in range(PORT_RANGE[1] - PORT_RANGE[0]):
            port = self._next
            self._next = PORT_RANGE[0] + (self._next + 1 - PORT_RANGE[0]) % (PORT_RANGE[1] - PORT_RANGE[0])
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port in %d-%d" % PORT_RANGE)


def wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None, accept=(200,)) -> None:
    """Poll C{url} until it answers with a status in C{accept}; bounded."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status in accept:
                    return
                last = answer.status
        except urllib.error.HTTPError as e:
            if e.code in accept:
                return
            last = e.code
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s (last: {last})")


def py_spy() -> str:
    """The py-spy next to this Python (a venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    return found


def raise_nofile(wanted: int = 65536) -> int:
    """
    Raise this process's open-file limit (inherited by everything it starts):
    10,000 connections need 10,000 descriptors on each side.  Root may raise
    the hard limit too; others get what the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
