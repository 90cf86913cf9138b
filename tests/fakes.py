"""
In-memory stand-ins for the gateway's edges: the app and client channels.
"""

import json

from twisted.internet.defer import Deferred

from wsgw.forwarder import AppForwarder
from wsgw.gateway import Gateway
from wsgw.registry import Connection


class FakeApp:
    """
    Records every POST attempt; each stays pending until the test answers it.
    """

    def __init__(self):
        self.attempts = []  # (event dict, headers, Deferred)

    def __call__(self, body, headers):
        d = Deferred()
        self.attempts.append((json.loads(body), headers, d))
        return d

    @property
    def pending(self):
        return [(event, headers, d) for event, headers, d in self.attempts if not d.called]

    def answer_all(self):
        """Accept every pending attempt, including ones that answering starts."""
        while self.pending:
            self.pending[0][2].callback(200)

    def summary(self):
        return [(e["conn_id"], e["action"], e["data"]) for e, _, _ in self.attempts]


class FakeChannel:
    """What a WebSocket protocol offers the gateway, recorded."""

    def __init__(self):
        self.frames = []
        self.closed_with = None
        self.paused = False

    def deliver(self, frame):
        self.frames.append(frame)

    def close_with(self, code, reason):
        self.closed_with = (code, reason)

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


def make_gateway(clock, post=None, **forwarder_options):
    forwarder = AppForwarder(clock=clock, post=post, **forwarder_options)
    return Gateway(clock=clock, forwarder=forwarder)


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
