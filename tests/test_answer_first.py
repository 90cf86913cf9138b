"""
A C{/send} to several connections served by the daemon's API channel is
answered as soon as the gateway has chosen whom it reaches, and its
frames are written right after, in the same turn: an app that broadcasts
to thousands is not kept waiting for the fan-out (a single frame is
written at once, before its answer, as soon either way).  Nothing else moves: the answer says how many
it reaches, every frame is written before the next request is read, in
order, and a failure for one connection is logged and costs the others
nothing.  Through twisted.web (an embedding's own site) the frames go
first, as they always have.
"""

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from fakes import FakeChannel, open_conn
from wsgw.apiserver import LeanRequest
from wsgw.config import Config
from wsgw.service import make_node
from wsgw.web import GatewaySite, make_resource


def _peer():
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", "127.0.0.1", 50000)


class _Transport(StringTransport):
    def __init__(self, log):
        super().__init__(peerAddress=_peer())
        self.log = log

    def write(self, data):
        self.log.append(("answer", data.rpartition(b"\r\n\r\n")[2]))
        super().write(data)


class _Channel(FakeChannel):
    def __init__(self, log, conn_id, broken=False):
        super().__init__()
        self.log, self.conn_id, self.broken = log, conn_id, broken

    def deliver(self, frame):
        if self.broken:
            raise RuntimeError("a bug in one connection's channel")
        self.log.append(("frame", self.conn_id, frame))


class _Api:
    """The daemon's API channel over a transport that logs, beside gateway connections that log."""

    def __init__(self, conns, broken=()):
        self.log = []
        clock = Clock()
        config = Config()
        self.node = make_node(config, reactor=clock)
        self.site = GatewaySite(make_resource(self.node), config, reactor=clock)
        for conn_id in conns:
            conn = open_conn(self.node.gateway, conn_id, "alice")
            conn.channel = _Channel(self.log, conn_id, broken=conn_id in broken)
        self.channel = self.site.api_channel(_peer())
        self.transport = _Transport(self.log)
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)

    def post(self, *bodies):
        """The bodies as pipelined /send calls, in one read."""
        data = b"".join(
            b"POST /tapr/ws/conn/send HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in bodies
        )
        self.channel.dataReceived(data)


def _frame(payload):
    """A prepared frame's payload (what the daemon's frames carry)."""
    return payload.payload


def test_the_answer_goes_out_before_the_frames_and_every_frame_in_the_same_turn():
    api = _Api(["c1", "c2", "c3"])
    api.post(b'{"users":["alice"],"payload":{"n":1}}')
    kinds = [entry[0] for entry in api.log]
    assert kinds == ["answer", "frame", "frame", "frame"]
    assert json.loads(api.log[0][1]) == {"code": 0, "message": "success", "data": {"matched": 3}}
    assert [(conn_id, _frame(frame)) for _, conn_id, frame in api.log[1:]] == [
        ("c1", b'{"n":1}'),
        ("c2", b'{"n":1}'),
        ("c3", b'{"n":1}'),
    ]
    assert api.node.gateway.stats.frames_out == 3


def test_pipelined_sends_keep_their_order_answer_by_answer():
    api = _Api(["c1", "c2"])
    api.post(b'{"conn_id":"c1","payload":1}', b'{"users":["alice"],"payload":2}', b'{"conn_id":"nobody","payload":3}')
    shown = [(e[0], json.loads(e[1])["data"]["matched"]) if e[0] == "answer" else (e[1], _frame(e[2])) for e in api.log]
    # One frame goes at once, before its answer; a fan-out after it.
    assert shown == [("c1", b"1"), ("answer", 1), ("answer", 2), ("c1", b"2"), ("c2", b"2"), ("answer", 0)]


def test_a_connection_whose_delivery_fails_is_logged_and_the_others_get_theirs():
    api = _Api(["c1", "c2", "c3"], broken={"c2"})
    failures = []
    observer = failures.append
    globalLogPublisher.addObserver(observer)
    try:
        api.post(b'{"users":["alice"],"payload":"x"}', b'{"conn_id":"c3","payload":"y"}')
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e[1] if e[0] == "frame" else e[0] for e in api.log] == ["answer", "c1", "c3", "c3", "answer"]
    failed = [e for e in failures if e.get("log_failure") is not None]
    assert [e["conn_id"] for e in failed] == ["c2"]
    assert failed[0]["log_failure"].check(RuntimeError)


def test_through_twisted_web_the_frames_go_before_the_answer():
    clock = Clock()
    node = make_node(Config(), reactor=clock)
    conn = open_conn(node.gateway, "c1", "alice")
    answered = []
    client = StubTreq(make_resource(node))
    d = client.post("http://127.0.0.1/tapr/ws/conn/send", data=b'{"conn_id":"c1","payload":7}')
    d.addCallback(lambda response: (answered.append(len(conn.channel.frames)), client.json_content(response))[1])
    client.flush()
    assert answered == [1]  # the frame was there when the answer came
    assert _frame(conn.channel.frames[0]) == b"7"
    assert d.result == {"code": 0, "message": "success", "data": {"matched": 1}}


class _GoneChannel:
    def answered(self, data, after=None):  # pragma: no cover - the request is told it is gone first
        raise AssertionError("answered on a channel that is gone")


def test_work_after_an_answer_is_done_even_when_the_caller_is_gone_or_it_is_answered_already():
    done = []
    request = LeanRequest(_GoneChannel(), b"POST", b"/tapr/ws/conn/send", b"HTTP/1.1", {}, b"")
    request.connectionLost()  # the app hung up before its answer was written
    request.after_answer(lambda: done.append("before"))
    request.finish()
    request.after_answer(lambda: done.append("after"))
    assert done == ["before", "after"]
