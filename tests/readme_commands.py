"""
The shell commands of README.rst and examples/README.rst, and a runner that
runs them as written, in order, from the checkout's top directory.

A command is a line of a literal block (after ``::``) that starts with a
program a reader would type (``.venv/bin/``, ``curl``, ``node`` …); the
lines after it that are not commands are its output.  An RST comment before
a block (invisible in the rendered page) changes how its commands are run:

    .. readme-commands: not run: REASON
    .. readme-commands: output as shown

Long-running commands (the gateway, the apps, the clients) are started in
the background, waited for (their port accepts connections, or the client
prints its first line) and stopped by PID: a server when a later command
takes its port, everything at the end of its file, last started first.

    python tests/readme_commands.py PLAN.json RESULTS.json
    python tests/readme_commands.py --startup COMMAND LAST_LINE_REGEX RESULTS.json

runs a plan made by L{plan}, or prints what one command shows on a terminal
at start-up, (tests/test_readme_commands.py does, inside a
private network namespace, so the README's own ports are free).
"""

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

MARKER = re.compile(r"^\.\. readme-commands: (?:not run: (?P<reason>\S.*)|(?P<exact>output as shown))\s*$")
ANY_MARKER = re.compile(r"^\.\. readme-commands:")
COMMAND = re.compile(
    r"^(?!\S+ = )(?:\.venv/bin/|/opt/wsgw/bin/|curl |node (?:-|\S+\.js\b)|npm |bash |apt-get |python3? |twist |wsgw-ctl |pip |"
    r"cp |echo |install |systemctl |sysctl |journalctl |chmod |cd |\(cd |ss |nginx )"
)
# Programs of the virtualenv, which is never activated: always by path.
BARE = re.compile(r"^(?:python |twist |wsgw-ctl |pip |pytest )")

DEFAULT_GATEWAY_PORT = 40010
DEFAULT_APP_PORT = 8888
# Long-running commands: (pattern, what it is, the port it serves or None
# for a client, which is ready once it prints its first line).
LONG_RUNNING = [
    (re.compile(r"^\.venv/bin/twist(?: --\S+)* wsgw(?!.*--(?:help|version))"), "gateway"),
    (re.compile(r"^\.venv/bin/python examples/chat_app\.py"), "app"),
    (re.compile(r"^node examples/node_app\.js"), "app"),
    (re.compile(r"^\.venv/bin/python examples/flask_app\.py"), "app"),
    (re.compile(r"^node examples/(?:node_client|hello)\.js(?!.* (?:-h|--help)\b)"), "client"),
]
START_WITHIN = 30.0  # seconds a server or client may take to be ready
FOREGROUND_WITHIN = 120.0  # seconds a command may take
EXPECT_WITHIN = 15.0


def literal_blocks(text):
    """
    (line number, marker, lines) of each literal block, its lines dedented.
    C{marker} is the C{readme-commands} comment before it (a match) or None.
    """
    lines = text.splitlines()
    pending = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if ANY_MARKER.match(line):
            marker = MARKER.match(line)
            if marker is None:
                raise ValueError(f"line {i + 1}: a readme-commands comment this test does not know: {line!r}")
            if pending is not None:
                raise ValueError(f"line {i + 1}: two readme-commands comments before one block")
            pending = (i + 1, marker)
        elif line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            body = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                body.append(lines[j])
                j += 1
            while body and not body[-1].strip():
                body.pop()
            content = [b for b in body if b.strip()]
            if content:
                margin = min(len(b) - len(b.lstrip()) for b in content)
                yield i + 2, pending[1] if pending else None, [(b[margin:] if b.strip() else "") for b in body]
                pending = None
            i = j
            continue
        i += 1
    if pending is not None:
        raise ValueError(f"line {pending[0]}: a readme-commands comment with no literal block after it")


def commands(path, name=None):
    """
    Every command of the file at C{path}, in order, as dicts: file (C{name}),
    line, text, output (the lines shown after it), skip (the reason, or
    None), exact (its output must be as shown).
    """
    found = []
    for first, marker, lines in literal_blocks(Path(path).read_text()):
        current = None
        for n, line in enumerate(lines):
            if COMMAND.match(line):
                current = {
                    "file": name or Path(path).name,
                    "line": first + n,
                    "text": line,
                    "output": [],
                    "skip": marker.group("reason") if marker and marker.group("reason") else None,
                    "exact": bool(marker and marker.group("exact")),
                }
                found.append(current)
            elif current is not None and line.strip():
                current["output"].append(line)
    return found


def kind(text):
    """ "gateway", "app", "client" (long-running) or "run" (to completion)."""
    for pattern, what in LONG_RUNNING:
        if pattern.search(text):
            return what
    return "run"


def port_of(command):
    """The loopback port a long-running server command serves."""
    text = command["text"]
    if command["kind"] == "gateway":
        listen = re.search(r"--listen[ =]tcp:(\d+)", text)
        return int(listen.group(1)) if listen else DEFAULT_GATEWAY_PORT
    option = re.search(r"--port[ =](\d+)", text)
    if option:
        return int(option.group(1))
    positional = re.search(r"\.(?:js|py) (\d+)\b", text)
    return int(positional.group(1)) if positional else DEFAULT_APP_PORT


def plan(paths, expectations=()):
    """
    The commands of C{paths} ((path, name) pairs), each with its kind and port, and the
    expectations: (after the command matching A, the output of the
    background command matching B shows a line matching C).
    """
    steps = []
    for path, name in paths:
        for command in commands(path, name):
            command["kind"] = kind(command["text"])
            if command["kind"] in ("gateway", "app"):
                command["port"] = port_of(command)
            steps.append(command)
    return {"steps": steps, "expectations": [list(e) for e in expectations]}


# --- the runner (runs inside the namespace) ----------------------------------


def loopback_up():
    """Bring up C{lo} in a fresh network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    with socket.socket() as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, request))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Background:
    """A long-running command, its output in a file, stopped by its PID."""

    def __init__(self, step, root, env, logs):
        self.step = step
        self.log_path = logs / f"{len(list(logs.iterdir())):02d}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            ["bash", "-c", step["text"]],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its children stop with it
        )

    def output(self):
        return self.log_path.read_text(errors="replace")

    def wait_ready(self):
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited {self.process.returncode} before it was ready"
            if self.step["kind"] == "client":
                if self.output().strip():
                    return None
            elif port_open(self.step["port"]):
                return None
            time.sleep(0.05)  # polling a port or a file, bounded above
        return f"not ready within {START_WITHIN:.0f} s"

    def wait_line(self, pattern):
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + EXPECT_WITHIN
        while time.monotonic() < deadline:
            if regex.search(self.output()):
                return True
            if self.process.poll() is not None:
                return bool(regex.search(self.output()))
            time.sleep(0.05)
        return False

    def stop(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()
        return self.process.returncode


def run(plan, root, logs):
    """Runs the plan's steps; a result per step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))}
    results = []
    running = []  # Background, in the order started
    current_file = None

    def stop_all():
        for background in reversed(running):
            code = background.stop()
            background.result["stopped"] = code
            background.result["log"] = background.output()[-4000:]
        running.clear()

    for step in plan["steps"]:
        if step["file"] != current_file:
            stop_all()
            current_file = step["file"]
        result = {k: step[k] for k in ("file", "line", "text", "kind")}
        results.append(result)
        if step["skip"]:
            result["status"] = "not run"
            result["reason"] = step["skip"]
            continue
        if step["kind"] == "run":
            try:
                done = subprocess.run(
                    ["bash", "-c", step["text"]],
                    cwd=root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=FOREGROUND_WITHIN,
                )
            except subprocess.TimeoutExpired:
                result.update(status="failed", why=f"still running after {FOREGROUND_WITHIN:.0f} s")
                continue
            result["log"] = (done.stdout + done.stderr)[-4000:]
            if done.returncode != 0:
                result.update(status="failed", why=f"exit status {done.returncode}")
            elif step["exact"] and done.stdout.strip() != "\n".join(step["output"]).strip():
                result.update(status="failed", why=f"output {done.stdout.strip()!r}, shown {step['output']!r}")
            else:
                result["status"] = "ok"
        else:
            if step["kind"] != "client":
                for holder in [b for b in running if b.step.get("port") == step["port"]]:
                    holder.result["stopped"] = holder.stop()
                    holder.result["log"] = holder.output()[-4000:]
                    running.remove(holder)
            background = Background(step, root, env, logs)
            background.result = result
            running.append(background)
            problem = background.wait_ready()
            result["status"] = "failed" if problem else "ok"
            if problem:
                result["why"] = problem
                result["log"] = background.output()[-4000:]
        for after, whose, shows in plan["expectations"]:
            if re.search(after, step["text"]):
                target = next((b for b in reversed(running) if re.search(whose, b.step["text"])), None)
                if target is None or not target.wait_line(shows):
                    result["status"] = "failed"
                    result["why"] = f"after it, {whose!r} did not print a line matching {shows!r}"
                    result["log"] = target.output()[-4000:] if target else ""
    stop_all()
    return results


def startup(command, last, seconds=START_WITHIN):
    """
    The lines C{command} prints on a terminal (a pseudo-terminal here, so
    Twisted logs text as it would for a reader) until one matches C{last};
    then it is stopped.
    """
    import pty
    import select

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=Path(__file__).resolve().parent.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith(("WSGW_", "WS_", "LISTEN_"))},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    output, regex = b"", re.compile(last, re.M)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not regex.search(output.decode("utf-8", "replace")):
            ready, _, _ = select.select([leader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the command exited and the terminal closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        os.close(leader)
    return output.decode("utf-8", "replace").replace("\r\n", "\n").splitlines()


def main(argv):
    if argv[0] == "--startup":
        try:
            loopback_up()
        except OSError:
            pass
        command, last, results_path = argv[1:]
        Path(results_path).write_text(json.dumps(startup(command, last)))
        return 0
    plan_path, results_path = argv
    try:
        loopback_up()
    except OSError as e:
        sys.stderr.write(f"could not bring up lo: {e}\n")
    root = Path(__file__).resolve().parent.parent
    logs = Path(results_path).parent / "logs"
    logs.mkdir(exist_ok=True)
    with open(plan_path) as f:
        steps = json.load(f)
    results = run(steps, root, logs)
    Path(results_path).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
