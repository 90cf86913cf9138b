import pytest

from harness import ensure_node_modules


@pytest.fixture(scope="session")
def node_ws():
    """The Node `ws` library, installed from npm on first use."""
    ensure_node_modules()
