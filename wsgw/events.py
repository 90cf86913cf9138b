"""
The JSON bodies the gateway POSTs to the app, built as bytes.

A client's JSON message is spliced into the envelope as the client sent it
(after checking that it is JSON), so a message is parsed once and never
re-encoded on its way to the app.
"""

from __future__ import annotations

import base64
from typing import Optional, Tuple

import attr

from .jsonio import decode_json, to_json
from .registry import Connection


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Event:
    """
    One lifecycle event on its way to the app: what the forwarder queues
    and what the app client turns into a request.
    """

    conn_id: str
    #: The connection's event number, from 0: with C{conn_id} it names the
    #: event (C{X-Wsgw-Event-Id}), so the app can drop a repeat.
    seq: int
    #: C{open}, C{message} or C{close}.
    action: str
    #: The JSON object the app receives.
    body: bytes = attr.ib(repr=False)
    #: The client's C{Cookie} header, passed on as the client sent it.
    cookie: str = attr.ib(default="", repr=False)
    #: The client's address, passed on as C{X-Forwarded-For}.
    remote_addr: str = ""

    @property
    def event_id(self) -> str:
        return f"{self.conn_id}:{self.seq}"


PONG = b'{"event":"pong"}'
EMPTY_OBJECT = b"{}"


def envelope_tail(conn: Connection) -> bytes:
    """
    The fields every event of C{conn} ends with, encoded once per connection.
    """
    fields = to_json(
        {
            "user_name": conn.user_name,
            "conn_id": conn.conn_id,
            "token": conn.token,
            "access_public": conn.access_public,
        }
    )
    return b"," + fields[1:]


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
    return b"," + to_json({"user_agent": conn.user_agent, "remote_addr": conn.remote_addr})[1:-1]


BINARY_EXTRA = b',"binary":true'


def close_extra(code: Optional[int], reason: str) -> bytes:
    """
    Fields beyond the original's that a C{close} event carries: the
    WebSocket close code and reason (1006 when the connection just dropped).
    """
    return b"," + to_json({"close_code": code if code is not None else 1006, "close_reason": reason})[1:-1]


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
