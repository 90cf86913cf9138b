"""
The benchmark suite (bench/) still runs: `python -m bench --quick` against
wsgw alone (no peers, nothing installed from apt) exits 0 and prints a table
with a row for every workload.  The suite installs its own Node modules
(`npm ci` in bench/node) when they are missing.
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_every_workload(tmp_path):
    out = tmp_path / "results.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}"
    rows = [line for line in run.stdout.splitlines() if line.startswith("| W")]
    for workload in ("W1", "W1c", "W2", "W3", "W3b", "W4", "W4r", "W5", "W6"):
        assert any(row.startswith(f"| {workload} ") for row in rows), f"no {workload} row in:\n{run.stdout}"
    # Every figure is there: no workload failed or was skipped for wsgw.
    assert not [row for row in rows if re.search(r"\| (error|n/a) \|", row)], run.stdout
    assert out.read_text().count("| W") == len(rows)
