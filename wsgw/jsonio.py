"""
JSON as the gateway reads and writes it, and JSON answers over HTTP.

One codec for every JSON text: client messages, API bodies, cluster
messages, and the answers of every endpoint.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, NoReturn, Optional, Tuple

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
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_decode = _decoder.decode
#: The scanner under C{_decode} (the C one where there is one).
_scan_once: Callable[[str, int], Tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]  # set in __init__
_WHITESPACE = " \t\n\r"


def decode_json(text: str) -> Any:
    """
    The value of the JSON text C{text}; L{ValueError} (a
    C{JSONDecodeError}) if it is not JSON.

    A text with no whitespace around it (a client's every message, an
    app's every call) is read by the decoder's scanner alone: that is what
    the decoder returns for it, without its two whitespace matches and its
    calls around the scanner (a third of reading a small message).
    Anything else, an error included, is the decoder's to read and to word.
    """
    if text[:1] not in _WHITESPACE:  # not empty either: "" is in every str
        try:
            value, end = _scan_once(text, 0)
        except Exception:  # StopIteration, a JSONDecodeError...: the decoder says what
            pass
        else:
            if end == len(text):
                return value
    return _decode(text)


_REASONS = {426: b"Upgrade Required"}


def json_response(request: IRequest, status: int, body: Dict[str, Any], reason: Optional[bytes] = None) -> bytes:
    """Set C{request}'s status and content type; the body to render, ending in a newline."""
    request.setResponseCode(status, reason or _REASONS.get(status))
    request.setHeader(b"Content-Type", b"application/json")
    return to_json(body) + b"\n"  # so that curl's prompt starts on a line of its own


def error_response(request: IRequest, status: int, message: str) -> bytes:
    """An error answer: C{{"code": status, "message": ...}}."""
    return json_response(request, status, {"code": status, "message": message})
