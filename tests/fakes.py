"""
In-memory stand-ins for the gateway's edges: the app and client channels.
"""

import json

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.defer import Deferred
from zope.interface import implementer

from wsgw.config import Config
from wsgw.forwarder import AppForwarder
from wsgw.gateway import Gateway
from wsgw.interfaces import IChannel, IEventSink
from wsgw.online import OnlineUsers, PresenceEvents
from wsgw.registry import Connection, LiveConnections
from wsgw.service import Node


@implementer(IEventSink)
class FakeApp:
    """
    Records every POST attempt; each stays pending until the test answers it.
    """

    def __init__(self):
        self.attempts = []  # (event dict, Event, Deferred)
        self.batches = []  # ([event dict], [Event], Deferred)

    def post(self, event):
        d = Deferred()
        self.attempts.append((json.loads(event.body), event, d))
        return d

    def post_batch(self, events):
        d = Deferred()
        self.batches.append(([json.loads(e.body) for e in events], events, d))
        return d

    @property
    def pending(self):
        return [(event, headers, d) for event, headers, d in self.attempts if not d.called]

    def answer_all(self):
        """Accept every pending attempt, including ones that answering starts."""
        while self.pending:
            self.pending[0][2].callback(None)

    def summary(self):
        return [(e["conn_id"], e["action"], e["data"]) for e, _, _ in self.attempts]


@implementer(IChannel)
class FakeChannel:
    """What a WebSocket protocol offers the gateway, recorded."""

    def __init__(self):
        self.frames = []
        self.closed_with = None
        self.paused = False
        self.pings = 0

    def deliver(self, frame):
        self.frames.append(frame)

    def ping(self):
        self.pings += 1

    def close_with(self, code, reason):
        self.closed_with = (code, reason)

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


def make_gateway(
    clock, sink=None, *, prepare=None, registry=None, membership=None, presence_grace=None, **forwarder_options
):
    """
    A gateway wired as the daemon's is, forwarding to C{sink}; its frames
    are the payloads themselves unless C{prepare} says otherwise.  With
    C{presence_grace}, it posts presence events as C{--presence-events}.
    """
    live = LiveConnections(clock, prepare or (lambda payload, binary: payload))
    forwarder = AppForwarder(clock=clock, sink=sink, throttle=live, replies=live, **forwarder_options)
    online = None
    if presence_grace is not None:
        online = OnlineUsers(clock, PresenceEvents(forwarder).in_stream, presence_grace)
    given = {"prepare": prepare, "registry": registry, "membership": membership, "online": online}
    return Gateway(
        clock=clock,
        forwarder=forwarder,
        live=live,
        **{name: value for name, value in given.items() if value is not None},
    )


def open_conn(gateway, conn_id, user="alice", token=None, public=False, cookie=""):
    conn = Connection(
        conn_id=conn_id,
        user_name=user,
        token=token or f"tok-{conn_id}",
        access_public=public,
        cookie=cookie,
        channel=FakeChannel(),
    )
    gateway.opened(conn)
    return conn


def node_of(gateway, config=None, cluster=None):
    """The L{Node} of an in-memory gateway, as make_resource takes it."""
    return Node(config or Config(), gateway.clock, gateway, cluster or gateway, cluster)


class RecordingClient(WebSocketClientProtocol):
    """An Autobahn client that records what it receives and how it closed."""

    def __init__(self):
        super().__init__()
        self.received = []
        self.close_info = None

    def onMessage(self, payload, isBinary):
        self.received.append(payload)

    def onClose(self, wasClean, code, reason):
        self.close_info = (code, reason)


class _Port:
    _realPortNumber = 40010


def tcp_pair(client=False):
    """
    A real TCP transport (Twisted's C{tcp.Server}, or with C{client} a
    C{tcp.Client} in the same state, as the agent's to the app is) over one
    end of a socket pair, on a memory reactor; the other end, to read what
    it sends; the reactor.
    """
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 5555), _Port(), 1, reactor)
    if client:
        connected = tcp.Client.__new__(tcp.Client)
        connected.__dict__.update(transport.__dict__)
        transport = connected
    return transport, theirs, reactor
