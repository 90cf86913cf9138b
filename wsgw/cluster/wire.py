"""
What the nodes of a cluster say to each other through Redis, and the names
of the keys and channels they say it on.

Presence: the hash C{<prefix>:conns:<node>} maps each of a node's conn ids
to its presence record; C{<prefix>:alive:<node>} says the node is alive;
both expire after the presence TTL unless refreshed.  The set
C{<prefix>:nodes} names the nodes to look at.

Commands go out on C{<prefix>:commands}; each node answers the origin on
C{<prefix>:replies:<origin>}.

Wire format (JSON, version 1)::

  command: {"v":1,"from":NODE,"id":REQUEST,"op":"send"|"close",
            "conn_ids":[...],"users":[...],"tokens":[...],"access":0|1|2,
            "payload":"<the frame's text>"}       (payload: send only)
           a binary frame: "payload":"<base64>","binary":true
  reply:   {"v":1,"from":NODE,"id":REQUEST,"matched":N}
  presence record: {"name":USER,"public":BOOL,"conn":{... as /list shows it}}

Nothing read from Redis is trusted: a message or record that does not have
exactly these shapes raises L{Malformed}.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, List, Optional, Tuple

import attr

from ..jsonio import decode_json, to_json
from ..registry import AccessType, Connection, Targets

PROTOCOL_VERSION = 1
_MAX_NAME = 256
_DESCRIBED_FIELDS = ("id", "token", "userAgent", "userAgentTag", "remoteAddr")


class Malformed(ValueError):
    """A message or record from Redis that does not have the expected shape."""


@attr.s(frozen=True, slots=True)
class Keys:
    """The Redis keys and channels of the cluster named by C{prefix}."""

    prefix: str = attr.ib(default="wsgw")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def alive_prefix(self) -> str:
        return f"{self.prefix}:alive:"

    @property
    def conns_prefix(self) -> str:
        return f"{self.prefix}:conns:"

    @property
    def commands(self) -> str:
        return f"{self.prefix}:commands"

    def alive(self, node_id: str) -> str:
        return self.alive_prefix + node_id

    def conns(self, node_id: str) -> str:
        return self.conns_prefix + node_id

    def replies(self, node_id: str) -> str:
        return f"{self.prefix}:replies:{node_id}"


@attr.s(frozen=True, slots=True)
class Command:
    """An API C{send} or C{close} on its way to the other nodes."""

    origin: str = attr.ib()
    request_id: str = attr.ib()
    op: str = attr.ib()
    targets: Targets = attr.ib()
    payload: Optional[bytes] = attr.ib(default=None)
    #: The payload is a binary frame's, not UTF-8 text.
    binary: bool = attr.ib(default=False)


def encode_command(command: Command) -> bytes:
    targets = command.targets
    message: Dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "from": command.origin,
        "id": command.request_id,
        "op": command.op,
        "conn_ids": list(targets.conn_ids),
        "users": list(targets.users),
        "tokens": list(targets.tokens),
        "access": int(targets.access),
    }
    if command.payload is not None:
        if command.binary:
            message["payload"] = base64.b64encode(command.payload).decode("ascii")
            message["binary"] = True
        else:
            message["payload"] = command.payload.decode("utf-8")
    return to_json(message)


def encode_reply(origin: str, request_id: str, matched: int) -> bytes:
    return to_json({"v": PROTOCOL_VERSION, "from": origin, "id": request_id, "matched": matched})


def _json_object(raw: object) -> Dict[str, Any]:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("not UTF-8") from None
    if not isinstance(raw, str):
        raise Malformed("not text")
    try:
        value = decode_json(raw)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(value, dict):
        raise Malformed("not a JSON object")
    return value


def _name(message: Dict[str, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise Malformed(f"{field} must be a string of 1 to {_MAX_NAME} characters")
    return value


def _strings(message: Dict[str, Any], field: str) -> List[str]:
    value = message.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Malformed(f"{field} must be a list of strings")
    return value


def _envelope(raw: object) -> Dict[str, Any]:
    message = _json_object(raw)
    if message.get("v") != PROTOCOL_VERSION:
        raise Malformed(f"unknown version {message.get('v')!r}")
    return message


def parse_command(raw: object) -> Command:
    message = _envelope(raw)
    op = message.get("op")
    if op not in ("send", "close"):
        raise Malformed(f"unknown op {op!r}")
    access = message.get("access", 0)
    if isinstance(access, bool) or access not in (0, 1, 2):
        raise Malformed("access must be 0, 1 or 2")
    targets = Targets(
        conn_ids=_strings(message, "conn_ids"),
        users=_strings(message, "users"),
        tokens=_strings(message, "tokens"),
        access=AccessType(access),
    )
    if not targets:
        raise Malformed("no target")
    payload = None
    binary = message.get("binary", False)
    if not isinstance(binary, bool):
        raise Malformed("binary must be true or false")
    if op == "send":
        text = message.get("payload")
        if not isinstance(text, str):
            raise Malformed("payload must be a string")
        try:
            payload = base64.b64decode(text, validate=True) if binary else text.encode("utf-8")
        except (binascii.Error, ValueError):
            raise Malformed("payload is not base64") from None
        except UnicodeEncodeError:
            raise Malformed("payload is not Unicode text") from None
    return Command(_name(message, "from"), _name(message, "id"), op, targets, payload, binary)


def parse_reply(raw: object) -> Tuple[str, str, int]:
    message = _envelope(raw)
    matched = message.get("matched")
    if isinstance(matched, bool) or not isinstance(matched, int) or matched < 0:
        raise Malformed("matched must be a count")
    return _name(message, "from"), _name(message, "id"), matched


def presence_record(conn: Connection) -> bytes:
    return to_json({"name": conn.user_name, "public": conn.access_public, "conn": conn.describe()})


def parse_presence(raw: object) -> Tuple[str, bool, Dict[str, str]]:
    record = _json_object(raw)
    name, public, described = record.get("name"), record.get("public"), record.get("conn")
    if not isinstance(name, str) or not isinstance(public, bool) or not isinstance(described, dict):
        raise Malformed("a presence record needs name, public and conn")
    if not all(isinstance(described.get(field), str) for field in _DESCRIBED_FIELDS):
        raise Malformed("a presence record's conn needs " + ", ".join(_DESCRIBED_FIELDS))
    return name, public, {field: described[field] for field in _DESCRIBED_FIELDS}
