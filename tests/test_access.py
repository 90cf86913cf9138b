"""
Who may use the gateway: API callers, browser origins, and how fast one
peer may knock.
"""

import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from fakes import make_gateway, node_of, open_conn
from wsgw.access import OriginPolicy, PeerRateLimiter, bearer_matches, is_local
from wsgw.config import Config
from wsgw.web import make_resource


@pytest.mark.parametrize(
    "address, local",
    [
        (IPv4Address("TCP", "127.0.0.1", 1), True),
        (IPv4Address("TCP", "127.8.9.10", 1), True),
        (IPv6Address("TCP", "::1", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True),
        (UNIXAddress(b"/run/wsgw.sock"), True),
        (IPv4Address("TCP", "10.0.0.5", 1), False),
        (IPv4Address("TCP", "203.0.113.9", 1), False),
        (IPv6Address("TCP", "2001:db8::1", 1), False),
        (IPv6Address("TCP", "::ffff:10.0.0.1", 1), False),
    ],
)
def test_is_local(address, local):
    assert is_local(address) is local


def test_bearer_matches():
    assert bearer_matches(b"Bearer s3cret", "s3cret")
    assert bearer_matches(b"bearer  s3cret ", "s3cret")
    assert not bearer_matches(b"Bearer s3cre", "s3cret")
    assert not bearer_matches(b"Basic s3cret", "s3cret")
    assert not bearer_matches(None, "s3cret")
    assert not bearer_matches(b"", "s3cret")


@pytest.mark.parametrize(
    "origin, hosts, patterns, allowed",
    [
        (None, ["gw.example.com"], (), True),  # not a browser
        ("https://gw.example.com", ["gw.example.com"], (), True),
        ("https://gw.example.com", ["gw.example.com:443"], (), True),
        ("http://127.0.0.1:40010", ["127.0.0.1:40010"], (), True),
        ("https://app.alice.olares.com", ["localhost:40010", "app.alice.olares.com"], (), True),
        ("https://evil.example", ["gw.example.com"], (), False),
        ("https://gw.example.com.evil.example", ["gw.example.com"], (), False),
        ("http://gw.example.com:8080", ["gw.example.com"], (), False),
        ("null", ["gw.example.com"], (), False),
        ("https://desktop.alice.olares.com", ["x"], ("https://*.alice.olares.com",), True),
        ("https://desktop.bob.olares.com", ["x"], ("https://*.alice.olares.com",), False),
    ],
)
def test_origin_policy(origin, hosts, patterns, allowed):
    assert OriginPolicy(patterns).allows(origin, hosts) is allowed


def test_rate_limiter_bursts_then_refills_per_peer():
    clock = Clock()
    limiter = PeerRateLimiter(clock, rate=2)
    assert [limiter.allow("a") for _ in range(5)] == [True] * 4 + [False]
    assert limiter.allow("b")  # another peer is not affected
    clock.advance(0.5)
    assert limiter.allow("a")
    assert not limiter.allow("a")


def test_rate_limiter_memory_is_bounded():
    clock = Clock()
    limiter = PeerRateLimiter(clock, rate=1, max_peers=100)
    for n in range(1000):
        limiter.allow(f"10.0.{n // 256}.{n % 256}")
        clock.advance(0.001)
    assert len(limiter) <= 100


def api_request(resource, path, peer, authorization=None):
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.method = b"GET"
    request.client = peer
    request.path = path
    if authorization:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    resource_ = getChildForRequest(resource, request)
    body = resource_.render(request)
    return request.responseCode or 200, json.loads(body)


LIST = b"/tapr/ws/conn/list"
REMOTE = IPv4Address("TCP", "203.0.113.9", 5000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 5000)


def guarded(**config):
    gateway = make_gateway(Clock())
    open_conn(gateway, "a1", "alice")
    return make_resource(node_of(gateway, Config(**config)))


def test_api_refuses_remote_callers_by_default():
    resource = guarded()
    status, body = api_request(resource, LIST, REMOTE)
    assert (status, body["code"]) == (403, 403)
    assert "loopback" in body["message"]
    status, body = api_request(resource, b"/tapr/ws/conn/send", REMOTE)
    assert status == 403  # every endpoint, whatever the method
    status, body = api_request(resource, LIST, LOCAL)
    assert (status, body["code"]) == (200, 0)


def test_api_token_is_required_when_set():
    resource = guarded(admin_token="s3cret")
    status, body = api_request(resource, LIST, LOCAL)
    assert (status, body["code"]) == (401, 401)
    status, _ = api_request(resource, LIST, LOCAL, b"Bearer wrong")
    assert status == 401
    status, body = api_request(resource, LIST, LOCAL, b"Bearer s3cret")
    assert (status, body["code"]) == (200, 0)


def test_remote_callers_with_the_token_when_allowed():
    resource = guarded(admin_token="s3cret", admin_allow_remote=True)
    assert api_request(resource, LIST, REMOTE)[0] == 401
    assert api_request(resource, LIST, REMOTE, b"Bearer s3cret")[0] == 200
