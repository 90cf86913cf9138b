"""
The cluster benchmark (bench/cluster.py) still runs: `python -m bench.cluster
--quick` starts a private redis-server and 1 to 3 nodes, fans out, finds
nothing lost, duplicated or reordered, and prints a row per setup.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_cluster_benchmark_prints_every_setup(tmp_path):
    out = tmp_path / "cluster.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}"
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| memory", "| redis"))]
    assert [row.split(" | ")[0] for row in rows] == [
        "| memory, 1 node",
        "| redis, 1 node",
        "| redis, 2 nodes",
        "| redis, 3 nodes",
    ]
    assert all(" | 0/0/0 | " in row for row in rows), run.stdout
    assert out.read_text().count("\n| ") == len(rows) + 1  # and the header
