"""
The bench measures the servers in turn: no server is always the first one
measured, which on these machines reads high, so a same-run ratio is not
bent toward whichever server happens to lead the list.
"""

from collections import Counter

from bench.report import Results
from bench.workloads import QUICK, Runner


class _Server:
    workloads = ("W1", "W2")

    def __init__(self, name):
        self.name = name


def _runner(tmp_path, names):
    servers = [type(name, (_Server,), {"name": name}) for name in names]
    return Runner(QUICK, servers, tmp_path, Results(names), log=lambda line: None)


def test_every_server_goes_first_as_often_as_the_others(tmp_path):
    names = ["wsgw", "wsgw@base", "pushpin", "nchan"]
    runner = _runner(tmp_path, names)
    firsts = Counter()
    for turn in range(3 * len(names)):
        order = [cls.name for cls in runner.in_turn(f"W{turn}")]
        assert sorted(order) == sorted(names), "each workload measures every server once"
        firsts[order[0]] += 1
    assert firsts == dict.fromkeys(names, 3)


def test_each_server_runs_the_workload_in_the_turns_order(tmp_path):
    runner = _runner(tmp_path, ["wsgw", "pushpin"])
    measured = []
    for label in ("W1 a", "W1 b"):
        runner.each_server("W1", label, [("m", "")], measured.append)  # called with the class
    assert [cls.name for cls in measured] == ["wsgw", "pushpin", "pushpin", "wsgw"]


def test_each_workload_asked_for_runs_once(tmp_path, monkeypatch):
    runner = _runner(tmp_path, ["wsgw"])
    ran = []
    monkeypatch.setattr(runner, "w1", lambda sizes=None: ran.append(("W1", sizes)))
    monkeypatch.setattr(runner, "w1c", lambda sizes=None: ran.append(("W1c", sizes)))
    monkeypatch.setattr(runner, "w2", lambda: ran.append(("W2", None)))
    runner.run(["W1", "W2"])
    assert ran == [("W1", None), ("W2", None)]
    ran.clear()
    runner.run(["W1", "W1C"])  # size by size, W1 then W1c
    assert ran == [step for n in QUICK.w1_sizes for step in (("W1", [n]), ("W1c", [n]))]


def test_a_figure_reported_again_is_the_median_and_a_check_shows_every_outcome():
    results = Results(["wsgw", "nchan"])
    for value in (300, 200, 250):
        results.add("W3", "server CPU µs per event", "wsgw", value, "↓")
    for value in ("0/0/0", "0/0/0", "3/0/0"):
        results.add("W3", "lost/dup/reordered", "wsgw", value)
    results.add("W3", "ratio", "wsgw", 0.5, derived=True)
    results.add("W3", "ratio", "wsgw", 0.7, derived=True)
    shown = {row.metric: row.values["wsgw"] for row in results.rows}
    assert shown == {"server CPU µs per event": 250, "lost/dup/reordered": "0/0/0; 3/0/0", "ratio": 0.7}


def test_a_figure_measured_beside_a_failed_run_is_written_as_figures_are():
    results = Results(["pushpin"])
    for value in (169.5667, "error", 171.1):
        results.add("W1", "handshakes/s", "pushpin", value, "↑", digits=1)
    assert results.rows[0].values["pushpin"] == "170; error"


def test_repeated_runs_go_on_taking_turns(tmp_path):
    runner = _runner(tmp_path, ["wsgw", "nchan", "pushpin"])
    firsts = []
    for _ in range(3):  # what --repeat 3 does with one workload
        measured = []
        runner.each_server("W1", "W1 a", [("m", "")], measured.append)  # called with the class
        firsts.append(measured[0].name)
    assert firsts == ["wsgw", "nchan", "pushpin"]
