"""
The JSON bodies the gateway POSTs to the app, built as bytes.

A client's JSON message is spliced into the envelope as the client sent it
(after checking that it is JSON), so a message is parsed once and never
re-encoded on its way to the app.
"""

from __future__ import annotations

import base64
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Optional, Tuple

import attr

from .jsonio import decode_json, to_json
from .registry import Connection


@attr.s(slots=True, auto_attribs=True)
class Event:
    """
    One lifecycle event on its way to the app: what the forwarder queues
    and what the app client turns into a request.  Nothing changes one
    once made; it is not frozen only because a frozen class's
    C{__init__} sets each field through C{object.__setattr__}, three times
    the cost, once per event.
    """

    conn_id: str
    #: The connection's event number, from 0: with C{conn_id} it names the
    #: event (C{X-Wsgw-Event-Id}), so the app can drop a repeat.
    seq: int
    #: C{open}, C{message}, C{close}, C{online} or C{offline}.
    action: str
    #: The JSON object the app receives.
    body: bytes = attr.ib(repr=False)
    #: The client's C{Cookie} header, passed on as the client sent it.
    cookie: str = attr.ib(default="", repr=False)
    #: The client's address, passed on as C{X-Forwarded-For}.
    remote_addr: str = ""
    #: An id given by whoever decided the event, for one that is not
    #: numbered in a connection's sequence (a cluster's presence events).
    given_id: str = ""

    @property
    def event_id(self) -> str:
        return self.given_id or f"{self.conn_id}:{self.seq}"


PONG = b'{"event":"pong"}'
EMPTY_OBJECT = b"{}"


def json_string(text: str) -> bytes:
    """
    C{text} as a JSON string, as L{to_json} writes it (UTF-8, or ASCII
    escapes for text that cannot be UTF-8), without building an encoder:
    a handshake encodes a handful of strings, and C{json.dumps} of a dict
    cost a sixth of it.
    """
    try:
        return encode_basestring(text).encode("utf-8")
    except UnicodeEncodeError:
        return encode_basestring_ascii(text).encode("ascii")


def envelope_tail(conn: Connection) -> bytes:
    """
    The fields every event of C{conn} ends with, encoded once per connection.
    """
    return (
        b',"user_name":'
        + json_string(conn.user_name)
        + b',"conn_id":'
        + json_string(conn.conn_id)
        + b',"token":'
        + json_string(conn.token)
        + (b',"access_public":true}' if conn.access_public else b',"access_public":false}')
    )


def encode_event(action: bytes, data: bytes, tail: bytes, extra: bytes = b"") -> bytes:
    """
    C{{"data": <data>, "action": <action>, <extra>, <tail>}} as bytes.

    C{data} must already be one JSON value; C{extra} is empty or a run of
    C{,"key":value} members.
    """
    return b'{"data":' + data + b',"action":"' + action + b'"' + extra + tail


def open_extra(conn: Connection) -> bytes:
    """
    Fields beyond the original's that an C{open} event carries: where the
    client connected from and what it said it is.
    """
    return b',"user_agent":' + json_string(conn.user_agent) + b',"remote_addr":' + json_string(conn.remote_addr)


def presence_event(action: str, user_name: str) -> bytes:
    """C{{"action": "online"|"offline", "user_name": ..., "data": {}}}."""
    return b'{"action":"' + action.encode("ascii") + b'","user_name":' + json_string(user_name) + b',"data":{}}'


BINARY_EXTRA = b',"binary":true'


def close_extra(code: Optional[int], reason: str) -> bytes:
    """
    Fields beyond the original's that a C{close} event carries: the
    WebSocket close code and reason (1006 when the connection just dropped).
    """
    return b',"close_code":%d,"close_reason":' % (code if code is not None else 1006) + json_string(reason)


def classify_message(payload: bytes, is_binary: bool) -> Tuple[bool, bytes, bytes]:
    """
    Decide what a client's frame is.

    Returns C{(is_ping, data, extra)}: C{data} is the JSON to place in the
    event's C{data} field and C{extra} the envelope fields it needs.

      - a JSON text whose value is an object with C{"event": "ping"} is a
        heartbeat (never forwarded);
      - other JSON text is forwarded as the value the client sent;
      - text that is not JSON is forwarded as a JSON string;
      - a binary frame is forwarded as base64 text with C{"binary": true}.
    """
    if is_binary:
        return False, b'"' + base64.b64encode(payload) + b'"', BINARY_EXTRA
    text = payload.decode("utf-8")
    try:
        value = decode_json(text)
    except ValueError:
        return False, to_json(text), b""
    if isinstance(value, dict) and value.get("event") == "ping":
        return True, b"", b""
    return False, payload.strip(), b""
