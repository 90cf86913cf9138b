"""
What an operator watches: Prometheus metrics.

The gateway and forwarder keep plain integer counters; the collector turns
them into metric families only when Prometheus scrapes, so the hot paths
pay nothing for metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request

from .forwarder import LATENCY_BUCKETS
from .gateway import Gateway
from .tls import ServerTLS

if TYPE_CHECKING:
    from .cluster import Cluster
    from .connect import ConnectHook


class GatewayCollector:
    """A Prometheus collector reading one gateway's counters."""

    def __init__(self, gateway: Gateway, cluster: Optional[Cluster] = None, connect_hook: Optional[ConnectHook] = None):
        self.gateway = gateway
        #: The node's L{wsgw.cluster.Cluster}, with the Redis engine.
        self.cluster = cluster
        #: The app's say on handshakes, with --connect-url.
        self.connect_hook = connect_hook

    def collect(self) -> Iterator[Any]:
        gateway, stats = self.gateway, self.gateway.stats
        forwarder = gateway.forwarder
        fstats = forwarder.stats

        public = sum(1 for conn in gateway.registry if conn.access_public)
        connections = GaugeMetricFamily("wsgw_connections", "Open client connections.", labels=["access"])
        connections.add_metric(["private"], len(gateway.registry) - public)
        connections.add_metric(["public"], public)
        yield connections

        yield CounterMetricFamily("wsgw_connections_opened", "Client connections opened.", value=stats.opened)
        closed = CounterMetricFamily(
            "wsgw_connections_closed", "Client connections closed, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.closed.items()):
            closed.add_metric([reason], count)
        yield closed
        refused = CounterMetricFamily("wsgw_handshakes_refused", "Handshakes refused, by reason.", labels=["reason"])
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused

        for name, text, value in (
            ("wsgw_frames_received", "WebSocket messages received from clients (pings included).", stats.frames_in),
            ("wsgw_bytes_received", "Bytes of messages received from clients.", stats.bytes_in),
            ("wsgw_frames_sent", "WebSocket messages sent to clients (pongs included).", stats.frames_out),
            ("wsgw_bytes_sent", "Bytes of messages sent to clients.", stats.bytes_out),
            ("wsgw_app_events_delivered", "Events the app accepted.", fstats.delivered),
            ("wsgw_app_retries", "Event POSTs retried after a transient failure.", fstats.retried),
            ("wsgw_app_events_dropped", "Events given up (retry window over, or refused by the app).", fstats.dropped),
        ):
            yield CounterMetricFamily(name, text, value=value)

        online = gateway.online
        if online is not None:
            yield GaugeMetricFamily(
                "wsgw_users_online",
                "Users online (--presence-events), those in their grace period included.",
                value=len(online),
            )
            went = CounterMetricFamily("wsgw_presence_events", "online and offline events posted.", labels=["action"])
            went.add_metric(["online"], online.went_online)
            went.add_metric(["offline"], online.went_offline)
            yield went

        replies = gateway.live.reply_stats
        replied = CounterMetricFamily(
            "wsgw_app_replies",
            "Inline replies (X-Wsgw-Reply) to events: sent, refused (not UTF-8, too big), dropped (no open connection).",
            labels=["result"],
        )
        replied.add_metric(["sent"], replies.sent)
        replied.add_metric(["dropped"], replies.dropped)
        for reason, count in sorted(replies.refused.items()):
            replied.add_metric([f"refused_{reason}"], count)
        yield replied
        yield CounterMetricFamily(
            "wsgw_app_batches", "Event POSTs that carried a batch (--app-batch).", value=fstats.batches
        )
        yield CounterMetricFamily(
            "wsgw_app_batched_events", "Events delivered in batches (--app-batch).", value=fstats.batched_events
        )

        buckets, cumulative = [], 0
        for bound, count in zip(LATENCY_BUCKETS, fstats.latency_counts):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        cumulative += fstats.latency_counts[-1]
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(
            "wsgw_app_request_seconds", "Time per event POST attempt.", buckets=buckets, sum_value=fstats.latency_sum
        )

        yield GaugeMetricFamily(
            "wsgw_app_backlog_events", "Events waiting for the app.", value=forwarder.backlog_total()
        )
        yield GaugeMetricFamily("wsgw_app_requests_in_flight", "Event POSTs in flight.", value=forwarder.in_flight)

        hook = self.connect_hook
        if hook is not None:
            decisions = CounterMetricFamily(
                "wsgw_connect_decisions",
                "Handshakes the app was asked about (--connect-url), by outcome: admitted, refused (4xx), "
                "timeout, app_error (5xx), unreachable.",
                labels=["result"],
            )
            for result, count in sorted(hook.counts.items()):
                decisions.add_metric([result], count)
            yield decisions
            yield GaugeMetricFamily(
                "wsgw_connect_waiting", "Handshakes waiting for the app's decision.", value=hook.asking
            )

        cluster = self.cluster
        if cluster is not None:
            cstats = cluster.stats
            yield GaugeMetricFamily(
                "wsgw_redis_up", "1 while Redis is reachable (--engine redis).", value=int(cluster.up)
            )
            yield GaugeMetricFamily(
                "wsgw_cluster_nodes", "Live nodes at the last presence refresh.", value=cstats.nodes
            )
            for name, text, value in (
                (
                    "wsgw_cluster_commands_published",
                    "send/close commands published to the other nodes.",
                    cstats.published,
                ),
                ("wsgw_cluster_commands_applied", "send/close commands from other nodes applied here.", cstats.applied),
                (
                    "wsgw_cluster_messages_malformed",
                    "Messages and presence records from Redis skipped as malformed.",
                    cstats.malformed,
                ),
                ("wsgw_cluster_partial_answers", "send/close answers some node did not contribute to.", cstats.partial),
            ):
                yield CounterMetricFamily(name, text, value=value)


class TLSCollector:
    """
    The listeners' certificate (C{--tls-cert}): when it expires, so an
    alert can fire before clients refuse it, and how its reloads went.
    """

    def __init__(self, tls: ServerTLS):
        self.tls = tls

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "wsgw_tls_certificate_expiry_timestamp_seconds",
            "When the certificate the listeners serve expires (--tls-cert), in seconds since the epoch.",
            value=self.tls.current.not_after.timestamp(),
        )
        reloads = CounterMetricFamily(
            "wsgw_tls_reloads", "Reloads of --tls-cert and --tls-key (SIGHUP), by result.", labels=["result"]
        )
        for result, count in sorted(self.tls.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads


class BuildInfo:
    """C{wsgw_build_info{version}}: which wsgw a scrape came from."""

    def collect(self) -> Iterator[Any]:
        from . import __version__  # the package imports this module first

        info = GaugeMetricFamily("wsgw_build_info", "The running wsgw's version; always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class MetricsPage(Resource):
    """C{GET /metrics} in the Prometheus text format."""

    isLeaf = True

    def __init__(
        self,
        gateway: Gateway,
        cluster: Optional[Cluster] = None,
        connect_hook: Optional[ConnectHook] = None,
        tls: Optional[ServerTLS] = None,
    ):
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway, cluster, connect_hook))
        if tls is not None:
            self.registry.register(TLSCollector(tls))
        self.registry.register(BuildInfo())
        # The standard process_* metrics (CPU, memory, open files), from /proc.
        ProcessCollector(registry=self.registry)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)
