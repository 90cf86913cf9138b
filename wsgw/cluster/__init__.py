"""
The Redis engine (C{--engine redis}): several wsgw nodes as one gateway.

Importable only with the optional C{txredisapi} installed; the memory
engine never imports it.

  - L{wsgw.cluster.node}: this node's presence and the cluster-wide
    C{send}/C{close}/C{list};
  - L{wsgw.cluster.online}: presence events (C{online}/C{offline}) decided
    once for the whole cluster;
  - L{wsgw.cluster.wire}: the keys, channels and messages in Redis;
  - L{wsgw.cluster.redislink}: the connections to Redis.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from ..config import Config
from ..gateway import Gateway
from ..interfaces import IEventQueue
from ..registry import Registry
from .node import Cluster, ClusterStats, Presence
from .online import ClusterOnline
from .wire import Keys

__all__ = [
    "Cluster",
    "ClusterOnline",
    "ClusterStats",
    "Presence",
    "default_node_id",
    "make_cluster",
    "make_online",
    "make_presence",
]


def default_node_id(config: Config) -> str:
    """The host name and the first listen endpoint: unique per host and port, stable across restarts."""
    where = config.listen[0] if config.listen else (config.admin_listen or ("embedded",))[0]
    return "".join(c if "!" <= c <= "~" else "_" for c in f"{socket.gethostname()}/{where}")[:200]


def make_presence(config: Config, registry: Registry) -> Presence:
    """The presence of a node that holds the connections of C{registry}."""
    return Presence(
        registry,
        config.node_id or default_node_id(config),
        Keys(config.redis_prefix),
        presence_ttl=config.presence_ttl,
    )


def make_online(config: Config, presence: Presence, queue: IEventQueue, clock: Any) -> ClusterOnline:
    """This node's part in the cluster's presence events (C{--presence-events})."""
    return ClusterOnline(
        presence.registry,
        queue,
        clock,
        presence.node_id,
        presence.instance,
        presence.keys,
        grace=config.presence_grace,
        presence_ttl=config.presence_ttl,
        decide_timeout=config.cluster_timeout,
    )


def make_cluster(
    config: Config, gateway: Gateway, presence: Presence, clock: Any, online: Optional[ClusterOnline] = None
) -> Cluster:
    """The cluster-wide API of a node, and the service that links it to Redis."""
    return Cluster(
        gateway, presence, config.redis_address(), clock, reply_timeout=config.cluster_timeout, online=online
    )
