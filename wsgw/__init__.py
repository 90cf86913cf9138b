"""
wsgw: a WebSocket gateway that holds client connections at C{/ws},
forwards their events to an app over HTTP, and lets the app push to and
close them through C{/tapr/ws/conn/}.

The public surface, for embedding in an existing Twisted application:

  - L{Config}: the settings;
  - L{make_gateway}: the gateway (connections, forwarding);
  - L{make_resource}: a C{twisted.web} resource serving C{ws} and the API;
  - L{make_service}: a service that listens, runs heartbeats and drains.
"""

from .config import Config
from .gateway import Gateway
from .service import make_gateway, make_service
from .web import make_resource

__all__ = ["Config", "Gateway", "make_gateway", "make_resource", "make_service"]
__version__ = "0.1.0"
