"""
C{/healthz} and C{/readyz}: whether the process answers, and whether a load
balancer should send it clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from .gateway import Gateway
from .jsonio import json_response

if TYPE_CHECKING:
    from .cluster import Cluster


class Health(Resource):
    """C{GET /healthz}: the process answers."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return json_response(request, 200, {"code": 0, "message": "ok"})


class Readiness(Resource):
    """
    C{GET /readyz}: ready once every listener is up, unless the app has
    been unreachable for a sustained while (L{wsgw.forwarder.AppHealth}):
    one failed attempt is retried and must not take a healthy gateway out
    of rotation.  While the app fails, but not for long enough, the answer
    stays 200 and says C{"app": "failing"}.

    A cluster node whose Redis is down is ready but degraded: it serves its
    own connections, and taking every node out of a load balancer because
    Redis is down would turn a partial outage into a full one.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, cluster: Optional[Cluster] = None):
        super().__init__()
        self.gateway = gateway
        self.cluster = cluster

    def render_GET(self, request: Request) -> bytes:
        forwarder = self.gateway.forwarder
        app = forwarder.health.state if forwarder.enabled else "not configured"
        listening = self.gateway.accepting
        ready = listening and app != "down"
        body: Dict[str, Any] = {
            "code": 0 if ready else 503,
            "message": "ready" if ready else ("not listening yet" if not listening else "the app is unreachable"),
            "listening": listening,
            "app": app,
            "connections": len(self.gateway.registry),
        }
        cluster = self.cluster
        if cluster is not None:
            body["redis"] = "up" if cluster.up else "down"
            body["nodes"] = cluster.stats.nodes
            if ready and not cluster.up:
                body["message"] = "ready, degraded: redis is unreachable, so send, close and list reach this node only"
        return json_response(request, 200 if ready else 503, body)
