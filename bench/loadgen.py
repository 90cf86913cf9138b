"""
The Node side of the benchmark, seen from Python: the load generator
(node/loadgen.js, driven by JSON commands over a pipe) and the fast app
(node/app.js), both pinned to the load core.

The load is made in Node with the `ws` library rather than in Python so the
load generator is not slower than the fastest server it measures; its own CPU
is reported beside the server's so a saturated generator shows.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional

from . import procs

NODE_DIR = Path(__file__).resolve().parent / "node"


def node_binary() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if not node:
        raise RuntimeError("Node.js is needed for the load generator (apt-get install nodejs npm)")
    return node


def ensure_node_modules() -> None:
    """Install the pinned `ws` (package-lock.json) with `npm ci` when it is missing."""
    if (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError("npm is needed to install the load generator's `ws` (apt-get install npm)")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=300,
    )


class LoadGen:
    """One load generator process; L{call} sends a command and waits, bounded, for its answer."""

    def __init__(self, log: Path):
        self.proc = procs.spawn([node_binary(), str(NODE_DIR / "loadgen.js")], procs.LOAD_CORE, log, pipes=True)
        self._answers: queue.Queue[Optional[bytes]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._answers.put(line)
        self._answers.put(None)  # end of output: the process is gone

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, timeout: float, **command: Any) -> Dict[str, Any]:
        """Run one command; raise if it fails or takes longer than C{timeout} seconds."""
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        try:
            line = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"load generator: no answer to {command['cmd']} within {timeout:.0f}s") from None
        if line is None:
            raise RuntimeError(f"load generator exited ({self.proc.poll()}) during {command['cmd']}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"load generator: {command['cmd']} failed: {answer.get('error')}")
        return answer

    def stop(self) -> None:
        # Closing stdin asks it to drop its connections and exit; the PID stop backs that up.
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        procs.stop(self.proc)


class App:
    """The fast app (node/app.js) on its own port: counts or echoes client messages."""

    def __init__(self, port: int, log: Path, **endpoints: str):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        config = {"port": port, **endpoints}
        self.proc = procs.spawn([node_binary(), str(NODE_DIR / "app.js"), json.dumps(config)], procs.LOAD_CORE, log)
        procs.wait_http(self.base + "/stats", 15, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def mode(self, mode: str) -> None:
        """Switch to C{mode} ("count" or "echo") and zero the counters."""
        body = json.dumps({"mode": mode}).encode()
        request = urllib.request.Request(self.base + "/control", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()

    def stats(self) -> Dict[str, Any]:
        with urllib.request.urlopen(self.base + "/stats", timeout=5) as answer:
            return json.load(answer)

    def stop(self) -> None:
        procs.stop(self.proc)


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll C{predicate} until true or C{timeout} seconds pass; bounded either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
