"""
wsgw: a WebSocket gateway that holds client connections at C{/ws},
forwards their events to an app over HTTP, and lets the app push to and
close them through C{/tapr/ws/conn/}.

The public surface, for embedding in an existing Twisted application:

  - L{Config}: the settings;
  - L{make_node}: a gateway node (connections, forwarding, and with the
    Redis engine its part in a cluster);
  - L{make_resource}: a C{twisted.web} resource serving a node's C{ws} and
    its API;
  - L{make_service}: a service that listens, runs heartbeats and drains.
"""

from .config import Config
from .gateway import Gateway
from .service import Node, make_node, make_service
from .web import make_resource

__all__ = ["Config", "Gateway", "Node", "make_node", "make_resource", "make_service"]
__version__ = "0.1.0"
