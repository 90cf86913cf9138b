import sys

import pytest
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
def log_lines():
    """The text of every log event emitted while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []

    def observe(event):
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)
