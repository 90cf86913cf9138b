"""
What a client's frame becomes on its way to the app.
"""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgw.events import classify_message, close_extra, encode_event, envelope_tail, open_extra
from wsgw.jsonio import to_json
from wsgw.registry import Connection


@pytest.mark.parametrize(
    "frame", [b'{"event":"ping"}', b'{"event":"ping","data":{}}', b' {"data": 1, "event": "ping"} ']
)
def test_pings_are_recognised(frame):
    is_ping, _, _ = classify_message(frame, False)
    assert is_ping


@pytest.mark.parametrize("frame", [b'{"event":"pong"}', b'"ping"', b'{"event":["ping"]}', b"ping", b"[1]"])
def test_other_frames_are_not_pings(frame):
    is_ping, _, _ = classify_message(frame, False)
    assert not is_ping


def test_json_message_kept_as_sent():
    _, data, extra = classify_message('{"event":"ai","data":{"q":"ü"}}'.encode(), False)
    assert json.loads(data) == {"event": "ai", "data": {"q": "ü"}}
    assert extra == b""


@pytest.mark.parametrize("text", ["hello", "NaN", "{broken", "Infinity", ""])
def test_text_that_is_not_json_becomes_a_string(text):
    _, data, _ = classify_message(text.encode(), False)
    assert json.loads(data) == text


def test_binary_is_base64_with_flag():
    _, data, extra = classify_message(b"\x00\xffbin", True)
    conn = Connection(conn_id="c", user_name="u", token="t", access_public=False)
    event = json.loads(encode_event(b"message", data, envelope_tail(conn), extra))
    assert event["binary"] is True
    assert base64.b64decode(event["data"]) == b"\x00\xffbin"


def test_envelope_carries_every_field_of_the_original():
    conn = Connection(
        conn_id="c-1", user_name='al"ice', token="tok", access_public=True, user_agent="UA", remote_addr="1.2.3.4"
    )
    event = json.loads(encode_event(b"open", b"{}", envelope_tail(conn), open_extra(conn)))
    assert event == {
        "data": {},
        "action": "open",
        "user_name": 'al"ice',
        "conn_id": "c-1",
        "token": "tok",
        "access_public": True,
        "user_agent": "UA",
        "remote_addr": "1.2.3.4",
    }


@given(
    st.text(),
    st.text(),
    st.text(),
    st.booleans(),
    st.text(),
    st.one_of(st.none(), st.integers(1000, 4999)),
)
def test_envelope_fields_are_what_json_dumps_would_write(user, token, agent, public, reason, code):
    """The envelope's fields are written without json.dumps, for speed: they
    must read back exactly, lone surrogates included."""
    conn = Connection(conn_id="c-1", user_name=user, token=token, access_public=public, user_agent=agent)
    conn.remote_addr = "203.0.113.7"
    body = encode_event(b"open", b"{}", envelope_tail(conn), open_extra(conn) + close_extra(code, reason))
    assert json.loads(body) == {
        "data": {},
        "action": "open",
        "user_agent": agent,
        "remote_addr": "203.0.113.7",
        "close_code": 1006 if code is None else code,
        "close_reason": reason,
        "user_name": user,
        "conn_id": "c-1",
        "token": token,
        "access_public": public,
    }
    assert body == to_json(json.loads(body)) or "\\ud" in body.decode("ascii", "replace")
