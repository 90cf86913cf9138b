"""
/metrics in memory: the counters the gateway and forwarder keep, read as
Prometheus reads them (its own parser), after events on a Clock.
"""

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, node_of, open_conn
from wsgw.config import Config
from wsgw.forwarder import AppRejected, AppUnavailable, Backoff
from wsgw.gateway import CLOSE_BY_APP
from wsgw.metrics import MetricsPage
from wsgw.registry import Targets
from wsgw.web import make_resource


def scrape(resource):
    treq = StubTreq(resource)
    d = treq.get("http://127.0.0.1/metrics")
    treq.flush()
    response = d.result
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = treq.text_content(response).result
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


def test_the_counters_move_with_connections_frames_and_events():
    clock, app = Clock(), FakeApp()
    gateway = make_gateway(clock, app, backoff=Backoff(rng=lambda: 0.0))
    private = open_conn(gateway, "a", user="alice")
    open_conn(gateway, "b", user="bob", public=True)
    gateway.received(private, b'{"n":1}', False)
    assert gateway.send_here(b'"hi"', Targets(users=["alice", "bob"])) == 2
    app.pending[0][2].callback(None)  # a's open
    app.pending[0][2].errback(AppUnavailable("app answered HTTP 503"))  # b's open: retried
    clock.advance(1.0)
    app.pending[0][2].errback(AppRejected("app answered HTTP 400"))  # a's message: given up
    gateway.close_here(Targets(conn_ids=["a"]))
    gateway.closed(private, *CLOSE_BY_APP)
    samples = scrape(make_resource(node_of(gateway, Config())))

    assert samples["wsgw_connections|access=private"] == 0
    assert samples["wsgw_connections|access=public"] == 1
    assert samples["wsgw_connections_opened_total"] == 2
    assert samples["wsgw_connections_closed_total|reason=app"] == 1
    assert samples["wsgw_frames_received_total"] == 1
    assert samples["wsgw_bytes_received_total"] == len(b'{"n":1}')
    assert samples["wsgw_frames_sent_total"] == 2
    assert samples["wsgw_bytes_sent_total"] == 2 * len(b'"hi"')
    assert samples["wsgw_app_events_delivered_total"] == 1
    assert samples["wsgw_app_retries_total"] == 1
    assert samples["wsgw_app_events_dropped_total"] == 1
    # Three attempts answered, one waiting: b's retried open; a's close queued.
    assert samples["wsgw_app_request_seconds_count"] == 3
    assert samples["wsgw_app_request_seconds_bucket|le=+Inf"] == 3
    assert samples["wsgw_app_requests_in_flight"] == len(app.pending)
    assert "wsgw_redis_up" not in samples  # no cluster, no cluster metrics


def test_a_cluster_node_adds_its_redis_and_cluster_metrics():
    gateway = make_gateway(Clock(), FakeApp())
    stats = SimpleNamespace(nodes=3, published=5, applied=4, malformed=1, partial=2)
    cluster = SimpleNamespace(up=False, stats=stats)
    samples = scrape(MetricsPage(gateway, cluster))
    assert samples["wsgw_redis_up"] == 0
    assert samples["wsgw_cluster_nodes"] == 3
    assert samples["wsgw_cluster_commands_published_total"] == 5
    assert samples["wsgw_cluster_commands_applied_total"] == 4
    assert samples["wsgw_cluster_messages_malformed_total"] == 1
    assert samples["wsgw_cluster_partial_answers_total"] == 2
