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
        runner.each_server("W1", label, [("m", "")], lambda cls: measured.append(cls.name))
    assert measured == ["wsgw", "pushpin", "pushpin", "wsgw"]


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
