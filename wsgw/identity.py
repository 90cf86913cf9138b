"""
Who a new connection belongs to, read from its upgrade request.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Mapping, Optional, Union

from .config import Networks
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
    """
    A random (version 4) UUID as text, the form of C{str(uuid.uuid4())}
    from the same 16 random bytes, without the C{UUID} object between:
    every handshake makes two (its conn id, and a public one's token), and
    that object was a third of their cost.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _ip(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def client_address(headers: Mapping[str, str], peer: str, trusted: Optional[Networks] = None) -> str:
    """
    The client's address: with no trusted proxies (the default), the
    first address of C{X-Original-Forwarded-For} (the platform's proxy sets
    it), else the peer's.  With C{trusted} networks, the forwarding headers
    (C{X-Original-Forwarded-For}, else C{X-Forwarded-For}) are believed
    only as far as they were written by trusted peers: the chain is walked
    from the peer back, and the nearest address that is not trusted is the
    client's.
    """
    if trusted is None:
        forwarded = _header(headers, "x-original-forwarded-for").split(",")[0].strip()
        return forwarded or peer
    chain = [peer]
    peer_ip = _ip(peer)
    if peer_ip is None or not any(peer_ip in net for net in trusted):
        return peer  # a direct client: what it says of itself is not believed
    header = _header(headers, "x-original-forwarded-for") or _header(headers, "x-forwarded-for")
    chain = [part.strip() for part in header.split(",") if part.strip()] + chain
    for address in reversed(chain):
        ip = _ip(address)
        if ip is None:
            return address  # not an address a trusted proxy writes: stop believing here
        if not any(ip in net for net in trusted):
            return str(ip)
    return chain[0]


def identify(
    headers: Mapping[str, str],
    peer: str,
    user_header: str = "X-Bfl-User",
    trusted: Optional[Networks] = None,
) -> Connection:
    """
    A new L{Connection} for an upgrade request with C{headers} (names in
    lower case, as Autobahn gives them) from C{peer}.

    The user name comes from the platform's user header (it may be empty);
    the token from the C{auth_token} cookie, or, with none, a fresh UUID
    that marks the connection public; the address from L{client_address}.
    """
    cookie = _header(headers, "cookie")
    token = cookie_value(cookie, AUTH_COOKIE) if cookie else None
    public = not token
    return Connection(
        conn_id=new_conn_id(),
        user_name=_header(headers, user_header.lower()).strip(),
        token=token or new_conn_id(),
        access_public=public,
        user_agent=_header(headers, "user-agent"),
        remote_addr=client_address(headers, peer, trusted),
        cookie=cookie,
    )
