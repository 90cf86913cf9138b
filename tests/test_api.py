"""
The app's API answers as Olares apps expect, and says clearly what is wrong.
"""

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from fakes import FakeApp, make_gateway, node_of, open_conn
from wsgw.config import Config
from wsgw.gateway import CLOSE_BY_APP
from wsgw.web import make_resource

BASE = "http://127.0.0.1:40010/tapr/ws/conn/"


@pytest.fixture
def gateway():
    gw = make_gateway(Clock(), FakeApp())
    open_conn(gw, "a1", "alice", token="abc")
    open_conn(gw, "a2", "alice", public=True)
    open_conn(gw, "b1", "bob", token="tb")
    return gw


@pytest.fixture
def treq(gateway):
    return StubTreq(make_resource(node_of(gateway, Config(max_api_body=100_000))))


def call(treq, method, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    d = treq.request(method, BASE + path, data=data)
    response = treq.flush() or d.result  # StubTreq answers synchronously
    status = response.code
    content = treq.content(response).result
    treq.flush()
    return status, json.loads(content), response


def frames(gateway, conn_id):
    return [json.loads(f) for f in gateway.registry.get(conn_id).channel.frames]


def test_send_to_conn_id_delivers_payload_exactly(treq, gateway):
    payload = {"topic": "data", "event": "onOpen", "message": {"id": "x"}}
    status, answer, _ = call(treq, "POST", "send", {"payload": payload, "conn_id": "a1"})
    assert status == 200
    assert answer == {"code": 0, "message": "success", "data": {"matched": 1}}
    assert frames(gateway, "a1") == [payload]


def test_broadcast_to_users_with_empty_conn_id(treq, gateway):
    payload = {"code": 200, "data": {"uid": "app", "type": "install", "status": "running", "progress": "50"}}
    _, answer, _ = call(treq, "POST", "send", {"payload": payload, "conn_id": "", "users": ["alice"]})
    assert answer["data"] == {"matched": 2}
    assert frames(gateway, "a1") == frames(gateway, "a2") == [payload]
    assert frames(gateway, "b1") == []


def test_send_intersection_and_access_type(treq, gateway):
    _, answer, _ = call(treq, "POST", "send", {"payload": 1, "users": ["alice"], "tokens": ["abc"]})
    assert answer["data"] == {"matched": 1}
    _, answer, _ = call(treq, "POST", "send", {"payload": 2, "users": ["alice"], "users_access_type": 2})
    assert answer["data"] == {"matched": 1}
    assert frames(gateway, "a1") == [1]
    assert frames(gateway, "a2") == [2]


def test_missing_payload_sends_null(treq, gateway):
    call(treq, "POST", "send", {"conn_id": "b1"})
    assert gateway.registry.get("b1").channel.frames == [b"null"]


def test_unknown_target_is_not_an_error(treq):
    status, answer, _ = call(treq, "POST", "send", {"payload": {}, "users": ["nobody"]})
    assert (status, answer["code"], answer["data"]) == (200, 0, {"matched": 0})


@pytest.mark.parametrize("path", ["send", "close"])
@pytest.mark.parametrize("body", [{}, {"conn_id": "", "users": [], "conns": []}])
def test_no_target_is_an_error_that_touches_nothing(treq, gateway, path, body):
    status, answer, _ = call(treq, "POST", path, body)
    assert status == 400
    assert answer["code"] != 0
    assert "target is nil" in answer["message"]
    assert len(gateway.registry) == 3
    assert all(c.channel.closed_with is None and not c.channel.frames for c in gateway.registry)


def test_close_by_conns_and_users(treq, gateway):
    b1 = gateway.registry.get("b1")
    _, answer, _ = call(treq, "POST", "close", {"conns": ["b1", "nope"]})
    assert answer == {"code": 0, "message": "success", "data": {"matched": 1}}
    assert b1.channel.closed_with == CLOSE_BY_APP
    _, answer, _ = call(treq, "POST", "close", {"users": ["alice"], "users_access_type": 1})
    assert answer["data"] == {"matched": 1}
    assert [c.conn_id for c in gateway.registry] == ["a2"]


def test_list_shape(treq):
    status, answer, _ = call(treq, "GET", "list")
    assert status == 200 and answer["code"] == 0
    by_name = {entry["name"]: entry for entry in answer["data"]}
    alice = by_name["alice"]
    assert [c["id"] for c in alice["conns"]] == ["a1"]
    assert alice["conns"][0]["token"] == "abc"
    assert alice["conns_number"] == 1
    assert [c["id"] for c in alice["public_conns"]] == ["a2"]
    assert alice["public_conns_number"] == 1
    assert set(alice["conns"][0]) >= {"id", "token", "userAgent", "userAgentTag"}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"conn_id": 5}, "conn_id"),
        ({"users": "alice"}, "users"),
        ({"users": [1]}, "users"),
        ({"tokens": {"a": 1}}, "tokens"),
        ({"users": ["alice"], "users_access_type": 3}, "users_access_type"),
        ({"users": ["alice"], "users_access_type": "1"}, "users_access_type"),
        ({"users": ["alice"], "users_access_type": True}, "users_access_type"),
    ],
)
def test_wrong_types_name_the_field(treq, body, field):
    status, answer, _ = call(treq, "POST", "send", body)
    assert status == 400 and answer["code"] != 0
    assert field in answer["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1,2]", b'"x"', b'{"payload": NaN, "conn_id": "a1"}', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"],
)
def test_malformed_bodies_are_400_json(treq, raw):
    status, answer, _ = call(treq, "POST", "send", raw=raw)
    assert status == 400
    assert answer["code"] == 400
    assert answer["message"]


def test_oversized_body_is_413(treq):
    status, answer, _ = call(treq, "POST", "send", {"payload": "x" * 100_001, "conn_id": "a1"})
    assert status == 413 and answer["code"] == 413
    assert "limit" in answer["message"]


def test_wrong_method_is_405_json(treq):
    status, answer, response = call(treq, "GET", "send")
    assert status == 405 and answer["code"] != 0
    assert response.headers.getRawHeaders(b"Allow") == [b"POST"]
    status, _, _ = call(treq, "POST", "list", {})
    assert status == 405


def test_unknown_path_is_404_json(treq):
    status, answer, _ = call(treq, "GET", "nothing")
    assert status == 404 and answer["code"] == 404


def test_lone_surrogate_in_payload_is_delivered_not_a_500(treq, gateway):
    status, answer, _ = call(treq, "POST", "send", raw=b'{"payload":"\\ud800x","conn_id":"a1"}')
    assert (status, answer["code"]) == (200, 0)
    assert frames(gateway, "a1") == ["\ud800x"]


def test_empty_user_name_is_a_target(treq, gateway):
    anonymous = open_conn(gateway, "anon", user="")
    _, answer, _ = call(treq, "POST", "send", {"payload": 1, "users": [""]})
    assert answer["data"] == {"matched": 1}
    assert anonymous.channel.frames == [b"1"]
    status, _, _ = call(treq, "POST", "send", {"payload": 1, "conn_id": ""})
    assert status == 400


def test_log_lines_show_paths_as_text_not_bytes(treq, log_lines):
    status, _body, _response = call(treq, "POST", "send", {"users": "alice"})
    assert status == 400
    [line] = [line for line in log_lines if "refused" in line]
    assert "/tapr/ws/conn/send" in line and "b'" not in line
