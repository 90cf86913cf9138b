import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from harness import ensure_node_modules, start_app

# Twisted buffers up to 65,536 log events until logging begins; begin it, so
# in-process tests show warnings and errors (pytest captures stderr) and
# memory measured in-process is not the buffer's.
globalLogBeginner.beginLoggingTo(
    [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
    discardBuffer=True,
    redirectStandardIO=False,
)


# The layers.  A test is `integration` when it starts real processes (the
# daemon, an app process, Node, Chromium, redis-server) or listens on real
# sockets; every other test is `unit`: in memory, the seconds-long inner loop
# (`pytest -m unit`).  Whole modules of integration tests are named here; a
# module of mixed layers marks its integration tests itself.
INTEGRATION_MODULES = {
    "test_appagent_node.py",
    "test_bench_app.py",
    "test_bench_cluster_smoke.py",
    "test_bench_smoke.py",
    "test_browser.py",
    "test_cli.py",
    "test_cluster.py",
    "test_daemon.py",
    "test_embedding.py",
    "test_faults.py",
    "test_hostile.py",
    "test_leaks.py",
    "test_metrics.py",
    "test_operability.py",
    "test_replies_batches.py",
    "test_security.py",
    "test_startup.py",
    "test_systemd.py",
    "test_tls_daemon.py",
    "test_trusted_proxy.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


def _outside_the_unit_layer(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test used {what}: mark it integration (tests/conftest.py)")

    return refuse


@pytest.fixture(autouse=True)
def unit_layer_stays_in_memory(request, monkeypatch):
    """A unit test that starts a process or opens a real socket fails, so
    `pytest -m unit` stays in memory."""
    if request.node.get_closest_marker("unit") is None:
        return
    monkeypatch.setattr(subprocess, "Popen", _outside_the_unit_layer("subprocess.Popen"))
    for name in (
        "spawnProcess",
        "listenTCP",
        "connectTCP",
        "listenSSL",
        "connectSSL",
        "listenUNIX",
        "connectUNIX",
        "listenUNIXDatagram",
        "listenUDP",
    ):
        if hasattr(reactor, name):
            monkeypatch.setattr(reactor, name, _outside_the_unit_layer(f"reactor.{name}"))


@pytest.fixture(scope="session")
def node_ws():
    """The Node `ws` library, installed from npm on first use."""
    ensure_node_modules()


@pytest.fixture
def app():
    """A real app HTTP server on an ephemeral loopback port, recording events."""
    app = start_app()
    yield app
    app.port.stopListening()


@pytest.fixture
def log_events():
    """Every log event (the dict, fields and all) emitted while the test runs."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def log_lines():
    """The text of every log event emitted while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []

    def observe(event):
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)
