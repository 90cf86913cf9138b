"""
Identity comes from the upgrade request as the platform sets it.
"""

import uuid

from wsgw.config import trusted_networks
from wsgw.identity import client_address, cookie_value, identify, new_conn_id


def test_cookie_value():
    assert cookie_value("a=1; auth_token=abc; b=2", "auth_token") == "abc"
    assert cookie_value('auth_token="quoted"', "auth_token") == "quoted"
    assert cookie_value("xauth_token=no; auth_token=yes", "auth_token") == "yes"
    assert cookie_value("auth_token=first; auth_token=second", "auth_token") == "first"
    assert cookie_value("other=1", "auth_token") is None
    assert cookie_value("garbage;;=;", "auth_token") is None


def test_user_and_token_from_request():
    conn = identify(
        {"x-bfl-user": "alice", "cookie": "auth_token=abc; theme=dark", "user-agent": "UA/1"},
        "10.0.0.9",
    )
    assert conn.user_name == "alice"
    assert conn.token == "abc"
    assert conn.access_public is False
    assert conn.cookie == "auth_token=abc; theme=dark"
    assert conn.user_agent == "UA/1"
    assert conn.remote_addr == "10.0.0.9"
    assert str(uuid.UUID(conn.conn_id)) == conn.conn_id


def test_public_connection_gets_fresh_uuid_token():
    one = identify({}, "p")
    two = identify({"cookie": "auth_token="}, "p")
    for conn in (one, two):
        assert conn.access_public is True
        assert conn.user_name == ""
        assert str(uuid.UUID(conn.token)) == conn.token
    assert one.token != two.token
    assert one.conn_id != two.conn_id


def test_forwarded_address_wins_over_peer():
    conn = identify({"x-original-forwarded-for": "203.0.113.7"}, "127.0.0.1")
    assert conn.remote_addr == "203.0.113.7"


def test_user_header_is_configurable():
    conn = identify({"x-remote-user": "zed", "x-bfl-user": "alice"}, "p", user_header="X-Remote-User")
    assert conn.user_name == "zed"


def test_utf8_header_values_survive_autobahns_latin1_decoding():
    def as_autobahn_gives_it(text):
        return text.encode("utf-8").decode("latin-1")

    conn = identify({"x-bfl-user": as_autobahn_gives_it("zoë"), "cookie": as_autobahn_gives_it("auth_token=té")}, "p")
    assert conn.user_name == "zoë"
    assert conn.token == "té"
    assert conn.cookie == "auth_token=té"


def test_the_first_forwarded_address_is_the_clients_by_default():
    conn = identify({"x-original-forwarded-for": "203.0.113.7, 10.0.0.2"}, "10.0.0.1")
    assert conn.remote_addr == "203.0.113.7"
    assert identify({"x-forwarded-for": "203.0.113.7"}, "10.0.0.1").remote_addr == "10.0.0.1"


def test_with_trusted_proxies_the_nearest_untrusted_address_is_the_clients():
    trusted = trusted_networks(["10.0.0.0/8", "::1"])
    headers = {"x-forwarded-for": "198.51.100.1, 203.0.113.7, 10.0.0.2"}
    # The chain from the peer back: 10.0.0.2 is trusted, 203.0.113.7 is not.
    assert client_address(headers, "10.0.0.1", trusted) == "203.0.113.7"
    assert client_address({"x-original-forwarded-for": "203.0.113.9"}, "::1", trusted) == "203.0.113.9"
    # A peer that is not trusted is the client, whatever it says.
    assert client_address(headers, "192.0.2.50", trusted) == "192.0.2.50"
    # All trusted: the farthest address.
    assert client_address({"x-forwarded-for": "10.1.1.1"}, "10.0.0.1", trusted) == "10.1.1.1"
    # Garbage in the chain stops the walk there.
    assert client_address({"x-forwarded-for": "evil, 10.0.0.3"}, "10.0.0.1", trusted) == "evil"
    assert client_address({"x-forwarded-for": "[2001:db8::1]:443"}, "10.0.0.1", trusted) == "2001:db8::1"


def test_a_bad_trusted_proxy_is_refused_by_name():
    import re

    import pytest

    with pytest.raises(ValueError, match=re.escape("'10.0.0.300/8' is not an IP address or CIDR block")):
        trusted_networks(["10.0.0.300/8"])


def test_conn_ids_are_random_version_4_uuids_as_uuid4_writes_them():
    ids = [new_conn_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for conn_id in ids:
        parsed = uuid.UUID(conn_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == conn_id
    # Every bit that is not the version's or the variant's varies.
    fixed = ~0
    for a, b in zip(ids, ids[1:]):
        fixed &= ~(uuid.UUID(a).int ^ uuid.UUID(b).int)
    assert fixed & ((1 << 128) - 1) == (0xF << 76) | (0x3 << 62)
