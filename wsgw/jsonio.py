"""
JSON as the gateway reads and writes it, and JSON answers over HTTP.

One codec for every JSON text: client messages, API bodies, cluster
messages, and the answers of every endpoint.
"""

from __future__ import annotations

import json
from typing import Any, Dict, NoReturn, Optional

from twisted.web.iweb import IRequest

__all__ = ["decode_json", "error_response", "json_response", "to_json"]


#: One encoder of each kind: C{json.dumps} with an option builds a new
#: encoder per call, twice per API call.
_encode_text = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":")).encode


def to_json(value: Any) -> bytes:
    """
    Compact UTF-8 JSON.  Text that cannot be UTF-8 (a lone surrogate such
    as C{"\\ud800"} parsed from an API body) falls back to ASCII escapes,
    which every JSON parser reads back to the same value.
    """
    text = _encode_text(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _encode_ascii(value).encode("ascii")


def _refuse_constant(name: str) -> NoReturn:
    """
    For C{json.loads}: Python accepts NaN and Infinity, which are not JSON
    and which the app's or a client's parser would reject.
    """
    raise ValueError(f"{name} is not JSON")


#: One decoder for every JSON text the gateway reads: C{json.loads} with an
#: option builds a new decoder (and its scanner) per call.
decode_json = json.JSONDecoder(parse_constant=_refuse_constant).decode


_REASONS = {426: b"Upgrade Required"}


def json_response(request: IRequest, status: int, body: Dict[str, Any], reason: Optional[bytes] = None) -> bytes:
    """Set C{request}'s status and content type; the body to render, ending in a newline."""
    request.setResponseCode(status, reason or _REASONS.get(status))
    request.setHeader(b"Content-Type", b"application/json")
    return to_json(body) + b"\n"  # so that curl's prompt starts on a line of its own


def error_response(request: IRequest, status: int, message: str) -> bytes:
    """An error answer: C{{"code": status, "message": ...}}."""
    return json_response(request, status, {"code": status, "message": message})
