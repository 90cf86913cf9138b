"""
/readyz reflects a sustained condition: one failed attempt (a 503, a slow
answer, a stale keep-alive) is retried and never takes a healthy gateway
out of a load balancer's rotation; an app that stays unreachable does.
"""

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, node_of, open_conn
from wsgw.config import Config
from wsgw.forwarder import AppHealth, AppUnavailable, Backoff
from wsgw.web import make_resource


def readiness(gateway):
    treq = StubTreq(make_resource(node_of(gateway, Config())))
    d = treq.get("http://127.0.0.1/readyz")
    treq.flush()
    response = d.result
    body = json.loads(treq.content(response).result)
    return response.code, body


def failing_gateway(clock, app, down_after=10.0):
    gateway = make_gateway(clock, app, backoff=Backoff(rng=lambda: 0.0), health=AppHealth(down_after=down_after))
    gateway.accepting = True
    return gateway


def test_one_failed_attempt_leaves_the_gateway_ready():
    clock, app = Clock(), FakeApp()
    gateway = failing_gateway(clock, app)
    open_conn(gateway, "a")
    app.pending[0][2].errback(AppUnavailable("app answered HTTP 503"))
    status, body = readiness(gateway)
    assert (status, body["app"]) == (200, "failing")
    clock.advance(0.2)  # the retry succeeds
    app.answer_all()
    status, body = readiness(gateway)
    assert (status, body["app"], body["message"]) == (200, "up", "ready")


def test_a_lone_failure_followed_by_quiet_never_counts_as_down():
    clock, app = Clock(), FakeApp()
    gateway = failing_gateway(clock, app)
    open_conn(gateway, "a")
    app.pending[0][2].errback(AppUnavailable("app answered HTTP 503"))
    clock.advance(300)  # nothing else happened: the retry is still pending
    assert readiness(gateway)[0] == 200


def test_failures_without_a_success_for_the_window_make_it_unready_until_it_answers():
    clock, app = Clock(), FakeApp()
    gateway = failing_gateway(clock, app, down_after=10.0)
    open_conn(gateway, "a")
    for _ in range(30):
        for _event, _record, d in app.pending:
            d.errback(AppUnavailable("app answered HTTP 503"))
        if readiness(gateway)[0] == 503:
            break
        clock.advance(1.0)
    status, body = readiness(gateway)
    assert (status, body["app"], body["message"]) == (503, "down", "the app is unreachable")
    assert 10.0 <= clock.seconds() <= 16.0  # down after the window, not at the first failure
    clock.advance(10)
    app.answer_all()
    assert readiness(gateway)[0] == 200


def test_an_app_that_refuses_an_event_is_up():
    health = AppHealth(down_after=1.0)
    health.failed(0.0)
    health.succeeded(0.5)  # a 4xx answer: the app is there
    health.failed(5.0)
    assert health.state == "failing"
    health.failed(6.5)
    assert health.state == "down"
