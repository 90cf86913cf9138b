"""
The cheaper paths of a C{/send} answer exactly as the general ones they
stand in for: the same answer bytes, frames, counters and log lines, the
same connections selected, the same JSON read and written, the same heads
taken or handed to twisted.web.  Each test runs both on the same inputs.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_apiserver import LOCAL, REMOTE, Served
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import version as server_version
from zope.interface import implementer

from fakes import FakeApp, make_gateway, node_of, open_conn
from wsgw.api import payload_json, reach_answer, reach_body
from wsgw.apiserver import MAX_HEAD, MAX_HEADERS, LeanRequest, parse_head
from wsgw.config import Config
from wsgw.interfaces import IConnections, IConnectionsHere, Reach
from wsgw.jsonio import decode_json, to_json
from wsgw.registry import AccessType, Connection, Registry, Targets
from wsgw.web import make_resource

# -- the answer's body -----------------------------------------------------------


@given(matched=st.integers(0, 10**15), partial=st.booleans())
def test_the_reach_body_is_the_answer_json_encoded(matched, partial):
    reach = Reach(matched, partial)
    assert reach_body(reach) == to_json(reach_answer(reach)) + b"\n"


# -- JSON in and out -------------------------------------------------------------

_ODD_TEXT = st.sampled_from(["", "é", "\ud800", "a\udfffb", "\u2028", '"\\/', "\x00\x1f", "日本"])
_TEXT = st.one_of(st.text(max_size=8), _ODD_TEXT)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=12,
)


@given(value=st.one_of(_JSON, st.sampled_from([float("inf"), -float("inf")])))
def test_a_payload_is_encoded_as_to_json_encodes_it(value):
    assert payload_json(value) == to_json(value)


def _outcome(decode, text):
    try:
        return "ok", repr(decode(text))
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


_GARBAGE = st.sampled_from(
    ['{"a":1} ', ' {"a":1}', '{"a":1}{}', '{"a":NaN}', '{"a":', "{}", "{ }", '{"a":"\\ud800"}', "{,}"]
    + ["", " ", "1", "1 ", "\t1", "[1]x", '"a"', "nul", "-", "Infinity", "[" * 5000, "\r\n[]\n"]
)


@given(
    text=st.one_of(
        _JSON.map(json.dumps),
        st.dictionaries(_TEXT, _JSON, max_size=3).map(lambda d: json.dumps(d, separators=(",", ":"))),
        st.dictionaries(_TEXT, _JSON, max_size=3).map(lambda d: json.dumps(d)[:-1]),
        _GARBAGE,
        st.text(alphabet='{}[]":,1 a\\\t\n\r', max_size=12),
    )
)
def test_json_is_read_as_the_standard_decoder_reads_it(text):
    """
    decode_json reads most texts with the decoder's scanner alone: the
    same value, and for anything else the same error, as the decoder
    (Python's, refusing NaN and Infinity) reads whole.
    """
    assert _outcome(decode_json, text) == _outcome(_STANDARD.decode, text)


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


_STANDARD = json.JSONDecoder(parse_constant=_refuse)


# -- selecting connections ---------------------------------------------------------

_IDS = ["a", "b", "c", "d", "e", "f"]
_NAMES = ["u", "v", "", "w"]
_TOKENS = ["t1", "t2", "t3"]


@settings(max_examples=300)
@given(
    conns=st.lists(
        st.tuples(st.sampled_from(_IDS), st.sampled_from(_NAMES), st.sampled_from(_TOKENS), st.booleans()),
        unique_by=lambda c: c[0],
    ),
    conn_ids=st.lists(st.sampled_from(_IDS + ["nope"]), max_size=2),
    users=st.lists(st.sampled_from(_NAMES + ["nobody"]), max_size=2),
    tokens=st.lists(st.sampled_from(_TOKENS), max_size=2),
    access=st.sampled_from(list(AccessType)),
)
def test_the_common_selections_are_the_general_rule(conns, conn_ids, users, tokens, access):
    registry = Registry()
    for conn_id, user, token, public in conns:
        registry.add(Connection(conn_id=conn_id, user_name=user, token=token, access_public=public))
    targets = Targets(conn_ids=conn_ids, users=users, tokens=tokens, access=access)
    general = registry._select(targets.conn_ids, targets.users, targets.tokens, targets.access)
    assert registry.select(targets) == general


def test_targets_take_the_access_type_as_a_number_or_a_member():
    assert Targets(users=["u"], access=1).access is AccessType.PRIVATE
    assert Targets(users=["u"], access=AccessType.PUBLIC).access is AccessType.PUBLIC


# -- the local send --------------------------------------------------------------


@implementer(IConnections)
class Hidden:
    """A gateway behind the interface only: the API takes its general path."""

    def __init__(self, gateway):
        self.gateway = gateway

    def send(self, payload, targets, binary=False):
        return self.gateway.send(payload, targets, binary)

    def close(self, targets):
        return self.gateway.close(targets)

    def listing(self):
        return self.gateway.listing()


def _gateway():
    gateway = make_gateway(Clock(), FakeApp())
    open_conn(gateway, "a1", "alice", token="abc")
    open_conn(gateway, "a2", "alice", public=True)
    open_conn(gateway, "b1", "bob", token="tb")
    return gateway


_BODIES = [
    b'{"conn_id":"a1","payload":{"x":1}}',
    b'{"conn_id":"nope","payload":1}',
    b'{"users":["alice"],"payload":"hi"}',
    b'{"users":["alice"],"users_access_type":2,"text":"t"}',
    b'{"tokens":["tb"],"binary":"aGk="}',
    b'{"conn_id":"a1","text":"a","payload":1}',
    b'{"conn_id":"a1","text":"\\ud800"}',
    b'{"conn_id":"a1","binary":"!"}',
    b'{"conn_id":5}',
    b'{"payload":1}',
    b'{"users":"alice"}',
    b"[1]",
    b"{nope",
    b"  ",
    b'{"conn_id":"b1","payload":{"n":1e999}}',
]


def _served(connections, gateway, bodies):
    lines = []

    def observer(event):
        if event.get("log_namespace", "").startswith("wsgw"):
            lines.append(formatEvent(event))

    treq = StubTreq(make_resource(node_of(gateway, Config(max_api_body=1000), cluster=connections)))
    answers = []
    globalLogPublisher.addObserver(observer)
    try:
        for body in bodies:
            d = treq.request("POST", "http://127.0.0.1:40010/tapr/ws/conn/send", data=body)
            response = treq.flush() or d.result
            content = treq.content(response).result
            headers = sorted(h for h in response.headers.getAllRawHeaders() if h[0] != b"Date")
            answers.append((response.code, headers, content))
    finally:
        globalLogPublisher.removeObserver(observer)
    frames = {c.conn_id: list(c.channel.frames) for c in gateway.registry}
    return answers, frames, gateway.stats, lines


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(st.sampled_from(_BODIES), min_size=1, max_size=5))
def test_the_local_send_answers_as_the_general_one(bodies):
    fast_gateway, general_gateway = _gateway(), _gateway()
    assert IConnectionsHere.providedBy(fast_gateway) and not IConnectionsHere.providedBy(Hidden(general_gateway))
    fast = _served(fast_gateway, fast_gateway, bodies)
    general = _served(Hidden(general_gateway), general_gateway, bodies)
    assert fast == general


# -- the request head --------------------------------------------------------------


def _reference_parse_head(head, max_body):
    """The hand-written parser before the regular expressions: what parse_head must agree with."""
    tchars = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    visible = bytes(range(0x21, 0x7F))
    if len(head) > MAX_HEAD or b"\x00" in head:
        return None
    lines = head.split(b"\r\n")
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, http_version = parts
    if method not in (b"GET", b"POST") or http_version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if not target.startswith(b"/tapr/") or target.translate(None, visible):
        return None
    if breaks > MAX_HEADERS:
        return None
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, tchars):
            return None
        name = name.lower()
        value = value.strip(b" \t")
        headers.setdefault(name, []).append(value)
    for name in (b"transfer-encoding", b"expect", b"upgrade"):
        if name in headers:
            return None
    length = 0
    given_length = headers.get(b"content-length")
    if given_length is not None:
        if len(given_length) != 1 or not given_length[0].isdigit():
            return None
        length = int(given_length[0])
        if length > max_body:
            return None
    return method, target, http_version, headers, length


_REQUEST_LINES = st.one_of(
    st.sampled_from(
        [
            b"POST /tapr/ws/conn/send HTTP/1.1",
            b"GET /tapr/ws/conn/list?x=%41 HTTP/1.0",
            b"GET /tapr/ HTTP/1.1",
            b"PUT /tapr/ws/conn/send HTTP/1.1",
            b"POST /tapr/ws/conn/send HTTP/2.0",
            b"POST  /tapr/ws/conn/send HTTP/1.1",
            b"POST /tapr/ws/conn/send HTTP/1.1 ",
            b"POST /tapr/ws/c\x7fonn HTTP/1.1",
            b"POST /ws HTTP/1.1",
            b"post /tapr/ws/conn/send HTTP/1.1",
        ]
    ),
    st.builds(
        lambda m, t: b"%s /tapr/%s HTTP/1.1" % (m, t),
        st.sampled_from([b"GET", b"POST"]),
        st.binary(max_size=6),
    ),
)
_HEADER_LINES = st.one_of(
    st.sampled_from(
        [
            b"Host: 127.0.0.1:20001",
            b"Content-Type: application/json",
            b"Content-Length: 12",
            b"Content-Length: 12000",
            b"content-length: 0012",
            b"Content-Length: -1",
            b"Connection: keep-alive",
            b"Authorization: Bearer s3cret",
            b"X-Odd:   spaced value \t",
            b"X-Empty:",
            b"Transfer-Encoding: chunked",
            b"Expect: 100-continue",
            b"Upgrade: websocket",
            b"Bad Name: x",
            b": no name",
            b" folded",
            b"NoColon",
            b"X-Ctl: a\x01\x7f\xffb",
        ]
    ),
    st.builds(lambda n, v: n + b":" + v, st.binary(max_size=4), st.binary(max_size=6)),
    st.binary(max_size=8),
)


@settings(max_examples=1000, deadline=None)
@given(line=_REQUEST_LINES, headers=st.lists(_HEADER_LINES, max_size=6))
def test_the_head_parser_takes_what_the_hand_written_one_took(line, headers):
    head = b"\r\n".join([line, *headers])
    assert parse_head(head, 1000) == _reference_parse_head(head, 1000)


def test_the_head_parser_bounds_the_header_lines_and_the_head_as_before():
    many = b"\r\n".join([b"GET /tapr/ HTTP/1.1"] + [b"X: 1"] * MAX_HEADERS)
    assert parse_head(many, 0) is not None and parse_head(many + b"\r\nX: 1", 0) is None
    long = b"GET /tapr/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
    assert parse_head(long, 0) is None is _reference_parse_head(long, 0)


# -- the answer written in one piece -------------------------------------------------


class _Answers(Resource):
    """Answers the lean channel writes in one piece, and one it does not."""

    isLeaf = True

    def render(self, request):
        kind = request.postpath[0]
        if kind == b"nocontent":
            request.setResponseCode(204)
            return b"dropped"
        if kind == b"plain":
            return b"no content type"
        if kind == b"written":
            request.write(b"first ")
            return b"then returned"
        if kind == b"json":
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"x-a", b"1")
            return b"{}"
        request.setResponseCode(418, b"Teapot")
        return b""


class _Channel:
    peer = LOCAL
    transport = None

    def __init__(self):
        self.written = []

    def answered(self, data, after=None):
        self.written.append(data)


def _written_and_finished(request, site):
    """LeanRequest.process before the one-piece answer: setHeader, write, finish."""
    request._out[b"Server"] = server_version
    request._out[b"Date"] = b"-"
    body = site.getResourceFor(request).render(request)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


@pytest.mark.parametrize("kind", [b"nocontent", b"plain", b"written", b"json", b"teapot"])
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_an_answer_written_in_one_piece_is_what_write_and_finish_wrote(kind, version, monkeypatch):
    served = Served(Config(), True, LOCAL)
    served.site.resource.children[b"tapr"].putChild(b"answers", _Answers())
    monkeypatch.setattr("wsgw.apiserver.http_date", lambda: b"-")
    outputs = []
    for process in (LeanRequest.process, _written_and_finished):
        channel = _Channel()
        request = LeanRequest(channel, b"GET", b"/tapr/answers/" + kind, version, {b"host": [b"x"]}, b"")
        process(request, served.site)
        assert request.finished
        outputs.append(channel.written)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1
    served.close()


# -- the tree walk -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/tapr/ws/conn/send",
        b"/tapr/ws/conn/send/more",
        b"/tapr/ws/conn/%73end",
        b"/tapr/ws/conn/",
        b"/tapr/ws/conn",
        b"/tapr/",
        b"/metrics",
        b"/healthz",
        b"/nope/deeper",
        b"/",
    ],
)
@pytest.mark.parametrize("config", [Config(), Config(admin_token="s3cret")])
def test_the_site_walks_the_tree_as_twisted_web_does(path, config):
    """GatewaySite.getResourceFor, inlined, finds what Site.getResourceFor finds and leaves the request alike."""
    from twisted.web.server import Site

    served = Served(config, True, LOCAL)
    found = []
    # The site's walk twice (the second from its remembered routes), a
    # caller it refuses, and twisted.web's own walk.
    walks = [served.site.getResourceFor] * 2 + [lambda request: Site.getResourceFor(served.site, request)]
    for peer in (LOCAL, REMOTE):
        for walk in walks:
            request = _request(path, peer)
            resource = walk(request)
            found.append(
                (
                    peer,
                    type(resource),
                    vars(resource).get("status"),
                    request.prepath,
                    request.postpath,
                    request.sitepath,
                )
            )
            assert request.site is served.site
    assert found[0] == found[1] == found[2]
    assert found[3] == found[4] == found[5]
    served.close()


def test_the_api_endpoints_have_routes_and_other_paths_the_walk():
    """The API's endpoints are found without the walk (the door still asked);
    paths made by getChild, below a leaf or outside the API are walked."""
    from wsgw.web import GuardedApi, Route, static_route

    def root_conn(root):
        return root.children[b"tapr"].children[b"ws"].children[b"conn"]

    served = Served(Config(), True, LOCAL)
    root = served.site.resource
    for name in (b"send", b"close", b"list"):
        route = static_route(root, [b"tapr", b"ws", b"conn", name])
        assert route is not None and isinstance(route.door, GuardedApi) and route.leaf.isLeaf
    for segments in ([b"tapr", b"ws", b"conn", b"nope"], [b"tapr", b"ws", b"conn", b"send", b"x"], [b"tapr"], []):
        route = static_route(root, segments)
        assert route is None or (route.door is None and not route.leaf.isLeaf), segments
    # Ending at the door: the walk's outcome is the door itself (which asks when it renders).
    assert static_route(root, [b"tapr", b"ws", b"conn"]) == Route([b"tapr", b"ws", b"conn"], root_conn(root), None)
    served.site.getResourceFor(_request(b"/healthz"))
    assert served.site._routes == {b"/healthz": None}  # not an API path: walked, and remembered as such
    served.close()


def _request(path, peer=LOCAL):
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([])
    request.path = path
    request.postpath = path[1:].split(b"/")
    request.prepath = []
    request.client = peer
    return request


def test_a_route_whose_path_and_segments_disagree_is_walked():
    """The routes are looked up by path and used only for the segments they were worked out for."""
    served = Served(Config(), True, LOCAL)
    served.site.getResourceFor(_request(b"/tapr/ws/conn/send"))
    odd = _request(b"/tapr/ws/conn/send")
    odd.postpath = [b"tapr", b"ws", b"conn", b"list"]
    assert type(served.site.getResourceFor(odd)).__name__ == "ListEndpoint"
    served.close()


# -- reading the targets -------------------------------------------------------------

_TARGET_VALUES = st.one_of(
    st.none(),
    st.sampled_from(["", "c1", "u", 0, True, [], ["u"], ["", "u"], ["u", "v", "u"], ["u", 1], [1], {}]),
)


@given(
    fields=st.dictionaries(
        st.sampled_from(["conn_id", "conns", "users", "tokens", "users_access_type", "payload"]), _TARGET_VALUES
    ),
    conn_field=st.sampled_from(["conn_id", "conns"]),
)
def test_the_targets_of_one_conn_id_are_what_the_rules_read(fields, conn_field):
    """read_targets' shortcut for a body naming one conn id alone, against its rules in full."""
    from wsgw import api

    def general(body, conn_field, what):
        conn_ids = (
            api.string_list(body, conn_field, drop_empty=True)
            if conn_field == "conns"
            else api.optional_string(body, conn_field)
        )
        targets = Targets(
            conn_ids=conn_ids,
            users=api.string_list(body, "users"),
            tokens=api.string_list(body, "tokens"),
            access=api.access_type(body),
        )
        if not targets:
            raise api.ApiError(400, f"{what} target is nil: give {conn_field}, users or tokens")
        return targets

    outcomes = []
    for read in (api.read_targets, general):
        try:
            outcomes.append(read(fields, conn_field, "send message"))
        except api.ApiError as e:
            outcomes.append((e.status, e.message))
    assert outcomes[0] == outcomes[1]


@given(
    conn_ids=st.lists(st.text(max_size=3), max_size=3).map(tuple),
    users=st.lists(st.text(max_size=3), max_size=3).map(tuple),
)
def test_plain_targets_are_the_record_its_constructor_makes(conn_ids, users):
    """plain_targets sets the fields Targets' converters would have, and no others."""
    import attr

    from wsgw.registry import plain_targets

    made = plain_targets(conn_ids=conn_ids, users=users)
    assert made == Targets(conn_ids=conn_ids, users=users)
    assert [f.name for f in attr.fields(Targets)] == ["conn_ids", "users", "tokens", "access"]
    assert type(made.access) is AccessType and type(made.tokens) is tuple


# -- framing -------------------------------------------------------------------------


@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([0, 125, 126, 127, 0xFFFF, 0x10000]).map(lambda n: b"x" * n),
    ),
    binary=st.booleans(),
)
def test_a_frame_prepared_here_is_the_one_autobahn_prepares(payload, binary):
    """prepare_frame's frame has the fields, the same values, that PreparedMessage's constructor sets."""
    from autobahn.websocket.protocol import PreparedMessage

    from wsgw.internals import prepare_frame

    ours = prepare_frame(payload, binary)
    assert type(ours) is PreparedMessage
    assert vars(ours) == vars(PreparedMessage(payload, binary, False, False))


def test_the_reaches_made_once_are_the_ones_made_per_call():
    """A send here answers with a shared Reach for a usual count: equal to a new one, and unchangeable."""
    import attr

    from wsgw.api import _REACHES

    assert all(reach == Reach(matched) for matched, reach in enumerate(_REACHES))
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        _REACHES[1].matched = 2  # type: ignore[misc]


def _read_json_object_as_before(raw: bytes):
    """read_json_object's reading of a body before it skipped the stripped copy."""
    from wsgw.api import ApiError

    try:
        body = _STANDARD.decode(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


@given(
    raw=st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"", b" ", b"\t\r\n", b"{", b"{}", b" {} ", b"{\xff}", b'{"a":1}', b"[]", b"{} x", b"\x0b{}"]),
        st.builds(lambda a, b: a + b"{" + b, st.binary(max_size=4), st.binary(max_size=8)),
    )
)
def test_a_body_is_read_as_before_it_was_stripped_only_when_blank(raw):
    """A body starting with a brace is read without a stripped copy: the same value or the same refusal."""
    from io import BytesIO

    from wsgw.api import ApiError, read_json_object

    request = type("R", (), {"content": BytesIO(raw)})()
    outcomes = []
    for read in (lambda: read_json_object(request, 1 << 20), lambda: _read_json_object_as_before(raw)):
        try:
            outcomes.append(("ok", read()))
        except ApiError as e:
            outcomes.append((e.status, e.message))
    assert outcomes[0] == outcomes[1]
