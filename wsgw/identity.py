"""
Who a new connection belongs to, read from its upgrade request.
"""

from __future__ import annotations

import uuid
from typing import Mapping, Optional

from .registry import Connection

AUTH_COOKIE = "auth_token"


def cookie_value(cookie_header: str, name: str) -> Optional[str]:
    """
    The value of cookie C{name} in a C{Cookie} header, or L{None}.

    Browsers send C{a=1; b=2}; values may be quoted.  The first occurrence
    wins, as in Go's C{Request.Cookie}.
    """
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def _header(headers: Mapping[str, str], name: str) -> str:
    """
    A header's value as the client meant it: Autobahn decodes header bytes
    as ISO-8859-1; browsers send UTF-8 (a user name, a cookie value).
    """
    value = headers.get(name, "")
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def new_conn_id() -> str:
    return str(uuid.uuid4())


def identify(
    headers: Mapping[str, str],
    peer: str,
    user_header: str = "X-Bfl-User",
) -> Connection:
    """
    A new L{Connection} for an upgrade request with C{headers} (names in
    lower case, as Autobahn gives them) from C{peer}.

    The user name comes from the platform's user header (it may be empty);
    the token from the C{auth_token} cookie, or, with none, a fresh UUID
    that marks the connection public.
    """
    cookie = _header(headers, "cookie")
    token = cookie_value(cookie, AUTH_COOKIE) if cookie else None
    public = not token
    forwarded = _header(headers, "x-original-forwarded-for").strip()
    return Connection(
        conn_id=new_conn_id(),
        user_name=_header(headers, user_header.lower()).strip(),
        token=str(uuid.uuid4()) if public else token,
        access_public=public,
        user_agent=_header(headers, "user-agent"),
        remote_addr=forwarded or peer,
        cookie=cookie,
    )
