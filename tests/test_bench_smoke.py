"""
The benchmark suite (bench/) still runs: `python -m bench --quick` against
wsgw alone (no peers, nothing installed from apt) exits 0 and prints a table
with a row for every workload.  The suite installs its own Node modules
(`npm ci` in bench/node) when they are missing.
"""

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(argv, timeout):
    """
    Run the bench; past C{timeout}, interrupt it (SIGINT), so that its own
    clean-up stops the servers, apps and load generators it started by PID
    (a kill would leave them running), and fail.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Not ignored, as it is for a background job's children: the
        # interrupt must reach the bench.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the bench took over {timeout}s\nstderr:\n{stderr[-4000:]}")
    return proc.returncode, stdout, stderr


def test_quick_benchmark_prints_every_workload(tmp_path):
    out = tmp_path / "results.md"
    code, stdout, stderr = run_bench(["--quick", "--out", str(out)], timeout=300)
    assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
    rows = [line for line in stdout.splitlines() if line.startswith("| W")]
    for workload in ("W1", "W1c", "W2", "W3", "W3b", "W4", "W4r", "W5", "W6"):
        assert any(row.startswith(f"| {workload} ") for row in rows), f"no {workload} row in:\n{stdout}"
    # Every figure is there: no workload failed or was skipped for wsgw.
    assert not [row for row in rows if re.search(r"\| (error|n/a) \|", row)], stdout
    assert out.read_text().count("| W") == len(rows)
