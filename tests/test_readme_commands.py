"""
Every shell command of README.rst and examples/README.rst runs as written,
in order, from the checkout's top directory (tests/readme_commands.py finds
and runs them).  The run happens in a private network namespace (``unshare
--net``), so the README's own ports (40010, 8888) are free and nothing is
substituted; without one, it runs on the host's loopback when those ports
are free, and is skipped otherwise.  Commands marked ``.. readme-commands:
not run: REASON`` are listed with their reason, never silently dropped.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import readme_commands as rc

ROOT = Path(__file__).resolve().parent.parent
DOCS = [(ROOT / "README.rst", "README.rst"), (ROOT / "examples" / "README.rst", "examples/README.rst")]
RUNNER = Path(__file__).resolve().parent / "readme_commands.py"

# What the README says a command makes another (long-running) one print:
# (after the command matching, the output of the one matching, shows).
EXPECTATIONS = [
    # Try it in a minute: the app's echo reaches the client, and so does the push.
    (
        r"^node examples/hello\.js$",
        r"^node examples/hello\.js$",
        r'^\{"event":"echo","data":\{"event":"ai","data":\{\}\}\}$',
    ),
    (r"^node examples/hello\.js$", r"^node examples/node_app\.js$", r"^open \S+ alice \{\}$"),
    (r"hello from curl", r"^node examples/hello\.js$", r'^\{"event":"notice","data":"hello from curl"\}$'),
    # examples/README.rst: the chat app greets carol and broadcasts her words.
    (r"--user carol hello everyone", r"--user carol hello everyone", r"^carol: hello everyone$"),
]


def all_commands():
    return [c for path, name in DOCS for c in rc.commands(path, name)]


def test_every_command_is_found_and_every_unrun_one_says_why():
    found = all_commands()
    texts = [c["text"] for c in found]
    assert any(t.startswith(".venv/bin/twist wsgw") for t in texts)
    assert "node examples/hello.js" in texts and any(t.startswith("curl -s localhost:40010/") for t in texts)
    skipped = [c for c in found if c["skip"]]
    for c in skipped:
        assert len(c["skip"]) > 20, f"{c['file']}:{c['line']}: say why it is not run"
    # systemd, /etc and package installs are never run here; all else is.
    for c in found:
        if re.match(r"(apt-get|systemctl|cp .* /etc/|python3 -m venv)", c["text"]):
            assert c["skip"], f"{c['file']}:{c['line']} must be marked not run: {c['text']}"
    print("\nnot run:\n" + "\n".join(f"  {c['file']}:{c['line']}: {c['text']}  ({c['skip']})" for c in skipped))


def test_programs_of_the_virtualenv_are_called_by_path():
    """The venv is never activated: bare twist, python, wsgw-ctl or pip fail as written."""
    bare = [f"{c['file']}:{c['line']}: {c['text']}" for c in all_commands() if rc.BARE.match(c["text"])]
    assert bare == []


def test_markers_are_known_and_each_has_a_block(tmp_path):
    doc = tmp_path / "x.rst"
    doc.write_text(
        ".. readme-commands: not run: needs the moon\n\n::\n\n    curl -s moon\n    {}\n\nend::\n\n    node x.js\n"
    )
    found = rc.commands(doc)
    assert [(c["text"], c["skip"], c["output"]) for c in found] == [
        ("curl -s moon", "needs the moon", ["{}"]),
        ("node x.js", None, []),
    ]
    # Code is not a command, even where a line starts with a program's name.
    doc.write_text("code::\n\n    node = make_node(config, reactor)\n    cp = copy(x)\n    const ws = 1;\n")
    assert rc.commands(doc) == []
    doc.write_text(".. readme-commands: skip it\n\n::\n\n    curl x\n")
    with pytest.raises(ValueError, match="does not know"):
        rc.commands(doc)
    doc.write_text("text\n\n.. readme-commands: output as shown\n\nno block here\n")
    with pytest.raises(ValueError, match="no literal block"):
        rc.commands(doc)


def test_hello_js_is_the_readme_snippet():
    readme = (ROOT / "README.rst").read_text()
    snippet = next(lines for _, _, lines in rc.literal_blocks(readme) if lines and "require('ws')" in "\n".join(lines))
    code = [line for line in (ROOT / "examples" / "hello.js").read_text().splitlines() if not line.startswith("//")]
    assert [line for line in snippet if line.strip()] == code


def test_the_page_url_matches_the_allowed_origin():
    """The examples' gateway allows exactly the origin of the page it tells you to open."""
    text = (ROOT / "examples" / "README.rst").read_text()
    page = re.search(r"open ``(http://127\.0\.0\.1:(\d+))/\?ws=ws://127\.0\.0\.1:40010/ws``", text)
    assert page, "examples/README.rst no longer says which page to open"
    gateway = next(c["text"] for c in rc.commands(ROOT / "examples" / "README.rst") if rc.kind(c["text"]) == "gateway")
    assert f"--allowed-origin {page.group(1)} " in gateway
    app = next(c for c in rc.commands(ROOT / "examples" / "README.rst") if "chat_app.py" in c["text"])
    assert rc.port_of({**app, "kind": "app"}) == int(page.group(2))


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _namespace_prefix():
    """The command that runs the rest in a fresh network namespace, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--net"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


@pytest.mark.integration
def test_readme_commands_run_as_written(tmp_path, node_ws):
    if not (ROOT / ".venv" / "bin" / "twist").exists():
        pytest.skip("no .venv in the checkout: the Quick start's install (or bash .ci/run) makes it")
    if not (ROOT / "examples" / "node_modules" / "ws").is_dir():
        subprocess.run(
            ["npm", "ci", "--prefix", str(ROOT / "examples"), "--no-audit", "--no-fund", "--loglevel=error"],
            check=True,
            timeout=300,
        )
    prefix = _namespace_prefix()
    if prefix is None:
        busy = [p for p in (rc.DEFAULT_GATEWAY_PORT, rc.DEFAULT_APP_PORT) if not _free(p)]
        if busy:
            why = f"no private network namespace (unshare --net) and ports {busy} are in use here"
            if os.environ.get("CI") == "true":
                pytest.fail(why + " (CI=true: this test must run)")
            pytest.skip(why)
        prefix = []
    plan_path, results_path = tmp_path / "plan.json", tmp_path / "results.json"
    plan_path.write_text(json.dumps(rc.plan(DOCS, EXPECTATIONS)))
    subprocess.run([*prefix, sys.executable, str(RUNNER), str(plan_path), str(results_path)], check=True, timeout=600)
    results = json.loads(results_path.read_text())
    where = "a private network namespace" if prefix else "the host's loopback"
    print(f"\nran in {where}:")
    for r in results:
        print(
            f"  {r['status']:8} {r['file']}:{r['line']}: {r['text']}"
            + (f"  ({r['reason']})" if r.get("reason") else "")
        )
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, "\n\n".join(
        f"{r['file']}:{r['line']}: {r['text']}\n  {r.get('why')}\n{r.get('log', '')}" for r in failed
    )
    ran = [r for r in results if r["status"] == "ok"]
    assert len(ran) >= 25, f"only {len(ran)} commands ran"
    # Long-running commands were running until stopped, not dead early.
    for r in ran:
        if r["kind"] in ("gateway", "app"):
            assert r.get("stopped") in (0, -15), f"{r['file']}:{r['line']} ended {r.get('stopped')}: {r.get('log')}"


def _startup_lines_shown():
    """The lines under "its start-up looks like this" in "Try it in a minute"."""
    text = (ROOT / "README.rst").read_text()
    intro = re.search(r"start-up\s+looks\s+like\s+this", text).start()
    intro_line = text[:intro].count("\n") + 1
    return next(lines for first, _, lines in rc.literal_blocks(text) if first > intro_line)


def _normal(line):
    """A log line without what changes from run to run or release to release: time, addresses, version."""
    line = re.sub(r"^\S*\d\d:\d\d:\d\d\S* ", "", line.strip())
    line = re.sub(r"\bwsgw \d+\.\d+\S* ready\b", "wsgw VERSION ready", line)
    return re.sub(r"0x[0-9a-f]+", "0x…", line)


@pytest.mark.integration
def test_startup_output_is_as_shown(tmp_path):
    """
    What "Try it in a minute" shows the gateway printing at start-up is what
    its command, as written, prints on a terminal (in a private network
    namespace, so port 40010 is free).
    """
    shown = [_normal(line) for line in _startup_lines_shown() if line.strip()]
    assert shown, "the README shows no start-up lines"
    command = next(c["text"] for c in rc.commands(ROOT / "README.rst") if rc.kind(c["text"]) == "gateway")
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no private network namespace (unshare --net) to run the README's command on its port")
    last = re.escape(shown[-1]).replace("0x…", "0x[0-9a-f]+")
    results = tmp_path / "startup.json"
    subprocess.run(
        [*prefix, sys.executable, str(RUNNER), "--startup", command, last, str(results)], check=True, timeout=120
    )
    printed = [_normal(line) for line in json.loads(results.read_text()) if line.strip()]
    assert printed[: len(shown)] == shown, "\n".join(printed)
