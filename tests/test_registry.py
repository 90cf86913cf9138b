"""
The registry finds exactly the connections send/close/list are about.
"""

import hashlib

import pytest

from wsgw.registry import AccessType, Connection, Registry, Targets


def conn(conn_id, user="alice", token=None, public=False, agent=""):
    return Connection(
        conn_id=conn_id,
        user_name=user,
        token=token or f"tok-{conn_id}",
        access_public=public,
        user_agent=agent,
    )


@pytest.fixture
def registry():
    r = Registry()
    r.add(conn("a1", "alice", "t-alice"))
    r.add(conn("a2", "alice", "t-alice"))
    r.add(conn("ap", "alice", public=True))
    r.add(conn("b1", "bob", "t-bob"))
    r.add(conn("b2", "bob", "t-shared"))
    r.add(conn("c1", "carol", "t-shared"))
    return r


def ids(conns):
    return sorted(c.conn_id for c in conns)


def test_select_by_conn_id(registry):
    assert ids(registry.select(Targets(conn_ids=["b1"]))) == ["b1"]
    assert registry.select(Targets(conn_ids=["nope"])) == []


def test_select_by_users_includes_public_by_default(registry):
    """users_access_type 0 reaches the user name's public connections too."""
    assert ids(registry.select(Targets(users=["alice", "carol"]))) == ["a1", "a2", "ap", "c1"]


@pytest.mark.parametrize(
    "access, expected",
    [(AccessType.ALL, ["a1", "a2", "ap"]), (AccessType.PRIVATE, ["a1", "a2"]), (AccessType.PUBLIC, ["ap"])],
)
def test_users_access_type(registry, access, expected):
    assert ids(registry.select(Targets(users=["alice"], access=access))) == expected


def test_select_by_tokens(registry):
    assert ids(registry.select(Targets(tokens=["t-shared"]))) == ["b2", "c1"]


def test_several_criteria_intersect(registry):
    assert ids(registry.select(Targets(users=["bob"], tokens=["t-shared"]))) == ["b2"]
    assert ids(registry.select(Targets(conn_ids=["a1"], users=["bob"]))) == []
    assert ids(registry.select(Targets(conn_ids=["b2", "c1"], users=["bob", "carol"], tokens=["t-shared"]))) == [
        "b2",
        "c1",
    ]


def test_no_criterion_matches_nothing(registry):
    assert registry.select(Targets()) == []


def test_duplicates_in_criteria_match_once(registry):
    assert ids(registry.select(Targets(users=["bob", "bob"]))) == ["b1", "b2"]
    assert ids(registry.select(Targets(conn_ids=["b1", "b1"]))) == ["b1"]


def test_remove_forgets_every_index(registry):
    b2 = registry.get("b2")
    assert registry.remove(b2) is True
    assert registry.remove(b2) is False
    assert registry.get("b2") is None
    assert ids(registry.select(Targets(users=["bob"]))) == ["b1"]
    assert ids(registry.select(Targets(tokens=["t-shared"]))) == ["c1"]
    registry.remove(registry.get("b1"))
    assert "bob" not in [e["name"] for e in registry.listing()]
    assert len(registry) == 4


def test_duplicate_conn_id_refused(registry):
    with pytest.raises(ValueError):
        registry.add(conn("a1"))


def test_listing_shape():
    r = Registry()
    r.add(conn("a1", "alice", "t1", agent="Mozilla/5.0"))
    r.add(conn("ap", "alice", "t2", public=True))
    [entry] = r.listing()
    assert entry == {
        "name": "alice",
        "conns": [
            {
                "id": "a1",
                "token": "t1",
                "userAgent": "Mozilla/5.0",
                "userAgentTag": hashlib.md5(b"Mozilla/5.0").hexdigest(),
                "remoteAddr": "",
            }
        ],
        "conns_number": 1,
        "public_conns": [{"id": "ap", "token": "t2", "userAgent": "", "userAgentTag": "", "remoteAddr": ""}],
        "public_conns_number": 1,
    }
